"""Several serving processes on one port and one datastore (--workers N).

One Python process runs on one core at a time (the GIL), so pykine can
run N workers that share the listening port (SO_REUSEPORT: the kernel spreads
connections over them) and the datastore. Each worker is a whole pykine: the
datastore serialises their writes, revisions come from the stored counter,
every worker's watch hub follows the others' commits from the history, and
lease expiry and compaction are safe to run in all of them.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from types import FrameType

from pykine.cli import Settings, fail
from pykine.logs import setup_logging

log = logging.getLogger("pykine.workers")


def supervise(settings: Settings, argv: list[str]) -> None:
    """Start the workers, forward SIGTERM/SIGINT to them, and stop all if one dies."""
    setup_logging(settings.log_format, settings.debug)
    if settings.listen_address.startswith("unix://"):
        fail("--workers needs a TCP listen address (a unix socket cannot be shared)")
    if settings.listen_address.rsplit(":", 1)[-1] == "0":
        fail("--workers needs a fixed port (port 0 would give each worker its own)")
    from pykine.backends.base import BackendError
    from pykine.server import check_listen_address

    try:
        check_listen_address(settings.listen_address)  # nobody else may serve here
    except BackendError as exc:
        fail(str(exc))
    children: list[subprocess.Popen[bytes]] = []
    for index in range(settings.workers):
        extra = ["--workers=1", "--reuse-port"]
        if index:
            extra.append("--metrics-bind-address=")  # one metrics endpoint, on the first worker
        children.append(subprocess.Popen([sys.executable, "-m", "pykine", *argv, *extra]))
    log.info("started %d workers on %s", len(children), settings.listen_address)

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = 0
    while any(child.poll() is None for child in children):
        for child in children:
            code = child.poll()
            if code is not None and code != 0 and not stopping:
                log.error("worker %d exited with %d; stopping the others", child.pid, code)
                failed = code
                stop(signal.SIGTERM, None)
        time.sleep(0.2)
    raise SystemExit(1 if failed else 0)
