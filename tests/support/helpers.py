"""What several test modules share: running wsfleet from a test, talking to it, and the apps
the tests serve. Fixtures are in ``tests/conftest.py``; running wsfleet itself (processes,
masters, supervisord) is in :mod:`tests.support.harness`, which the scripts share."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from websockets.sync.client import connect, unix_connect

from wsfleet import control

from . import harness
from .harness import ROOT, Process, clean_env

# systemd-socket-activate (Debian's systemd package) binds the address and starts the command
# as systemd would; WSFLEET is the command, this environment's wsfleet.
ACTIVATE = ("systemd-socket-activate",)
WSFLEET = (sys.executable, "-m", "wsfleet")


def run_wsfleet(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 20, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a wsfleet command that is expected to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "wsfleet", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean_env(env),
        timeout=timeout,
        **kw,  # type: ignore[arg-type]
    )


class Master(harness.Master):
    """A running `wsfleet start` with its pidfile, ended by the test's spawn fixture."""

    def __init__(self, spawn: Any, tmp_path: Path, *args: str, **kw: Any) -> None:
        super().__init__(tmp_path, *args, spawn=spawn, **kw)


@contextlib.contextmanager
def new_masters(master: Master) -> Iterator[None]:
    """End, by pid, whatever master the pidfile names at the end besides the test's own (an
    upgrade's new master is not the test's child)."""
    try:
        yield
    finally:
        with contextlib.suppress(control.ControlError):
            pid = control.read_pid(master.pidfile)
            if pid != master.proc.pid:
                harness.end(pid)


def app_master(spawn: Any, tmp_path: Path, source: str, *args: str) -> Master:
    """A master serving app:handler, written from source into the test's directory (no
    bytecode cache, so that a rewrite within the same second is what a reload imports)."""
    (tmp_path / "app.py").write_text(source)
    return Master(
        spawn,
        tmp_path,
        *args,
        "--app",
        "app:handler",
        cwd=tmp_path,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """A --metrics port's /metrics (url: its root), parsed: each sample's value by its name
    and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "metrics", timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of that name whose labels include these."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def start_worker(spawn: Callable[..., Process], *args: str, **kw: Any) -> tuple[Process, int]:
    """A lone `wsfleet worker` on a free port, ready: (the process, its port)."""
    proc = spawn("worker", "--port", "0", *args, **kw)
    port = proc.wait_ready()
    return proc, port


def echo_once(url: str, message: str = "hi", timeout: float = 5) -> str:
    with connect(url, open_timeout=timeout) as ws:
        ws.send(message)
        reply = ws.recv(timeout=timeout)
        assert isinstance(reply, str)
        return reply


def unix_echo(path: str | Path, message: str = "hi", timeout: float = 5) -> str:
    with unix_connect(str(path), "ws://localhost/", open_timeout=timeout) as ws:
        ws.send(message)
        reply = ws.recv(timeout=timeout)
        assert isinstance(reply, str)
        return reply


def tcp_listeners(pid: int) -> dict[str, int]:
    """How many listening TCP sockets the process holds, per address."""
    counts: dict[str, int] = {}
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            host, port = conn.laddr
            key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def installed(tmp_path: Path) -> Path:
    """A copy of the package to run from, as site-packages would hold it."""
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "wsfleet", site / "wsfleet", ignore=shutil.ignore_patterns("__pycache__")
    )
    return site


def set_version(site: Path, version: str) -> None:
    init = site / "wsfleet" / "__init__.py"
    text, count = re.subn(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text())
    assert count == 1
    init.write_text(text)


# The apps the tests serve, as source for an app.py in the test's directory.

VERSIONED_APP = """
VERSION = {version!r}


async def handler(websocket):
    async for message in websocket:
        await websocket.send(VERSION if message == "version?" else message)
"""


def write_app(directory: Path, version: str) -> None:
    (directory / "app.py").write_text(VERSIONED_APP.format(version=version))


HANGING_APP = """
import time


async def handler(websocket):
    async for message in websocket:
        if message == "hang":
            time.sleep(600)  # blocks the event loop: the worker stops answering
        await websocket.send(message)
"""

CRASHING_APP = """
import os

if os.path.exists("crash"):
    raise RuntimeError("crash file present")


async def handler(websocket):
    async for message in websocket:
        await websocket.send(message)
"""

CLIENT_APP = """
import wsfleet


async def handler(websocket):
    async for message in websocket:
        await websocket.send(wsfleet.client_address(websocket))
"""
