"""Crashes and faults, with real processes: the master never makes things worse.

The decisions behind these (crash classification, deadlines, fork retries) are also unit-tested
against a fake process layer in test_fleet.py; here each behaviour is checked end to end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from wsfleet import control
from wsfleet.fleet import KILL_GRACE

from .support.harness import gone, wait_for
from .support.helpers import HANGING_APP, Master, app_master, echo_once, run_wsfleet


def ready_workers(master: Master) -> dict[int, dict[str, object]]:
    return {w["pid"]: w for w in master.status()["workers"] if w["state"] == "ready"}


def test_a_worker_that_served_is_replaced_at_once_every_time(spawn, tmp_path: Path) -> None:
    """No backoff for a worker that served longer than --start-seconds (1 s), however often
    it dies: each replacement is ready within a second of the kill."""
    master = Master(spawn, tmp_path, "-w", "2")
    for _ in range(4):
        wait_for(
            lambda: (
                len(ready := ready_workers(master)) == 2
                and min(w["age"] for w in ready.values()) >= 1.3
            ),
            what="two workers that served longer than --start-seconds",
        )
        victim = min(ready_workers(master))
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda victim=victim: len(ready := ready_workers(master)) == 2 and victim not in ready,
            timeout=5,
            what="the replacement to be ready",
        )
        assert time.monotonic() - killed < 1.0


LINGERING_APP = """
import asyncio


async def handler(websocket):
    try:
        async for message in websocket:
            await websocket.send(message)
    finally:
        await asyncio.sleep(4)  # a handler that takes a while to finish
"""


def test_graceful_shutdown_refuses_new_connections_at_once(spawn, tmp_path: Path) -> None:
    """While the last handler finishes, a new connection (or a health probe) is refused, not
    left hanging in an accept queue that nobody serves."""
    master = app_master(spawn, tmp_path, LINGERING_APP, "-w", "2", "--graceful-timeout", "10")
    with connect(master.url) as ws:
        ws.send("x")
        ws.recv(timeout=5)
        master.proc.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", master.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # queued on a socket as it closed: not refused yet
            return False
        return False

    wait_for(refused, timeout=2, what="new connections to be refused")
    assert master.proc.popen.poll() is None  # the master still waits for that handler
    assert master.proc.wait(timeout=15) == 0


SLOW_START_APP = """
import time

time.sleep(1.5)  # a slow import: the workers are starting for a while


async def handler(websocket):
    async for message in websocket:
        await websocket.send(message)
"""


def test_usr1_while_workers_start_kills_nobody(spawn, tmp_path: Path) -> None:
    """A log rotation's USR1 that reaches workers before their handlers are installed."""
    (tmp_path / "app.py").write_text(SLOW_START_APP)
    pidfile = str(tmp_path / "m.pid")
    proc = spawn(
        "start",
        "-w",
        "2",
        "--port",
        "0",
        "--pidfile",
        pidfile,
        "--app",
        "app:handler",
        cwd=tmp_path,
    )
    wait_for(lambda: len(proc.workers()) == 2, what="the workers to be forked")
    starting = {child.pid for child in proc.workers()}
    for _ in range(3):
        proc.signal(signal.SIGUSR1)  # the master passes it on to every worker
        for pid in starting:
            os.kill(pid, signal.SIGUSR1)
    proc.wait_ready(timeout=20)
    assert {child.pid for child in proc.workers()} == starting


def test_usr1_with_its_log_directory_gone_keeps_the_old_log(spawn, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    master = Master(spawn, tmp_path, "-w", "1", "--log-file", str(logs / "wsfleet.log"))
    (worker,) = master.worker_pids()
    shutil.rmtree(logs)
    master.proc.signal(signal.SIGUSR1)

    def old_log() -> str:  # the deleted file, still open in the master
        for fd in Path(f"/proc/{master.proc.pid}/fd").iterdir():
            if os.readlink(fd).endswith("wsfleet.log (deleted)"):
                return fd.read_text()
        return ""

    wait_for(lambda: "cannot reopen log file" in old_log(), what="the reason in the old log")
    assert master.worker_pids() == {worker}
    assert echo_once(master.url) == "hi"


GARBLING_APP = """
import gc

from wsfleet.worker import Worker


async def handler(websocket):
    async for message in websocket:
        worker = next(o for o in gc.get_objects() if isinstance(o, Worker))
        for data in (b"[]", b'{"t":"hb","conns":null}', b"[" * 100000 + b"]" * 100000, b"\\xff"):
            worker.channel.send(data)
        await websocket.send(message)
"""


def test_malformed_channel_messages_are_ignored(spawn, tmp_path: Path) -> None:
    master = app_master(spawn, tmp_path, GARBLING_APP, "-w", "2")
    workers = master.worker_pids()
    assert echo_once(master.url, "garble") == "garble"
    master.proc.wait_line("sent a malformed message")
    assert master.worker_pids() == workers
    assert master.status()["master"]["state"] == "running"


def test_a_reloads_old_worker_that_hangs_is_killed_and_the_reload_ends(spawn, tmp_path) -> None:
    """A reload's old worker whose loop is blocked never says it stopped accepting (held): it
    is killed once its heartbeats are overdue (--timeout), as a serving worker would be, and
    the new worker serves. (A draining worker that hangs is killed at its drain limit:
    test_stragglers_are_killed_after_the_drain_limit.)"""
    options = ("--timeout", "3", "--drain-window", "0")
    master = app_master(spawn, tmp_path, HANGING_APP, "-w", "1", *options)
    (old,) = master.worker_pids()
    with connect(master.url) as ws:
        ws.send("hang")
        began = time.monotonic()
        master.proc.signal(signal.SIGHUP)
        wait_for(
            lambda: any(w["state"] == "holding" for w in master.status()["workers"]),
            what="the old worker to be told to hold",
        )
        wait_for(lambda: gone(old), 3 + KILL_GRACE + 10, "the hung old worker's kill")
        assert time.monotonic() - began > 3 - 1.5  # its last heartbeat came before the hang
    assert master.status()["master"]["last_restart"] == "done"
    assert echo_once(master.url) == "hi"


def test_start_refuses_a_port_another_master_listens_on(spawn, tmp_path: Path) -> None:
    first = Master(spawn, tmp_path, "-w", "1")
    result = run_wsfleet(["start", "-w", "1", "--port", str(first.port)])
    assert result.returncode == 1
    assert f"address 127.0.0.1:{first.port} is already in use" in result.stderr


def test_start_refuses_a_port_a_worker_shares_but_workers_still_share(spawn) -> None:
    alone = spawn("worker", "--port", "0")
    port = alone.wait_ready()
    result = run_wsfleet(["start", "-w", "1", "--port", str(port)])
    assert result.returncode == 1, result.stderr
    assert f"address 127.0.0.1:{port} is already in use" in result.stderr
    spawn("worker", "--port", str(port)).wait_ready()  # as supervisord runs them


def test_the_pidfile_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "wsfleet.pid"
    link.symlink_to(victim)
    result = run_wsfleet(["start", "-w", "1", "--port", "0", "--pidfile", str(link)])
    assert result.returncode == 1
    assert f"pidfile {link} is a symbolic link" in result.stderr
    assert victim.read_text() == "precious\n"


def test_the_status_socket_answers_only_its_user_and_root(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "1")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # another user's client: the same address, from uid nobody
        answer = b"error"
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect(control.status_address(master.proc.pid))
                answer = b"answered" if client.recv(65536) else b"refused"
        except BaseException as exc:
            answer = repr(exc).encode()
        finally:
            os.write(write_end, answer)
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == b"refused"
    assert master.status()["master"]["pid"] == master.proc.pid  # root is answered


def test_status_trusts_only_the_pid_that_the_pidfile_names(tmp_path: Path) -> None:
    """A process that squats the status socket's name of a master gets no trust."""
    title = (
        "import setproctitle, time; setproctitle.setproctitle('wsfleet: master'); time.sleep(60)"
    )
    fake = subprocess.Popen([sys.executable, "-c", title])
    try:
        wait_for(lambda: control.is_master(fake.pid), what="the fake master's title")
        pidfile = tmp_path / "m.pid"
        pidfile.write_text(f"{fake.pid}\n")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
            squatter.bind(control.status_address(fake.pid))  # this test process holds it
            squatter.listen(1)
            result = run_wsfleet(["status", "--pidfile", str(pidfile)])
        assert result.returncode == 1
        assert f"held by another process (pid {os.getpid()})" in result.stderr
    finally:
        fake.kill()
        fake.wait(10)
    assert not psutil.pid_exists(fake.pid) or gone(fake.pid)


def test_scaling_down_during_a_rolling_restart_finishes_it(spawn, tmp_path: Path) -> None:
    """TTOU while a rolling restart is under way: the cursor skips the removed slot, and the
    restart ends with the configured number of workers, all new."""
    master = app_master(spawn, tmp_path, SLOW_START_APP, "-w", "3")
    old = master.worker_pids()
    master.proc.signal(signal.SIGHUP)
    wait_for(
        lambda: master.status()["master"]["last_restart"] == "in progress",
        what="the rolling restart to begin",
    )
    master.proc.signal(signal.SIGTTOU)

    def done() -> bool:
        status = master.status()
        ready = {w["pid"] for w in status["workers"] if w["state"] == "ready"}
        return status["master"]["last_restart"] == "done" and len(ready) == 3 and not ready & old

    wait_for(done, timeout=30, what="the restart to end with 3 new workers")
    wait_for(lambda: len(master.worker_pids()) == 3, what="the old workers to leave")
    assert echo_once(master.url) == "hi"


def test_a_failed_fork_is_retried_and_the_master_goes_on(spawn, tmp_path: Path) -> None:
    """fork() fails with EAGAIN at a pids limit (a cgroup this test makes): the master logs it,
    keeps serving, and the slot gets its worker once the limit allows."""
    master = Master(spawn, tmp_path, "-w", "1")
    (worker,) = master.worker_pids()
    group = Path(f"/sys/fs/cgroup/pids/wsfleet-test-{os.getpid()}-{master.proc.pid}")
    group.mkdir()
    try:
        for pid in (master.proc.pid, worker):
            (group / "cgroup.procs").write_text(f"{pid}\n")
        (group / "pids.max").write_text("2\n")  # the master and its worker: no room to fork
        master.proc.signal(signal.SIGTTIN)
        master.proc.wait_line(r"cannot start a worker for slot 1: .*Resource temporarily")
        assert master.status()["master"]["workers"] == 2  # the slot is there, waiting
        assert echo_once(master.url) == "hi"  # slot 0 serves (and accepts for slot 1)
        (group / "pids.max").write_text("max\n")
        master.wait_workers(2, timeout=10)
    finally:
        master.proc.kill()
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), what="an empty group")
        group.rmdir()


def test_a_worker_terminated_from_outside_is_replaced_at_once(spawn, tmp_path: Path) -> None:
    """kill -TERM of a worker (not through the master): it drains, tells the master, and its
    slot gets a new worker at once instead of waiting for the drain to end."""
    master = app_master(spawn, tmp_path, LINGERING_APP, "-w", "1", "--graceful-timeout", "10")
    (worker,) = master.worker_pids()
    with connect(master.url) as ws:
        ws.send("x")
        ws.recv(timeout=5)
        os.kill(worker, signal.SIGTERM)  # its handler then lingers 4 s: it drains that long
        wait_for(
            lambda: any(pid != worker for pid in ready_workers(master)),
            timeout=5,
            what="a new worker for the slot",
        )
        states = {w["pid"]: w["state"] for w in master.status()["workers"]}
        assert states[worker] == "draining"
        assert echo_once(master.url) == "hi"
