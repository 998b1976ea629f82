"""A pool task for tests/test_backends.py, in a module of its own so spawned workers import only it."""

from __future__ import annotations

import os
import time
from pathlib import Path


def where(barrier: str) -> tuple[int, str | None]:
    """Wait until both workers run one (so each takes one task), then say where this one ran."""
    Path(barrier, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(barrier).iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")
