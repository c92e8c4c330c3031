"""Following state other instances change, by reading it again every so often."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def poll_forever(step: Callable[[], Awaitable[None]], interval: float, what: str) -> None:
    """Run `step` every `interval` seconds until cancelled; a failing datastore is logged once per outage."""
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:
                log.warning("%s failed: %s", what, exc)
            failing = True
            continue
        if failing:
            log.info("%s works again", what)
        failing = False
