"""pykine's own RangeResponse encoding (services/encode.py) against protobuf's."""

from __future__ import annotations

import os
import subprocess
import sys

from harness import ROOT


def test_encoded_range_responses_are_protobufs_bytes() -> None:
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "encode_checks.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"
