"""Build something once per test run and share it between the pytest-xdist workers."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(folder)`` once per test run; returns what it returned.

    Under pytest-xdist the workers share the run's common temporary folder: the first worker
    to get here builds while holding a file lock, the others wait and take its result, so the
    CPU cores are not spent building the same thing twice.
    """
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"shared_{name}"
    shared.mkdir(parents=True, exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = shared / ".done"
            if not done.exists():
                result = build(shared)
                done.write_text(str(result))
            return Path(done.read_text())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
