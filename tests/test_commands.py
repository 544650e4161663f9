"""The control commands as an operator runs them after `wsfleet start` with no pidfile:
`status`, `reload`, `upgrade` and `stop` find the master by the address it listens on (the
same --host/--port/--bind, WSFLEET_* variables and --config as `start`); `reload --wait`
reports when the new code serves and when the old workers are gone; `--daemon` without
--log-file logs to a file and says which.

No test here uses the default port 8765: other programs on a shared machine may hold it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from wsfleet import control
from wsfleet.config import Address

from .support import harness
from .support.harness import free_port, gone, wait_for
from .support.helpers import ACTIVATE, WSFLEET, echo_once, installed, run_wsfleet, set_version


def status(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    """`wsfleet status --json ARGS`, which must find a master."""
    result = run_wsfleet(["status", "--json", *args], env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def found(*args: str, **kw: Any) -> int:
    """The pid of the master `wsfleet status ARGS` finds."""
    return int(status(*args, **kw)["master"]["pid"])


def test_the_first_commands_of_the_readme_need_no_pidfile(spawn) -> None:
    """`wsfleet start -w 4`, then `wsfleet status`, `reload --wait`, `stop`, as they are:
    the address comes from WSFLEET_PORT for every command (a free port, not 8765)."""
    env = {"WSFLEET_PORT": str(free_port())}
    master = spawn("start", "-w", "4", env=env)
    master.wait_ready()
    result = run_wsfleet(["status"], env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^master +- +{master.pid} +running", result.stdout, re.M), result.stdout
    assert result.stdout.count("\nworker ") == 4
    old = {w["pid"] for w in status(env=env)["workers"]}
    result = run_wsfleet(["reload", "--wait"], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"master {master.pid}: every slot serves the new code after" in result.stdout
    assert f"master {master.pid}: rolling restart done: the old workers are gone" in (result.stdout)
    assert all(gone(pid) for pid in old)
    result = run_wsfleet(["stop"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"master {master.pid} stopped\n"
    assert gone(master.pid)


def test_two_masters_on_two_ports_are_each_found_from_their_own_address(spawn, tmp_path) -> None:
    first_port = free_port()
    first = spawn("start", "-w", "1", "--host", "localhost", "--port", str(first_port))
    first.wait_ready()
    second_port = free_port()  # (the first one's is taken by now)
    toml = tmp_path / "second.toml"
    toml.write_text(f"port = {second_port}\nworkers = 1\n")
    second = spawn("start", "--config", str(toml))
    second.wait_ready()
    # A host name is resolved as start resolves it.
    assert found("--host", "localhost", "--port", str(first_port)) == first.pid
    assert found("--config", str(toml)) == second.pid
    assert found(env={"WSFLEET_PORT": str(second_port)}) == second.pid
    assert found(env={"WSFLEET_BIND": f"127.0.0.1:{second_port}"}) == second.pid
    result = run_wsfleet(["stop", "--config", str(toml)])
    assert result.returncode == 0, result.stderr
    assert gone(second.pid) and not gone(first.pid)
    assert found("--host", "localhost", "--port", str(first_port)) == first.pid


def test_port_0_several_binds_and_a_unix_socket(spawn, tmp_path: Path) -> None:
    """The master is found by the port the kernel chose, by any of its addresses, and by
    its Unix socket's path, relative (to the command's directory) or not."""
    master = spawn("start", "-w", "2", "--bind", "127.0.0.1:0", "--bind", "unix:s", cwd=tmp_path)
    port = master.wait_ready()
    master.wait_line("listening on unix:s")
    socket_path = str(tmp_path / "s")
    assert found("--port", str(port)) == master.pid
    assert found("--bind", f"unix:{socket_path}") == master.pid
    assert found("--bind", "unix:s", cwd=tmp_path) == master.pid
    assert found("--bind", "127.0.0.1:1", "--bind", f"127.0.0.1:{port}") == master.pid
    assert (master.pid, [Address("127.0.0.1", port), Address(path=socket_path)]) in (
        control.running_masters()
    )
    # Port 0 names no master: the error says what was looked for and how to point at one.
    result = run_wsfleet(["status", "--port", "0"])
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "listens on 127.0.0.1:0 (its masters: pid " in line
    assert "give the address the master listens on" in line and "--pidfile" in line
    # A pidfile given wins over the address.
    result = run_wsfleet(["status", "--port", str(port), "--pidfile", str(tmp_path / "x.pid")])
    assert result.returncode == 1
    assert f"no pidfile at {tmp_path / 'x.pid'}" in result.stderr
    result = run_wsfleet(["stop", "--bind", "unix:s"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert gone(master.pid) and not os.path.exists(socket_path)


def test_a_socket_activated_master_is_found_by_the_address_systemd_bound(spawn) -> None:
    port = free_port()
    master = spawn("start", "-w", "1", program=(*ACTIVATE, "-l", f"127.0.0.1:{port}", *WSFLEET))
    master.wait_line(f"Listening on 127.0.0.1:{port} as 3")
    assert echo_once(f"ws://127.0.0.1:{port}/", timeout=15) == "hi"  # (wsfleet starts now)
    master.wait_ready()
    assert found("--port", str(port)) == master.pid


LINGERING_APP = """
import asyncio
import os

VERSION = {version!r}


async def handler(websocket):
    try:
        async for message in websocket:
            await websocket.send(VERSION if message == "version?" else message)
    finally:
        # Closed (by a reload's 1012): this worker lives on until the test says (a handler
        # that takes its time to clean up, as real ones do).
        while not os.path.exists("release"):
            await asyncio.sleep(0.02)
"""


def lingering_master(spawn, tmp_path: Path) -> tuple[Any, int]:
    (tmp_path / "app.py").write_text(LINGERING_APP.format(version="v1"))
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    master = spawn("start", "-w", "1", "--port", "0", "--app", "app:handler", cwd=tmp_path, env=env)
    return master, master.wait_ready()


@contextlib.contextmanager
def connected(port: int, version: str) -> Iterator[Any]:
    """A client of the current workers, which they count (in their heartbeats)."""
    with connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
        ws.send("version?")
        assert ws.recv(timeout=10) == version
        wait_for(
            lambda: sum(w["connections"] for w in status("--port", str(port))["workers"]) == 1,
            what="the connection counted",
        )
        yield ws


def test_reload_wait_reports_the_new_code_serving_then_the_old_workers_gone(
    spawn, tmp_path: Path
) -> None:
    master, port = lingering_master(spawn, tmp_path)
    with connected(port, "v1") as ws:
        old = {w["pid"] for w in status("--port", str(port))["workers"]}
        (tmp_path / "app.py").write_text(LINGERING_APP.format(version="v2"))
        waiter = spawn("reload", "--wait", "--port", str(port))
        waiter.wait_line(
            rf"master {master.pid}: every slot serves the new code after [\d.]+s; 1 old worker "
            r"\(\d connections?\) still runs the old code",
            timeout=30,
        )
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    # The old worker's handler has not returned: the reload is not over, and nothing says
    # it is.
    outcome = status("--port", str(port))["master"]["reload"]
    assert outcome["kind"] == "done" and outcome["old_workers"] == 1, outcome
    text = run_wsfleet(["status", "--port", str(port)]).stdout
    assert "last rolling restart: done; 1 old worker (" in text
    assert waiter.popen.poll() is None and "done" not in waiter.output
    assert not any(gone(pid) for pid in old)
    (tmp_path / "release").touch()
    assert waiter.wait(30) == 0, waiter.output
    waiter.wait_line(
        rf"master {master.pid}: rolling restart done: the old workers are gone, every worker "
        r"runs the new code \([\d.]+s\)"
    )
    assert all(gone(pid) for pid in old)
    assert status("--port", str(port))["master"]["reload"]["old_workers"] == 0

    # --wait=serving returns at the first moment, while the old worker still closes.
    (tmp_path / "release").unlink()
    with connected(port, "v2"):
        old = {w["pid"] for w in status("--port", str(port))["workers"]}
        result = run_wsfleet(["reload", "--wait=serving", "--port", str(port)], timeout=60)
        assert result.returncode == 0, result.stderr
        (line,) = result.stdout.splitlines()
        assert re.fullmatch(
            rf"master {master.pid}: every slot serves the new code after [\d.]+s; 1 old worker "
            r"\(\d connections?\) still runs the old code \(`wsfleet status` shows when the "
            r"old workers are gone\)",
            line,
        ), line
        assert not any(gone(pid) for pid in old)
    (tmp_path / "release").touch()
    wait_for(lambda: all(gone(pid) for pid in old), 30, "the old worker")


def test_upgrade_and_stop_find_the_new_master_by_address(spawn, tmp_path: Path) -> None:
    """After an upgrade two masters list the address until the old one's workers are gone:
    the commands mean the new one, which is in charge."""
    site = installed(tmp_path)
    (tmp_path / "app.py").write_text(LINGERING_APP.format(version="v1"))
    env = {"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    args = ("start", "-w", "1", "--port", "0", "--app", "app:handler")
    old = spawn(*args, cwd=tmp_path, env=env)
    port = old.wait_ready()
    set_version(site, "0.1.0+upgraded")
    new = None
    try:
        with connected(port, "v1"):  # the old worker, so the old master, stays until released
            result = run_wsfleet(["upgrade", "--port", str(port)], timeout=120)
            assert result.returncode == 0, result.stderr
            new = found("--port", str(port))
            assert new != old.pid and f"master {new} (wsfleet 0.1.0+upgraded)" in result.stdout
            assert control.query_status(old.pid)["master"]["state"] == "stopping"
        (tmp_path / "release").touch()
        assert old.popen.wait(30) == 0  # (its output pipe: the new master has it too)
        result = run_wsfleet(["stop", "--port", str(port)])
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"master {new} stopped\n"
        assert gone(new)
    finally:
        if new is not None:
            harness.end(new)


def streams(pid: int) -> list[str]:
    """What a process's standard output and error are."""
    return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)]


def test_daemon_without_a_log_file_logs_to_wsfleet_log_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    result = run_wsfleet(["start", "--daemon", "-w", "1", "--port", str(port)], cwd=tmp_path)
    pid = None
    with contextlib.suppress(control.ControlError):
        pid = control.Locator(addresses=(Address("127.0.0.1", port),)).pid()
    log = tmp_path / "wsfleet.log"
    try:
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [
            f"listening on ws://127.0.0.1:{port}",
            f"logging to {log}",
        ]
        assert pid is not None
        text = run_wsfleet(["status", "--port", str(port)]).stdout
        assert f"\nlog: {log}" in text
        # Its standard output and error are the log file (the kernel says so), and follow
        # it when USR1 reopens it after a rotation.
        pids = [pid, *(w["pid"] for w in status("--port", str(port))["workers"])]
        assert all(streams(p) == [str(log)] * 2 for p in pids)
        log.rename(tmp_path / "wsfleet.log.1")
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: log.exists() and log.read_text().count("reopened log file") == 2)
        assert all(streams(p) == [str(log)] * 2 for p in pids)
        result = run_wsfleet(["stop", "--port", str(port)])
        assert result.returncode == 0, result.stderr
        assert gone(pid)
        assert f"master {pid} exiting" in log.read_text()
        # What the detached master wrote to its standard error is in the log too.
        assert f"listening on ws://127.0.0.1:{port}" in (tmp_path / "wsfleet.log.1").read_text()
    finally:
        if pid is not None:
            harness.end(pid)


def test_daemon_says_when_its_default_log_cannot_be_opened() -> None:
    """In a directory where no file can be made (even by root: /proc), --daemon without
    --log-file is refused before it detaches, naming the file and the option."""
    result = run_wsfleet(["start", "--daemon", "-w", "1", "--port", "0"], cwd=Path("/proc"))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        "wsfleet: error: --daemon logs to /proc/wsfleet.log when no --log-file is given: "
        "cannot open it: "
    )
    assert line.endswith("; give --log-file FILE")
