"""pykine's own encodings against protobuf's: RangeResponse bytes (services/encode.py) and the
gateway's JSON (services/jsonpb.py). Each check runs in a process of its own, since pykine's and
aetcd's descriptors of etcd's messages cannot share one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from harness import ROOT


@pytest.mark.parametrize("checks", ["encode_checks.py", "jsonpb_checks.py"])
def test_own_encodings_agree_with_protobuf(checks: str) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", checks)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"
