from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .helpers import Proc


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start wsfleet processes; every one is killed by pid at the end of the test."""
    procs: list[Proc] = []

    def start(*args: str, **kw: Any) -> Proc:
        proc = Proc(args, **kw)
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
