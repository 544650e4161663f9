from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support.harness import Process


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start wsfleet processes; every one is killed by pid at the end of the test."""
    procs: list[Process] = []

    def start(*args: str, **kw: Any) -> Process:
        proc = Process(args, **kw)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    """The --loop value; tests taking it run on both event loops."""
    return str(request.param)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory other users may pass through (pytest's own are 0700), for a Unix socket
    that a process of another user connects to; removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="wsfleet-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)
