"""Upgrading wsfleet itself (SIGUSR2, `wsfleet upgrade`; docs/operations.md). The master
runs from a copy of the package put first on PYTHONPATH, as an installed wsfleet would be; the
test changes that copy (a new version, a broken build) the way installing a new version would,
and the new master must run what is on disk then."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from wsfleet import control
from wsfleet.notify import READY

from .support import harness
from .support.harness import gone, wait_for
from .support.helpers import (
    VERSIONED_APP,
    Master,
    echo_once,
    installed,
    new_masters,
    run_wsfleet,
    set_version,
    unix_echo,
    write_app,
)
from .support.loadtest import Load


def start(spawn, tmp_path: Path, site: Path, *args: str, env: dict[str, str] | None = None):
    return Master(
        spawn,
        tmp_path,
        *args,
        cwd=tmp_path,  # (not the repository: `python -m wsfleet` would import it from there)
        env={"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
    )


def upgrade(master: Master, timeout: float = 120):
    return run_wsfleet(["upgrade", "--pidfile", master.pidfile], timeout=timeout)


def test_upgrade_under_load_fails_nothing(spawn, tmp_path: Path, loop: str) -> None:
    site = installed(tmp_path)
    master = start(spawn, tmp_path, site, "-w", "2", "--loop", loop, "--drain-window", "2")
    old_workers = master.worker_pids()
    set_version(site, "0.1.0+upgraded")  # what installing a new version leaves on disk
    with new_masters(master):
        load = Load(master.url, rate=150, long_lived=50, duration=60).start()
        try:
            time.sleep(0.5)  # load before the upgrade, for the record (not a wait)
            result = upgrade(master)
            assert result.returncode == 0, result.stderr
            new = control.read_pid(master.pidfile)
            # The old master exits once its workers have closed their connections.
            assert master.proc.popen.wait(30) == 0  # (its output pipe: the new one has it too)
            time.sleep(0.5)  # load after the upgrade, for the record
        finally:
            results = load.stop()
        summary = results.summary()
        assert results.failures() == [], summary
        assert summary["attempts"] >= 150, summary  # the load ran
        # Every long-lived connection was closed once, with 1012, and reconnected.
        assert set(results.close_codes) == {"closed 1012"}, summary
        assert results.close_codes["closed 1012"] >= 50, summary
        assert f"master {new} (wsfleet 0.1.0+upgraded) serves" in result.stdout
        status = control.query_status(new)
        assert status["master"]["version"] == "0.1.0+upgraded"
        assert status["master"]["restarts_by_reason"]["upgrade"] == 2
        assert {w["state"] for w in status["workers"]} == {"ready"}
        assert not {w["pid"] for w in status["workers"]} & old_workers
        assert all(gone(pid) for pid in old_workers)
        assert echo_once(master.url) == "hi"
        assert run_wsfleet(["stop", "--pidfile", master.pidfile]).returncode == 0
        assert gone(new)


def test_a_new_master_that_cannot_start_leaves_the_old_one_serving(spawn, tmp_path) -> None:
    site = installed(tmp_path)
    (tmp_path / "app.py").write_text(VERSIONED_APP.format(version="v1"))
    master = start(spawn, tmp_path, site, "-w", "2", "--app", "app:handler")
    workers = master.worker_pids()

    def serving_as_before() -> None:
        assert control.read_pid(master.pidfile) == master.proc.pid
        assert master.worker_pids() == workers
        assert echo_once(master.url, "version?") == "v1"
        # The new master is reaped: the old master's children are its workers again.
        wait_for(lambda: {p.pid for p in master.proc.workers()} == workers, 30, "no orphan")

    with new_masters(master):
        # Its workers cannot import the app: the new master says why, and exits.
        (tmp_path / "app.py").write_text("def broken(:\n")
        result = upgrade(master)
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert f"master {master.proc.pid}: upgrade failed: cannot start: worker" in line, line
        assert "cannot import --app app:handler: SyntaxError" in line, line
        assert line.endswith("it goes on serving")
        (tmp_path / "app.py").write_text(VERSIONED_APP.format(version="v1"))
        serving_as_before()
        # A broken build: the new master dies before it can say anything.
        cli = site / "wsfleet" / "cli.py"
        good = cli.read_text()
        cli.write_text('raise RuntimeError("a broken build")\n' + good)
        result = upgrade(master)
        assert result.returncode == 1
        assert "exited (exit status 1) before it was ready" in result.stderr, result.stderr
        serving_as_before()
        status = run_wsfleet(["status", "--pidfile", master.pidfile]).stdout
        assert "last upgrade: failed: new master" in status
        # Fixed: the next upgrade goes through.
        cli.write_text(good)
        result = upgrade(master)
        assert result.returncode == 0, result.stderr
        assert master.proc.popen.wait(30) == 0  # (its output pipe: the new one has it too)
        assert echo_once(master.url, "version?") == "v1"


def received_with_pid(notify: socket.socket) -> tuple[int, str]:
    """One sd_notify datagram and the pid of its sender (SCM_CREDENTIALS), as systemd reads
    it to decide whether the main process sent it (NotifyAccess=main)."""
    data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return struct.unpack("3i", payload)[0], data.decode()
    raise AssertionError("no credentials")


def test_sigusr2_tells_systemd_the_new_main_pid_which_keeps_the_watchdog(spawn, tmp_path) -> None:
    site = installed(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.settimeout(15)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
        master = start(spawn, tmp_path, site, "-w", "2", "--drain-window", "0", env=env)
        old = master.proc.pid
        with new_masters(master):
            master.proc.signal(signal.SIGUSR2)
            said: list[tuple[int, str]] = []
            while not any(m.startswith("MAINPID=") for pid, m in said if pid == old):
                said.append(received_with_pid(notify))
            new = control.read_pid(master.pidfile)
            assert (old, f"MAINPID={new}") in said  # sent by the old (main) process
            assert master.proc.popen.wait(30) == 0  # (its output pipe: the new one has it too)
            # The new master pings the watchdog, every half WATCHDOG_USEC (0.2 s).
            pings = []
            while len(pings) < 3:
                pid, message = received_with_pid(notify)
                said.append((pid, message))
                if pid == new and "WATCHDOG=1" in message.splitlines():
                    pings.append(time.monotonic())
            assert pings[-1] - pings[0] < 2.0
            # Neither master said it was stopping: systemd would stop the service.
            assert not [m for _, m in said if "STOPPING=1" in m]
            assert run_wsfleet(["stop", "--pidfile", master.pidfile]).returncode == 0
            stopping = False
            while not stopping:  # the new master's last words (bounded by the timeout)
                pid, message = received_with_pid(notify)
                stopping = pid == new and "STOPPING=1" in message.splitlines()
            assert gone(new)


def test_an_upgrade_hands_over_unix_sockets_and_the_metrics_port(spawn, tmp_path) -> None:
    site = installed(tmp_path)
    path, metrics = tmp_path / "ws.sock", f"127.0.0.1:{harness.free_port()}"
    args = [
        "-w",
        "2",
        "--drain-window",
        "3",
        "--drain-rate",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--bind",
        f"unix:{path}",
    ]
    master = start(spawn, tmp_path, site, *args, "--metrics", metrics)
    inode = path.stat().st_ino
    with new_masters(master):
        master.proc.signal(signal.SIGTTIN)  # 3 slots; the configuration says 2
        master.wait_workers(3)
        with contextlib.ExitStack() as stack:
            kept = [stack.enter_context(connect(master.url, open_timeout=5)) for _ in range(6)]
            assert upgrade(master).returncode == 0
            new = control.read_pid(master.pidfile)
            # The old master answers its status while its workers close (metrics handed).
            old = control.query_status(master.proc.pid)["master"]
            assert old["last_upgrade"] == f"done: master {new} serves"
            assert (old["state"], old["metrics"]) == ("stopping", f"http://{metrics}/")
            for ws in kept:
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        assert master.proc.popen.wait(30) == 0  # (its output pipe: the new one has it too)
        # The same socket file (not one made again), kept by the old master at its exit.
        assert path.stat().st_ino == inode
        assert unix_echo(path) == "hi" and echo_once(master.url) == "hi"
        body = urllib.request.urlopen(f"http://{metrics}/status.json", timeout=5).read()
        status = json.loads(body)
        assert status["master"]["pid"] == new
        # The new master started the old master's 3, then went to its configuration's 2.
        assert status["master"]["restarts_by_reason"]["upgrade"] == 3
        wait_for(lambda: len(control.query_status(new)["workers"]) == 2, 30, "2 workers")
        assert run_wsfleet(["stop", "--pidfile", master.pidfile]).returncode == 0
        assert gone(new) and not path.exists()  # the new master's file now: removed


def test_a_new_master_whose_old_one_dies_takes_over_by_itself(spawn, tmp_path) -> None:
    """kill -9 of the old master while the new one starts: the new one serves, the pidfile
    names it, and its own files are its to remove; the old workers drain by themselves."""
    site = installed(tmp_path)
    write_app(tmp_path, "v1")
    master = start(spawn, tmp_path, site, "-w", "2", "--app", "app:handler")
    old_workers = master.worker_pids()
    (tmp_path / "app.py").write_text(SLOW_APP)  # the new workers wait for "go" to import it
    with new_masters(master):
        master.proc.signal(signal.SIGUSR2)
        new = int(master.proc.wait_line(r"upgrade: new master (\d+) starting").group(1))
        wait_for(lambda: (tmp_path / "importing").exists(), 30, "the new workers to import")
        master.proc.signal(signal.SIGKILL)
        master.proc.popen.wait(10)
        (tmp_path / "go").write_text("")  # the new workers' import goes on
        wait_for(lambda: control.read_pid(master.pidfile) == new, 30, "the pidfile to name it")
        # The old workers learn of their master's end on their own, maybe after the new master
        # did: until then one may take a connection and close it at once (1001).
        wait_for(lambda: all(gone(pid) for pid in old_workers), 30, "the old workers to go")
        assert echo_once(master.url, "version?") == "v2-slow"
        assert run_wsfleet(["stop", "--pidfile", master.pidfile]).returncode == 0
        assert gone(new) and not Path(master.pidfile).exists()


SLOW_APP = """
import os, pathlib, time

pathlib.Path("importing").write_text(str(os.getpid()))
for _ in range(3000):  # until the test says go (30 s at most)
    if pathlib.Path("go").exists():
        break
    time.sleep(0.01)
VERSION = "v2-slow"


async def handler(websocket):
    async for message in websocket:
        await websocket.send(VERSION if message == "version?" else message)
"""


def test_a_daemon_master_upgrades_into_a_daemon(tmp_path: Path) -> None:
    """--daemon: the new master does not detach again (the old one is detached already); it
    serves on the same port, picked by the kernel (--port 0) for the old one."""
    pidfile, log = tmp_path / "d.pid", tmp_path / "d.log"
    args = ["start", "--daemon", "-w", "2", "--port", "0", "--pidfile", str(pidfile)]
    started = run_wsfleet([*args, "--log-file", str(log)])
    old = int(pidfile.read_text()) if pidfile.exists() else None
    new = None
    try:
        assert started.returncode == 0, started.stderr
        url = f"ws://127.0.0.1:{READY.search(started.stderr).group(2)}/"  # type: ignore[union-attr]
        result = run_wsfleet(["upgrade", "--pidfile", str(pidfile)], timeout=120)
        assert result.returncode == 0, result.stderr
        new = control.read_pid(str(pidfile))
        assert new != old and control.query_status(new)["master"]["state"] == "running"
        wait_for(lambda: gone(old), 30, "the old master")  # type: ignore[arg-type]
        assert echo_once(url) == "hi"
        assert run_wsfleet(["stop", "--pidfile", str(pidfile)]).returncode == 0
        assert f"took over from master {old}" in log.read_text()
    finally:
        for pid in (old, new):
            if pid is not None:
                harness.end(pid)
