"""`wsfleet start`: the master and its workers as real processes, with real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from wsfleet import config as cfg

from .support.harness import gone, wait_for
from .support.helpers import CRASHING_APP, HANGING_APP, Master, app_master, echo_once, run_wsfleet
from .support.wire import raw_connect, read_http_response, stuck_client, upgrade_request


def test_start_serves_with_titles_and_status(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "3")
    assert echo_once(master.url) == "hi"
    status = master.status()
    assert status["master"]["pid"] == master.proc.pid
    assert status["master"]["state"] == "running"
    assert sorted(w["slot"] for w in status["workers"]) == [0, 1, 2]
    assert all(w["state"] == "ready" for w in status["workers"])
    title = Path(f"/proc/{master.proc.pid}/cmdline").read_bytes()
    assert title.startswith(f"wsfleet: master [127.0.0.1:{master.port}]".encode())
    for w in status["workers"]:
        title = Path(f"/proc/{w['pid']}/cmdline").read_bytes()
        assert title.startswith(f"wsfleet: worker {w['slot']} [127.0.0.1:{master.port}]".encode())
    text = run_wsfleet(["status", "--pidfile", master.pidfile])
    assert text.returncode == 0
    assert text.stdout.count("\nworker ") == 3 and "\nmaster " in text.stdout
    # Connection counts come with heartbeats: the status says how old they may be.
    reported = "(within 0.1s of a change, every 1s at least)"  # (--balance least-connections)
    assert f"connections: as each worker last reported {reported}" in text.stdout
    assert "last rolling restart: none yet" in text.stdout


def test_status_counts_open_connections(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2", "--timeout", "4")  # heartbeat every second
    with contextlib.ExitStack() as stack:
        for _ in range(6):
            ws = stack.enter_context(connect(master.url))
            ws.send("x")
            ws.recv(timeout=5)
        wait_for(
            lambda: sum(w["connections"] for w in master.status()["workers"]) == 6,
            what="status to count 6 connections",
        )


def test_each_slot_socket_gets_its_share(spawn, tmp_path: Path) -> None:
    """One SO_REUSEPORT socket per worker: the kernel spreads connections over all of them."""
    master = Master(spawn, tmp_path, "-w", "3")
    pids = master.worker_pids()
    served: dict[int, int] = {}
    with contextlib.ExitStack() as stack:
        for _ in range(90):
            sock = stack.enter_context(raw_connect(master.port))
            sock.sendall(upgrade_request())
            assert read_http_response(sock)[0] == 101
        # Each worker reports how many it holds.
        wait_for(
            lambda: sum(w["connections"] for w in master.status()["workers"]) == 90,
            what="90 connections counted",
        )
        for w in master.status()["workers"]:
            served[w["pid"]] = w["connections"]
    assert set(served) == pids
    # Binomial(90, 1/3): below 10 has a probability of about 1e-6.
    assert min(served.values()) >= 10, served


def test_queued_connections_survive_their_worker(spawn, tmp_path: Path) -> None:
    """The slot's socket outlives its worker: connections queued while the worker is gone
    are served by the replacement instead of being reset."""
    master = Master(spawn, tmp_path, "-w", "1")
    (worker,) = master.worker_pids()
    os.kill(worker, signal.SIGSTOP)  # it accepts nothing more: connections queue
    with contextlib.ExitStack() as stack:
        try:
            socks = [stack.enter_context(raw_connect(master.port)) for _ in range(20)]
            for sock in socks:
                sock.sendall(upgrade_request())
        finally:
            os.kill(worker, signal.SIGKILL)
        statuses = [read_http_response(sock)[0] for sock in socks]
    assert statuses == [101] * 20
    assert worker not in master.worker_pids()


def test_a_closed_reuseport_listener_resets_its_queue() -> None:
    """The kernel behaviour that the master's socket ownership avoids (tcp_migrate_req=0):
    closing a listener with connections queued on it resets them."""
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        if f.read().strip() != "0":
            pytest.skip("tcp_migrate_req is set: the kernel migrates queued connections")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(raw_connect(port)) for _ in range(5)]
        listener.close()
        for sock in socks:
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                sock.sendall(b"x")
                if not sock.recv(1):
                    raise ConnectionResetError


def test_sigterm_drains_with_1001_removes_pidfile_and_exits_0(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2")
    workers = master.worker_pids()
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(master.url)) for _ in range(8)]
        for ws in clients:
            ws.send("x")
            ws.recv(timeout=5)
        master.proc.signal(signal.SIGTERM)
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert master.proc.wait() == 0
    assert not os.path.exists(master.pidfile)
    assert all(gone(pid) for pid in workers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", master.port), timeout=5).close()


def test_sigquit_stops_at_once(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2", "--graceful-timeout", "60")
    workers = master.worker_pids()
    with stuck_client(master.port):
        master.proc.signal(signal.SIGQUIT)
        assert master.proc.wait(timeout=10) == 0
    assert all(gone(pid) for pid in workers)


def test_stragglers_are_killed_after_the_drain_limit(spawn, tmp_path: Path) -> None:
    """A worker whose loop is blocked cannot abort its connections at its graceful timeout:
    the master kills it drain window + graceful timeout + close timeout + 1 s after its drain
    began."""
    options = ("--graceful-timeout", "1", "--drain-window", "2")
    master = app_master(spawn, tmp_path, HANGING_APP, "-w", "1", *options)
    (worker,) = master.worker_pids()
    limit = cfg.drain_limit(cfg.Config(graceful_timeout=1, drain_window=2))
    with connect(master.url) as ws:
        ws.send("hang")
        started = time.monotonic()
        master.proc.signal(signal.SIGTERM)
        assert master.proc.wait(timeout=limit + 15) == 0
    assert limit <= time.monotonic() - started < limit + 5
    assert gone(worker)


def test_hung_worker_is_killed_and_replaced(spawn, tmp_path: Path) -> None:
    master = app_master(spawn, tmp_path, HANGING_APP, "-w", "1", "--timeout", "2")
    (worker,) = master.worker_pids()
    with connect(master.url) as ws:
        ws.send("hang")
        wait_for(lambda: gone(worker), 15, "the hung worker to be killed")
        master.wait_workers(1)  # (its replacement, ready)
    assert master.worker_pids() != {worker}
    assert master.status()["master"]["restarts_by_reason"]["hung"] == 1
    assert echo_once(master.url) == "hi"


SEND_THEN_HANG_APP = """
import time


async def handler(websocket):
    async for message in websocket:
        await websocket.send("sent before the hang")
        time.sleep(600)  # blocks the event loop: the master kills the worker after --timeout
"""


def test_a_message_sent_before_a_worker_hangs_survives_its_kill(spawn, tmp_path, loop) -> None:
    """No later than under websockets alone: what a handler sent before blocking its loop is
    on the wire, so the master's kill of the hung worker does not take it along."""
    master = app_master(
        spawn, tmp_path, SEND_THEN_HANG_APP, "-w", "1", "--timeout", "2", "--loop", loop
    )
    (worker,) = master.worker_pids()
    with connect(master.url) as ws:
        ws.send("go")
        assert ws.recv(timeout=10) == "sent before the hang"
        wait_for(lambda: gone(worker), 15, "the hung worker's kill")


def test_start_fails_with_the_import_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_dependency\n")
    pidfile = tmp_path / "m.pid"
    result = run_wsfleet(
        ["start", "-w", "2", "--port", "0", "--app", "broken:handler", "--pidfile", str(pidfile)],
        cwd=tmp_path,
    )
    assert result.returncode == 4, result.stderr
    message = result.stderr[result.stderr.index("wsfleet: error: ") :].splitlines()
    assert message[0].startswith("wsfleet: error: cannot start:")
    assert message[0].endswith("No module named 'no_such_dependency' (broken.py, line 1)")
    assert message[-1] == "ModuleNotFoundError: No module named 'no_such_dependency'"
    assert not pidfile.exists()


@pytest.mark.parametrize("detached", [False, True], ids=["foreground", "daemon"])
def test_start_shows_where_the_app_raised(tmp_path: Path, detached: bool) -> None:
    """Any exception at import, not only a SyntaxError: start's message and the log show the
    traceback, the app's frames (file and line) and none of wsfleet's or importlib's."""
    (tmp_path / "app.py").write_text("import helper\n\nasync def handler(websocket): ...\n")
    (tmp_path / "helper.py").write_text("x = 1\ny = undefined_name + x\n")
    log = tmp_path / "m.log"
    args = ["start", "-w", "2", "--port", "0", "--app", "app:handler", "--log-file", str(log)]
    result = run_wsfleet([*args, "--daemon"] if detached else args, cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    first, *traceback = result.stderr.strip().splitlines()
    assert first.startswith("wsfleet: error: cannot start: worker ")
    assert first.endswith(
        "could not start (exit status 4): cannot import --app app:handler: NameError: "
        "name 'undefined_name' is not defined (helper.py, line 2)"
    )
    assert traceback == [
        "Traceback (most recent call last):",
        f'  File "{tmp_path / "app.py"}", line 1, in <module>',
        "    import helper",
        f'  File "{tmp_path / "helper.py"}", line 2, in <module>',
        "    y = undefined_name + x",
        "        ^^^^^^^^^^^^^^",
        "NameError: name 'undefined_name' is not defined",
    ]
    # The log says it once (the master's line), however many workers failed alike.
    text = log.read_text()
    assert text.count("Traceback (most recent call last):") == 1, text
    assert "\n".join(traceback) in text


def test_port_taken_is_exit_1_for_start() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_wsfleet(["start", "-w", "1", "--port", str(port)])
    assert result.returncode == 1
    assert f"address 127.0.0.1:{port} is already in use" in result.stderr


def test_workers_leave_when_the_master_is_killed(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2")
    workers = master.worker_pids()
    try:
        with connect(master.url) as ws:
            ws.send("x")
            ws.recv(timeout=5)
            master.proc.popen.kill()  # kill -9: no chance to tell anyone
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        wait_for(
            lambda: all(gone(pid) for pid in workers),
            timeout=5,
            what="the workers to exit",
        )
        assert time.monotonic() - started < 2.5
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", master.port), timeout=5).close()
    finally:
        for pid in workers:  # orphans are nobody's children: end them by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_ttin_and_ttou_change_the_number_of_workers(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2")
    master.proc.signal(signal.SIGTTIN)
    master.wait_workers(3)
    assert echo_once(master.url) == "hi"
    master.proc.signal(signal.SIGTTOU)
    master.wait_workers(2)  # one at a time: the kernel merges a signal sent twice
    master.proc.signal(signal.SIGTTOU)
    master.wait_workers(1)
    assert master.status()["master"]["workers"] == 1
    assert echo_once(master.url) == "hi"


def test_usr1_reopens_every_log_file(spawn, tmp_path: Path) -> None:
    log = tmp_path / "wsfleet.log"
    master = Master(spawn, tmp_path, "-w", "2", "--log-file", str(log))
    os.rename(log, tmp_path / "wsfleet.log.1")
    master.proc.signal(signal.SIGUSR1)
    wait_for(
        lambda: log.exists() and log.read_text().count("reopened log file") == 3,
        what="the master and both workers to reopen the log",
    )


def test_crashed_worker_is_replaced_within_a_second(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2")
    victim = min(master.worker_pids())
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    master.proc.wait_line(rf"worker {victim} \(slot \d\) died \(signal SIGKILL\): replacing it")
    master.proc.wait_line(r"worker \d+ \(slot \d\) is ready", timeout=5)
    assert time.monotonic() - killed < 1.0
    pids = master.worker_pids()
    assert victim not in pids and len(pids) == 2


def test_crash_loop_backs_off_and_others_keep_serving(spawn, tmp_path: Path) -> None:
    master = app_master(spawn, tmp_path, CRASHING_APP, "-w", "2")
    healthy, victim = sorted(master.worker_pids())
    (tmp_path / "crash").write_text("")  # every new worker now dies while importing
    os.kill(victim, signal.SIGKILL)
    master.proc.wait_line(r"died \(exit status 4\) .*restarting in \d+\.\ds")
    master.proc.wait_line(r"died \(exit status 4\) .*4 times in a row.*restarting in")
    master.proc.wait_line(rf"\[{healthy}\] \[INFO\] wsfleet.worker: accepting for slot 1")
    # The slot now waits about 2 s (1.5 to 2.5) before its next try. Meanwhile no new
    # connection waits on it: the healthy worker accepts for it. 40 connections hash over
    # both slots' sockets; one that waited for the slot would miss the 1 s timeout.
    for _ in range(40):
        assert echo_once(master.url, "still served", timeout=1.0) == "still served"
    assert healthy in master.worker_pids()
    # `wsfleet status` shows the slot in backoff (between two tries: none is running).
    wait_for(
        lambda: "none: restart in" in run_wsfleet(["status", "--pidfile", master.pidfile]).stdout,
        what="status to show the slot waiting for its restart",
    )
    os.unlink(tmp_path / "crash")
    master.wait_workers(2, timeout=30)  # the backoff ends and the slot recovers
    assert "Traceback" not in master.proc.output
