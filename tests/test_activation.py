"""Socket activation (LISTEN_FDS, LISTEN_PID; docs/deployment.md, systemd), with the real
systemd-socket-activate (Debian's systemd package) binding the address and starting wsfleet as
systemd would, and the sockets seen in the kernel's tables."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil

from wsfleet import control

from .support.harness import free_port, wait_for
from .support.helpers import ACTIVATE, WSFLEET, echo_once, run_wsfleet, tcp_listeners, unix_echo


def listening_sockets(pid: int, port: int) -> set[int]:
    """The inodes of the listening TCP sockets on port that the process holds."""
    found = set()
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr[1] == port:
            found.add(os.stat(f"/proc/{pid}/fd/{conn.fd}").st_ino)
    return found


def test_start_serves_the_socket_systemd_passes(spawn, tmp_path: Path) -> None:
    port, pidfile = free_port(), str(tmp_path / "wsfleet.pid")
    proc = spawn(
        "start",
        "-w",
        "2",
        "--pidfile",
        pidfile,
        "--bind",
        "127.0.0.1:1",  # ignored, said so: the passed socket is served
        program=(*ACTIVATE, "-l", f"127.0.0.1:{port}", *WSFLEET),
    )
    proc.wait_line(f"Listening on 127.0.0.1:{port} as 3")
    # As with a socket unit, the first connection starts wsfleet; it waits in the socket's
    # queue meanwhile, and is served.
    assert echo_once(f"ws://127.0.0.1:{port}/", timeout=15) == "hi"
    assert proc.wait_ready() == port
    assert proc.pid == control.read_pid(pidfile)  # systemd-socket-activate execs wsfleet
    proc.wait_line("--bind ignored: serving the 1 socket systemd passed")
    status = control.query_status(proc.pid)
    assert status["master"]["addresses"] == [f"ws://127.0.0.1:{port}"]
    workers = [w["pid"] for w in status["workers"]]
    assert len(workers) == 2
    # One socket, systemd's, accepted on by both workers; the master binds nothing.
    (shared,) = listening_sockets(proc.pid, port)
    assert all(listening_sockets(pid, port) == {shared} for pid in workers)
    for _ in range(5):
        assert echo_once(f"ws://127.0.0.1:{port}/") == "hi"
    # A rolling restart keeps serving on it.
    assert run_wsfleet(["reload", "--wait", "--pidfile", pidfile]).returncode == 0
    assert echo_once(f"ws://127.0.0.1:{port}/") == "hi"
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_as_many_passed_sockets_as_workers_are_one_per_slot(spawn, tmp_path: Path) -> None:
    """What a socket unit with ReusePort=yes and one ListenStream= per worker passes (here
    from a launcher that speaks the same protocol: systemd-socket-activate binds each
    address once). Their order in the kernel's group is unknown: --balance least-connections
    leaves the placing to the kernel's hash, and says so."""
    port = free_port()
    setup = f"""
for fd in (3, 4):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", {port}))
    s.listen(64)
    os.dup2(s.detach(), fd)
    count += 1
"""
    pidfile = str(tmp_path / "wsfleet.pid")
    args = ("-w", "2", "--pidfile", pidfile, "--balance", "least-connections")
    proc = spawn("start", *args, program=launcher(setup))
    assert proc.wait_ready() == port
    balance = control.query_status(proc.pid)["master"]["balance"]
    assert balance == {"mode": "hash", "weights": None}
    passed = listening_sockets(proc.pid, port)
    assert len(passed) == 2
    workers = [w["pid"] for w in control.query_status(proc.pid)["workers"]]
    held = [listening_sockets(pid, port) for pid in workers]
    assert all(len(h) == 1 for h in held) and set.union(*held) == passed  # one slot each
    # A third slot gets a socket of its own on the same address (SO_REUSEPORT).
    proc.signal(signal.SIGTTIN)
    wait_for(lambda: len(control.query_status(proc.pid)["workers"]) == 3, 15, "3 workers")
    assert tcp_listeners(proc.pid) == {f"127.0.0.1:{port}": 3}
    assert echo_once(f"ws://127.0.0.1:{port}/") == "hi"
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_passed_unix_socket_is_served_and_left_to_its_owner(spawn, tmp_path: Path) -> None:
    path = tmp_path / "ws.sock"
    proc = spawn("start", "-w", "2", program=(*ACTIVATE, "-l", str(path), *WSFLEET))
    proc.wait_line(f"Listening on {path} as 3")
    assert unix_echo(path, timeout=15) == "hi"  # started by this first connection
    proc.wait_line(f"listening on unix:{path}$")
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert path.exists()  # systemd's file, not wsfleet's: not removed


def test_worker_serves_the_first_passed_socket(spawn) -> None:
    first, second = free_port(), free_port()
    proc = spawn(
        "worker",
        program=(*ACTIVATE, "-l", f"127.0.0.1:{first}", "-l", f"127.0.0.1:{second}", *WSFLEET),
    )
    proc.wait_line(f"Listening on 127.0.0.1:{second} as 4")
    assert echo_once(f"ws://127.0.0.1:{first}/", timeout=15) == "hi"
    assert proc.wait_ready() == first
    proc.wait_line(f"serving the first socket systemd passed \\(127.0.0.1:{first}\\)")
    assert echo_once(f"ws://127.0.0.1:{first}/") == "hi"
    assert tcp_listeners(proc.pid) == {f"127.0.0.1:{first}": 1}  # the other one closed
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def launcher(setup: str, listen_pid: str = "os.getpid()") -> tuple[str, ...]:
    """python -c: run setup (which puts descriptors at 3, 4, ... and counts them), set
    LISTEN_FDS and LISTEN_PID as systemd does, and exec wsfleet with the arguments given."""
    code = f"""
import os, socket, sys
count = 0
{setup}
for fd in range(3, 3 + count):
    os.set_inheritable(fd, True)  # (dup2 onto itself leaves it close-on-exec)
os.environ.update(LISTEN_FDS=str(count), LISTEN_PID=str({listen_pid}))
os.execv(sys.executable, [sys.executable, "-m", "wsfleet", *sys.argv[1:]])
"""
    return (sys.executable, "-c", code)


def test_sockets_passed_to_another_process_are_not_taken(spawn) -> None:
    """LISTEN_PID names another process (the variables leaked from a parent): wsfleet binds
    its own address and leaves descriptor 3 alone."""
    other = free_port()
    setup = f"""
s = socket.socket()
s.bind(("127.0.0.1", {other}))
s.listen()
os.dup2(s.detach(), 3)
count = 1
"""
    proc = spawn("start", "-w", "1", "--port", "0", program=launcher(setup, listen_pid="1"))
    port = proc.wait_ready()
    assert port != other
    assert echo_once(f"ws://127.0.0.1:{port}/") == "hi"
    assert tcp_listeners(proc.pid) == {f"127.0.0.1:{port}": 1, f"127.0.0.1:{other}": 1}
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_passed_descriptor_that_is_not_a_listening_socket_is_exit_1(spawn) -> None:
    proc = spawn("start", program=launcher("os.dup2(os.pipe()[0], 3); count = 1"))
    assert proc.wait(30) == 1
    assert "socket activation (LISTEN_FDS=1): file descriptor 3 is not a socket" in proc.output
