"""--bind (TCP over IPv4 and IPv6, and Unix sockets) and --umask (docs/options.md), with real
masters and workers, real clients, and the sockets seen in the kernel's tables."""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import time
from pathlib import Path

import psutil
import pytest

from wsfleet import control

from .support.harness import gone, wait_for
from .support.helpers import (
    CRASHING_APP,
    Master,
    app_master,
    echo_once,
    run_wsfleet,
    tcp_listeners,
    unix_echo,
)
from .support.loadtest import Load


def three_addresses(tmp_path: Path) -> list[str]:
    return ["127.0.0.1:0", "[::1]:0", f"unix:{tmp_path / 'ws.sock'}"]


def bind_args(addresses: list[str]) -> list[str]:
    return [arg for address in addresses for arg in ("--bind", address)]


def test_every_address_is_served_one_tcp_socket_per_slot_one_unix_socket(spawn, tmp_path) -> None:
    path = tmp_path / "ws.sock"
    master = Master(spawn, tmp_path, "-w", "2", *bind_args(three_addresses(tmp_path)))
    master.proc.wait_line(rf"listening on unix:{path}$")  # the last
    lines = [line for line in master.proc.lines if line.startswith("listening on ")]
    urls = master.status()["master"]["addresses"]
    assert lines == [f"listening on {url}" for url in urls]  # one per address, in order
    assert urls[0].startswith("ws://127.0.0.1:") and urls[1].startswith("ws://[::1]:")
    assert urls[2] == f"unix:{path}"
    for url in urls[:2]:
        assert echo_once(url) == "hi"
    assert unix_echo(path) == "hi"
    # The master holds one socket per slot on each TCP address; the Unix socket is a file
    # with the default mode (umask 0o117), owned by the master's user.
    v4, v6 = (url.removeprefix("ws://") for url in urls[:2])
    assert tcp_listeners(master.proc.pid) == {v4: 2, v6: 2}
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    # Each worker accepts on its slot's TCP sockets and on the shared Unix socket.
    for pid in master.worker_pids():
        assert tcp_listeners(pid) == {v4: 1, v6: 1}
    assert master.stop() == 0
    assert not path.exists()  # removed at exit


def test_reload_and_a_kill_under_load_on_every_address_fail_nothing(spawn, tmp_path, loop) -> None:
    path = tmp_path / "ws.sock"
    master = Master(
        spawn, tmp_path, "-w", "2", "--loop", loop, *bind_args(three_addresses(tmp_path))
    )
    tcp = master.status()["master"]["addresses"][:2]
    loads = [Load(url, rate=50, long_lived=10, duration=60) for url in tcp]
    loads.append(Load("ws://localhost/", rate=50, long_lived=10, duration=60, unix=str(path)))

    def reopened(load: Load) -> int:
        return sum(a.kind == "long" and a.outcome == "ok" for a in load.results.attempts)

    def each_made(count: int, since: float = 0.0) -> bool:
        return all(sum(a.start >= since for a in load.results.attempts) >= count for load in loads)

    try:
        for load in loads:
            load.start()
        wait_for(lambda: each_made(25), what="25 attempts on each address")
        master.rolling_restart()
        # Every long-lived connection closed by the reload has reconnected: the kill below
        # then finds no reconnection half-way through its handshake.
        wait_for(lambda: all(reopened(load) >= 20 for load in loads), what="reconnections")
        victim = min(master.worker_pids())
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), what="the victim to die")
        killed = time.monotonic()
        master.wait_workers(2)
        wait_for(lambda: each_made(25, killed), what="25 attempts on each address after")
    finally:
        results = [load.stop() for load in loads]
    for result in results:
        summary = result.summary()
        # Only connections the killed worker had accepted may fail: kill -9 gives it no
        # chance to answer them.
        assert all(a.start < killed for a in result.failures()), summary
        assert len(result.failures()) <= 3, summary
        assert result.close_codes["closed 1012"] >= 10, summary  # the reload closed them


def test_a_crash_looping_slot_lends_every_tcp_address(spawn, tmp_path: Path) -> None:
    addresses = ["127.0.0.1:0", "[::1]:0"]
    master = app_master(spawn, tmp_path, CRASHING_APP, "-w", "2", *bind_args(addresses))
    urls = master.status()["master"]["addresses"]
    healthy, victim = sorted(master.worker_pids())
    (tmp_path / "crash").write_text("")  # every new worker now dies while importing
    os.kill(victim, signal.SIGKILL)
    master.proc.wait_line(r"died \(exit status 4\) .*4 times in a row.*restarting in")

    def lent() -> bool:
        workers = master.status()["workers"]
        return [(w["pid"], w["borrowed_slots"]) for w in workers] == [(healthy, [1])]

    wait_for(lent, what="the healthy worker to accept for slot 1")
    # The healthy worker holds both slots' sockets on each address; a connection that hashed
    # to the crashing slot's socket and waited for it would miss the 1 s timeout.
    assert set(tcp_listeners(healthy).values()) == {2}
    for url in urls:
        for _ in range(20):
            assert echo_once(url, "still served", timeout=1.0) == "still served"
    os.unlink(tmp_path / "crash")
    master.wait_workers(2, timeout=30)


def connect_as(uid: int, gid: int, path: Path) -> str:
    """Connect to a Unix socket from a forked process with these ids (and no other group):
    'connected', or the error's name."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        answer = "error"
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(5)
                client.connect(str(path))
                answer = "connected"
        except BaseException as exc:
            answer = type(exc).__name__
        finally:
            os.write(write_end, answer.encode())
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def test_unix_socket_mode_owner_and_what_is_at_its_path(spawn, tmp_path, socket_dir) -> None:
    path = socket_dir / "ws.sock"
    nogroup = grp.getgrnam("nogroup").gr_gid
    args = ("--bind", f"unix:{path}", "--bind", "127.0.0.1:0", "-w", "1")
    master = Master(spawn, tmp_path, *args, "--group", "nogroup")
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == nogroup  # umask 0o117
    assert connect_as(65534, nogroup, path) == "connected"  # in the socket's group
    assert connect_as(1, 1, path) == "PermissionError"  # anyone else
    # Another master on the same path: refused while this one answers, the file untouched.
    other = run_wsfleet(["start", "-w", "1", "--bind", f"unix:{path}"])
    assert other.returncode == 1, other.stderr
    assert f"unix:{path} is in use by a running server" in other.stderr
    assert path.stat().st_ino == info.st_ino and unix_echo(path) == "hi"
    # A kill -9 leaves the file behind: the next start replaces it.
    workers = master.proc.children()
    master.proc.popen.kill()
    master.proc.wait()
    for worker in workers:
        worker.kill()
    psutil.wait_procs(workers, timeout=10)
    assert path.exists()
    master = Master(spawn, tmp_path, *args, "--umask", "177")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert connect_as(65534, nogroup, path) == "PermissionError"
    assert unix_echo(path) == "hi"
    assert master.stop() == 0 and not path.exists()
    # A path that is not a socket is never removed.
    path.write_text("data")
    result = run_wsfleet(["start", "-w", "1", "--bind", f"unix:{path}"])
    assert result.returncode == 1 and "exists and is not a socket" in result.stderr
    assert path.read_text() == "data"


def test_worker_serves_its_addresses_and_removes_its_unix_socket(spawn, tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    proc = spawn("worker", "--bind", f"unix:{path}", "--bind", "127.0.0.1:0")
    port = proc.wait_ready()
    proc.wait_line(rf"listening on unix:{path}$")
    assert unix_echo(path) == "hi" and echo_once(f"ws://127.0.0.1:{port}/") == "hi"
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert not path.exists()


def test_unix_only_fleet_serves_through_a_reload(spawn, tmp_path: Path) -> None:
    """No TCP address: the workers share the Unix socket, and nothing is lent."""
    path = tmp_path / "ws.sock"
    proc = spawn("start", "-w", "2", "--bind", f"unix:{path}", "--pidfile", str(tmp_path / "p"))
    proc.wait_line(rf"^listening on unix:{path}$")
    assert [line for line in proc.lines if line.startswith("listening")] == [
        f"listening on unix:{path}"
    ]
    pidfile = str(tmp_path / "p")
    old = {w["pid"] for w in control.query_status(control.master_pid(pidfile))["workers"]}
    load = Load("ws://localhost/", rate=50, long_lived=10, duration=60, unix=str(path)).start()
    try:
        assert run_wsfleet(["reload", "--wait", "--pidfile", pidfile]).returncode == 0

        def old_gone() -> bool:  # their connections closed over the drain window
            status = control.query_status(control.master_pid(pidfile))
            return not {w["pid"] for w in status["workers"]} & old

        wait_for(old_gone, 30, "the old workers to drain")
        closed = load.results.close_codes
        wait_for(lambda: closed["closed 1012"] >= 10, 10, "the clients to see their 1012")
    finally:
        results = load.stop()
    assert results.failures() == [], results.summary()
    assert results.close_codes["closed 1012"] >= 10, results.summary()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bind", "8765"], "argument --bind: expected HOST:PORT, [V6ADDR]:PORT or unix:PATH"),
        (["--bind", "::1:8765"], "put an IPv6 address in brackets"),
        (["--bind", "[::g]:8765"], "'::g' is not an IPv6 address"),
        (["--bind", "127.0.0.1:65536"], "the port must be a number from 0 to 65535"),
        (["--bind", "unix:"], "the path is empty"),
        (["--bind", "unix:/" + "x" * 200], "unix socket path longer than 107 bytes"),
        (["--bind", "a:1", "--bind", "a:1"], "argument --bind: a:1 is given twice"),
        (["--umask", "0o800"], "argument --umask: expected an octal mask such as 0o117"),
        (["--umask", "0o1777"], "expected an octal mask from 0o000 to 0o777"),
        (["--fd", "3", "--bind", "127.0.0.1:0"], "--fd and --bind: give one"),
    ],
)
def test_bad_bind_or_umask_is_exit_2_on_one_line(args: list[str], message: str) -> None:
    commands = ["worker"] if "--fd" in args else ["start", "worker"]
    for command in commands:
        result = run_wsfleet([command, *args])
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_bind_from_toml_and_environment(spawn, tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    (tmp_path / "w.toml").write_text(f'bind = ["127.0.0.1:0", "unix:{path}"]\numask = 0o007\n')
    proc = spawn("worker", "--config", str(tmp_path / "w.toml"))
    proc.wait_ready()
    proc.wait_line(rf"listening on unix:{path}$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o770
    env_path = tmp_path / "e.sock"
    proc = spawn("worker", env={"WSFLEET_BIND": f"[::1]:0,unix:{env_path}"})
    proc.wait_line(r"listening on ws://\[::1\]:\d+$")
    proc.wait_line(rf"listening on unix:{env_path}$")
    assert unix_echo(env_path) == "hi"
    (tmp_path / "bad.toml").write_text('bind = ["127.0.0.1"]\n')
    result = run_wsfleet(["worker", "--config", str(tmp_path / "bad.toml")])
    assert result.returncode == 2 and "bad.toml:1: bind: expected HOST:PORT" in result.stderr


def test_tcp_bind_taken_by_another_program_is_exit_1_naming_it() -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in ("start", "worker"):
            result = run_wsfleet([command, "--bind", "127.0.0.1:0", "--bind", f"[::1]:{port}"])
            assert result.returncode == 1, result.stderr
            assert f"address [::1]:{port} is already in use" in result.stderr
