"""`wsfleet worker` as a real process, reached over real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import websocket  # websocket-client, the second client library
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.sync.client import connect

from .support.harness import wait_for
from .support.helpers import run_wsfleet, start_worker
from .support.wire import (
    client_frame,
    close_code,
    raw_connect,
    read_http_response,
    recv_frame,
    send_frame,
    stuck_client,
    upgrade_request,
)


def test_echo_text_and_binary_with_websockets(spawn, loop: str) -> None:
    proc, port = start_worker(spawn, "--loop", loop)
    proc.wait_line(f"loop={loop}, open file limit")
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("héllo")
        assert ws.recv() == "héllo"
        ws.send(b"\x00\xffbinary")
        assert ws.recv() == b"\x00\xffbinary"


def test_echo_text_and_binary_with_websocket_client(spawn) -> None:
    _, port = start_worker(spawn)
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10)
    try:
        ws.send("text")
        opcode, data = ws.recv_data()
        assert (opcode, data) == (websocket.ABNF.OPCODE_TEXT, b"text")
        ws.send_binary(b"\x01\x02")
        opcode, data = ws.recv_data()
        assert (opcode, data) == (websocket.ABNF.OPCODE_BINARY, b"\x01\x02")
    finally:
        ws.close()


def test_process_title(spawn) -> None:
    proc, port = start_worker(spawn)
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    assert cmdline.startswith(f"wsfleet: worker [127.0.0.1:{port}]".encode())


def test_health_path_answers_200(spawn) -> None:
    _, port = start_worker(spawn)
    with raw_connect(port) as sock:
        sock.sendall(b"GET /health/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, data, _ = read_http_response(sock)
    assert status == 200
    assert data.endswith(b"\r\n\r\nOK\n")


def test_health_path_can_be_moved_or_disabled(spawn) -> None:
    _, port = start_worker(spawn, "--health-path", "/ready")
    with raw_connect(port) as sock:
        sock.sendall(b"GET /ready?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_http_response(sock)[0] == 200
    _, port = start_worker(spawn, "--health-path", "")
    with raw_connect(port) as sock:
        sock.sendall(b"GET /health/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_http_response(sock)[0] == 426  # just another path now


def test_sigterm_closes_every_connection_with_1001_and_exits_0(spawn, loop: str) -> None:
    proc, port = start_worker(spawn, "--loop", loop)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(f"ws://127.0.0.1:{port}/")) for _ in range(5)]
        other = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10)
        stack.callback(other.close)
        for ws in clients:  # every connection is open and served
            ws.send("x")
            assert ws.recv() == "x"
        proc.signal(signal.SIGTERM)
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        opcode, data = other.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert close_code(data) == 1001
        other.send_close()
        other.shutdown()  # and end the TCP connection, as websockets waits for
        assert proc.wait() == 0
        proc.wait_line(r"stopped accepting; closing 6 connections with code 1001")


def test_health_is_503_while_draining_and_late_handshakes_succeed(spawn, loop: str) -> None:
    """Connections the worker accepted before a drain are answered, not failed: a health
    request gets 503, and an upgrade completes (101) and is then closed with 1001."""
    proc, port = start_worker(spawn, "--loop", loop)
    with raw_connect(port) as health, raw_connect(port) as upgrade:
        health.sendall(b"GET /health/ HTTP/1.1\r\nHost: x\r\n")  # incomplete: the drain waits
        upgrade.sendall(upgrade_request()[:20])
        # A connection opened after those two completes its handshake: by then the worker has
        # accepted the two above (one listening socket, accepted in order).
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            proc.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        # The worker is draining now; it stopped accepting but still answers these two.
        health.sendall(b"\r\n")
        status, data, _ = read_http_response(health)
        assert status == 503, data
        upgrade.sendall(upgrade_request()[20:])
        status, head, rest = read_http_response(upgrade)
        assert status == 101, head
        opcode, payload = recv_frame(upgrade, rest)
        assert (opcode, close_code(payload)) == (8, 1001)
        send_frame(upgrade, 8, payload[:2])  # complete the closing handshake
        assert proc.wait() == 0


def test_drain_stops_accepting_at_once(spawn) -> None:
    proc, port = start_worker(spawn, "--graceful-timeout", "30")
    with stuck_client(port):  # keeps the drain going
        proc.signal(signal.SIGTERM)
        proc.wait_line("stopped accepting")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert proc.popen.poll() is None  # still draining, waiting for the closing handshake
    assert proc.wait() == 0


def test_graceful_timeout_bounds_the_drain(spawn) -> None:
    proc, port = start_worker(spawn, "--graceful-timeout", "0.5")
    with stuck_client(port):
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0  # without the bound, close_timeout is 10 s
        proc.wait_line(r"graceful timeout \(0.5s\) reached: aborting 1 connection$")


def test_second_sigterm_stops_at_once(spawn) -> None:
    proc, port = start_worker(spawn, "--graceful-timeout", "60")
    with stuck_client(port):
        proc.signal(signal.SIGTERM)
        proc.wait_line("stopped accepting")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 1
        proc.wait_line("again: closing every connection now")


def test_sighup_alone_closes_every_connection_with_1012_and_exits_0(spawn, loop: str) -> None:
    """Alone, HUP is a restart (what `wsfleet rolling-restart` sends through supervisord):
    the clients are told 1012 (service restart), not 1001, and the process exits 0 for its
    supervisor to start the new one."""
    proc, port = start_worker(spawn, "--loop", loop)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(f"ws://127.0.0.1:{port}/")) for _ in range(4)]
        for ws in clients:
            ws.send("x")
            assert ws.recv() == "x"
        proc.signal(signal.SIGHUP)
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1012, "service restart")
        assert proc.wait() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_stop_during_a_restart_lets_its_drain_end(spawn) -> None:
    """TERM after HUP is `supervisorctl stop` during a rolling restart: the restart's drain
    goes on (its clients are told to reconnect already) rather than being cut short as by a
    second TERM; it ends at the graceful timeout here (exit 0), not at once (exit 1)."""
    proc, port = start_worker(spawn, "--graceful-timeout", "1")
    with stuck_client(port) as sock:
        proc.signal(signal.SIGHUP)
        opcode, payload = recv_frame(sock, bytearray())
        assert (opcode, close_code(payload)) == (8, 1012)  # the drain began
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_a_second_stop_during_a_restart_stops_at_once(spawn) -> None:
    proc, port = start_worker(spawn, "--graceful-timeout", "60")
    with stuck_client(port) as sock:
        proc.signal(signal.SIGHUP)
        opcode, payload = recv_frame(sock, bytearray())
        assert (opcode, close_code(payload)) == (8, 1012)
        proc.signal(signal.SIGTERM)
        proc.wait_line("SIGTERM while draining for a restart")  # (two at once would be one)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 1


SLOW_IMPORT_APP = """
import time
from pathlib import Path

Path("importing").touch()
deadline = time.monotonic() + 30
while not Path("go").exists() and time.monotonic() < deadline:
    time.sleep(0.01)


async def handler(websocket):
    await websocket.wait_closed()
"""


def test_a_sighup_while_it_starts_restarts_it_once_it_serves(spawn, tmp_path: Path) -> None:
    """A rolling restart may signal a worker that is still importing its app (and already
    has its socket bound): the HUP neither kills it (connections may wait on that socket)
    nor is lost; it serves, then drains as for any restart, and exits 0."""
    (tmp_path / "slow.py").write_text(SLOW_IMPORT_APP)
    proc = spawn("worker", "--port", "0", "--app", "slow:handler", cwd=tmp_path)
    wait_for(lambda: (tmp_path / "importing").exists(), 30, "the app's import to begin")
    proc.signal(signal.SIGHUP)
    (tmp_path / "go").touch()
    assert proc.wait(timeout=30) == 0  # (killed by the HUP: -1)
    proc.wait_ready()  # it did serve before it drained


def test_message_over_max_size_closes_1009_and_spares_others(spawn, loop: str) -> None:
    _, port = start_worker(spawn, "--max-size", "1000", "--loop", loop)
    with connect(f"ws://127.0.0.1:{port}/") as big, connect(f"ws://127.0.0.1:{port}/") as ok:
        ok.send("a" * 1000)  # exactly the limit is fine
        assert ok.recv() == "a" * 1000
        big.send("b" * 1001)
        with pytest.raises(ConnectionClosedError) as info:
            big.recv(timeout=10)
        assert info.value.sent is not None and info.value.sent.code == 1009
        ok.send("still here")
        assert ok.recv() == "still here"


def test_invalid_utf8_closes_1007(spawn) -> None:
    _, port = start_worker(spawn, "--compression", "none")
    with raw_connect(port) as sock:
        sock.sendall(upgrade_request())
        status, _, rest = read_http_response(sock)
        assert status == 101
        send_frame(sock, 1, b"\xff\xfe not utf-8")
        opcode, payload = recv_frame(sock, rest)
        assert (opcode, close_code(payload)) == (8, 1007)


@pytest.mark.parametrize(
    "request_bytes",
    [
        upgrade_request(key=""),  # missing Sec-WebSocket-Key
        upgrade_request(key="not base64 16 bytes"),
        upgrade_request(version=""),  # missing Sec-WebSocket-Version
        upgrade_request(version="8"),
    ],
    ids=["no-key", "bad-key", "no-version", "bad-version"],
)
def test_malformed_handshake_gets_400(spawn, request_bytes: bytes) -> None:
    proc, port = start_worker(spawn)
    with raw_connect(port) as sock:
        sock.sendall(request_bytes)
        status, data, _ = read_http_response(sock)
    assert status == 400, data
    # The worker goes on serving, and no traceback reached its log.
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("ok")
        assert ws.recv() == "ok"
    assert "Traceback" not in proc.output


def test_plain_get_to_other_path_gets_4xx(spawn) -> None:
    proc, port = start_worker(spawn)
    for request in (b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n", b"garbage\r\n\r\n"):
        with raw_connect(port) as sock:
            sock.sendall(request)
            status, data, _ = read_http_response(sock)
        assert 400 <= status < 500 or (status == 0 and data == b""), data
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("ok")
        assert ws.recv() == "ok"
    assert "Traceback" not in proc.output


def test_compression_negotiated_as_configured(spawn) -> None:
    _, port = start_worker(spawn, "--window-bits", "10", "--memory-level", "3")
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        assert ws.response is not None
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in extensions
        assert "server_max_window_bits=10" in extensions
        ws.send("x" * 10_000)
        assert ws.recv() == "x" * 10_000
    _, port = start_worker(spawn, "--compression", "none")
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers


def test_custom_app_from_the_current_directory(spawn, tmp_path: Path) -> None:
    (tmp_path / "shout.py").write_text(
        textwrap.dedent(
            """
            async def handler(websocket):
                async for message in websocket:
                    await websocket.send(websocket.request.path + " " + message.upper())
            """
        )
    )
    _, port = start_worker(spawn, "--app", "shout:handler", cwd=tmp_path)
    with connect(f"ws://127.0.0.1:{port}/room") as ws:
        ws.send("hi")
        assert ws.recv() == "/room HI"


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        (
            "",
            "nosuchmodule:handler",
            "cannot import --app nosuchmodule:handler: ModuleNotFoundError",
        ),
        ("raise RuntimeError('boom')", "badapp:handler", "RuntimeError: boom"),
        ("x = 1", "badapp:handler", "badapp has no attribute 'handler'"),
        ("def handler(ws): pass", "badapp:handler", "not a coroutine function"),
        ("async def handler(ws, path): pass", "badapp:handler", "exactly one argument"),
    ],
    ids=["missing-module", "import-raises", "missing-attr", "not-async", "two-args"],
)
def test_bad_app_exits_4_with_the_reason(tmp_path: Path, source: str, spec: str, message: str):
    (tmp_path / "badapp.py").write_text(source)
    result = run_wsfleet(["worker", "--port", "0", "--app", spec], cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    first, *more = result.stderr.strip().splitlines()
    assert message in first
    if source.startswith("raise"):  # the app raised: where, and its traceback
        assert first.endswith("RuntimeError: boom (badapp.py, line 1)")
        assert more == [
            "Traceback (most recent call last):",
            f'  File "{tmp_path / "badapp.py"}", line 1, in <module>',
            "    raise RuntimeError('boom')",
            "RuntimeError: boom",
        ]
    else:  # nothing of the app's to show: the one line says it
        assert more == []


def test_bad_app_traceback_goes_to_the_log_file(tmp_path: Path) -> None:
    (tmp_path / "badapp.py").write_text("\nhandler = missing_name\n")
    log = tmp_path / "w.log"
    args = ["worker", "--port", "0", "--app", "badapp:handler", "--log-file", str(log)]
    result = run_wsfleet(args, cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    assert "NameError: name 'missing_name' is not defined (badapp.py, line 2)" in result.stderr
    where = f'  File "{tmp_path / "badapp.py"}", line 2, in <module>\n    handler = missing_name'
    assert where in result.stderr
    assert where in log.read_text()


def test_serves_an_inherited_socket_with_fd(spawn) -> None:
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = spawn("worker", "--fd", str(listener.fileno()), pass_fds=[listener.fileno()])
        assert proc.wait_ready() == port
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            ws.send("via fd")
            assert ws.recv() == "via fd"
    finally:
        listener.close()


def test_fd_that_is_not_a_listening_socket_is_exit_2(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        fd = f.fileno()
        result = run_wsfleet(["worker", "--fd", str(fd)], pass_fds=[fd])
    assert result.returncode == 2
    assert f"--fd {fd}: file descriptor {fd} is not a socket" in result.stderr


def test_port_taken_by_another_program_is_exit_1() -> None:
    holder = socket.socket()  # no SO_REUSEPORT: it does not share
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_wsfleet(["worker", "--port", str(port)])
        assert result.returncode == 1
        assert f"address 127.0.0.1:{port} is already in use" in result.stderr
    finally:
        holder.close()


def test_workers_share_a_port(spawn) -> None:
    _, port = start_worker(spawn)
    second = spawn("worker", "--port", str(port))
    assert second.wait_ready() == port
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("shared")
        assert ws.recv() == "shared"


def test_usr1_reopens_the_log_file(spawn, tmp_path: Path) -> None:
    log = tmp_path / "wsfleet.log"
    proc, _ = start_worker(spawn, "--log-file", str(log))
    assert "serving app wsfleet.echo:echo" in log.read_text()
    os.rename(log, tmp_path / "wsfleet.log.1")  # as logrotate does
    proc.signal(signal.SIGUSR1)
    wait_for(log.exists, what="the log file to be reopened")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    text = log.read_text()
    assert "reopened log file" in text
    assert "all connections closed" in text
    assert "reopened" not in (tmp_path / "wsfleet.log.1").read_text()


def test_at_the_open_file_limit_it_neither_floods_nor_stalls(spawn, loop: str) -> None:
    """With only 64 descriptors, 100 clients: the worker reports the condition at most once
    every few seconds (asyncio alone would log every failed accept, up to the backlog per
    wake-up) and accepts again once descriptors are free."""
    limited = ["prlimit", "--nofile=64:64", sys.executable, "-m", "wsfleet"]
    proc, port = start_worker(spawn, "--loop", loop, program=limited)
    proc.wait_line("the open file limit is 64")
    with contextlib.ExitStack() as stack:
        for _ in range(100):
            sock = stack.enter_context(raw_connect(port))
            sock.sendall(upgrade_request())
        # A window in which a flood would show; there is no event to wait for instead.
        time.sleep(3)
        lines = [line for line in proc.lines if "accept" in line and "ERROR" in line]
        assert len(lines) <= 1, "\n".join(lines)
        assert "Traceback" not in proc.output
    # Once the worker has closed its side of those connections (it sees their ends), it has
    # descriptors again and accepts (asyncio retries every second). Before that, uvloop
    # closes a new connection at once: the limit still holds.
    worker = psutil.Process(proc.pid)  # prlimit execs the command: the same process
    wait_for(lambda: worker.num_fds() < 40, what="the worker to close the clients' connections")
    with connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
        ws.send("back")
        assert ws.recv(timeout=5) == "back"


def test_a_client_that_never_reads_cannot_make_the_worker_buffer_without_bound(spawn) -> None:
    """Backpressure: the echo's sends wait once write_limit bytes are buffered, the worker
    then stops reading (max_queue frames), and TCP pushes back on the client."""
    proc, port = start_worker(spawn, "--compression", "none", "--write-limit", "65536")
    worker = psutil.Process(proc.pid)
    chunk = b"x" * 65536
    with raw_connect(port) as sock:
        sock.sendall(upgrade_request())
        assert read_http_response(sock)[0] == 101
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        before = worker.memory_info().rss
        sock.setblocking(False)
        sent, stalled_at = 0, None
        deadline = time.monotonic() + 20
        while sent < 400 * len(chunk) and time.monotonic() < deadline:  # at most 25 MiB
            try:
                send_frame(sock, 2, chunk)
                sent += len(chunk)
            except BlockingIOError:
                stalled_at = sent  # the worker stopped taking data: backpressure
                break
        assert stalled_at is not None, f"the worker took all {sent} bytes"
        growth = worker.memory_info().rss - before
        # Buffers: the client's and worker's socket buffers, max_queue frames, write_limit.
        assert growth < 24 * 2**20, f"worker grew by {growth} bytes"
    with connect(f"ws://127.0.0.1:{port}/") as ws:  # and it still serves others
        ws.send("ok")
        assert ws.recv(timeout=5) == "ok"


def test_a_client_that_never_finishes_its_handshake_is_dropped(spawn) -> None:
    """websockets' open timeout (10 s) drops a connection that sends no request."""
    _, port = start_worker(spawn)
    with raw_connect(port, timeout=30) as sock:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # a reset is dropped too
            assert sock.recv(1) == b""  # closed by the server
        assert 9 < time.monotonic() - started < 20


BURST_APP = """
async def handler(websocket):
    async for message in websocket:
        count, size, close = message.split()
        # Nothing here yields to the event loop: every send() happens in one pass.
        for i in range(int(count)):
            await websocket.send(b"%06d" % i + b"." * int(size))
        if close == "close":
            await websocket.close(4000, "done")
"""

BLOCKING_APP = """
import asyncio
import json
import time


async def handler(websocket):
    async for message in websocket:
        if message == "progress":
            for i in range(5):
                time.sleep(0.2)  # synchronous work: the event loop is blocked
                await websocket.send(json.dumps([i, time.monotonic()]))
        elif message == "send then block":
            await websocket.send("sent")
            time.sleep(600)
        elif message == "send then await":
            await websocket.send(json.dumps(["held", time.monotonic()]))
            await asyncio.sleep(2)
        else:
            await websocket.send(json.dumps([message, time.monotonic()]))
"""


def data_segments_in(sock: socket.socket) -> int:
    """tcpi_data_segs_in of Linux's struct tcp_info: TCP segments with data received."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int.from_bytes(info[152:156], sys.byteorder)


def lateness(message: str | bytes) -> float:
    """Seconds between a BLOCKING_APP send (its monotonic clock, system-wide) and now."""
    return time.monotonic() - float(json.loads(message)[1])


def test_progress_updates_leave_as_they_are_sent(spawn, tmp_path, loop) -> None:
    """Sends between pieces of blocking work are each on the wire before the next piece, as
    under websockets alone (docs/how-it-works.md)."""
    (tmp_path / "blocking.py").write_text(BLOCKING_APP)
    _, port = start_worker(spawn, "--app", "blocking:handler", "--loop", loop, cwd=tmp_path)
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("progress")
        late = [lateness(ws.recv(timeout=10)) for _ in range(5)]
    assert max(late) < 0.05, late  # held until the end, they would be 0.8 s, 0.6 s, ... late


def test_a_message_sent_before_the_loop_blocks_arrives(spawn, tmp_path, loop) -> None:
    (tmp_path / "blocking.py").write_text(BLOCKING_APP)
    proc, port = start_worker(spawn, "--app", "blocking:handler", "--loop", loop, cwd=tmp_path)
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("send then block")
        assert ws.recv(timeout=10) == "sent"  # while the worker sleeps for 600 s
        proc.kill()


def test_replies_to_a_batch_leave_in_one_write(spawn, loop) -> None:
    """20 messages read in one go are answered in one system call (one TCP segment on
    loopback), where websockets alone writes 20 times (TCP_NODELAY): wsfleet/connection.py."""
    _, port = start_worker(spawn, "--loop", loop)
    with raw_connect(port) as sock:
        sock.sendall(upgrade_request())
        status, _, buffer = read_http_response(sock)
        assert status == 101
        before = data_segments_in(sock)
        sock.sendall(b"".join(client_frame(1, b"%02d" % i) for i in range(20)))
        replies = [recv_frame(sock, buffer) for _ in range(20)]
        assert replies == [(1, b"%02d" % i) for i in range(20)]
        assert data_segments_in(sock) - before <= 2


def test_a_reply_held_for_its_batch_leaves_when_the_handler_yields(spawn, tmp_path, loop):
    """The reply to the first of two messages read together may wait for the second one's,
    but not for a handler that awaits something else first."""
    (tmp_path / "blocking.py").write_text(BLOCKING_APP)
    _, port = start_worker(spawn, "--app", "blocking:handler", "--loop", loop, cwd=tmp_path)
    with raw_connect(port) as sock:
        sock.sendall(upgrade_request())
        status, _, buffer = read_http_response(sock)
        assert status == 101
        sock.sendall(client_frame(1, b"send then await") + client_frame(1, b"next"))
        _, held = recv_frame(sock, buffer)
        assert json.loads(held)[0] == "held"
        assert lateness(held) < 0.5  # the handler awaits for 2 s before it reads "next"
        assert json.loads(recv_frame(sock, buffer)[1])[0] == "next"


def test_a_burst_beyond_write_limit_then_close_arrives_whole_and_in_order(
    spawn, tmp_path, loop
) -> None:
    """Replies held for a batch go to the transport once write_limit bytes wait, the close
    frame after everything sent before it."""
    (tmp_path / "burst.py").write_text(BURST_APP)
    _, port = start_worker(
        spawn, "--app", "burst:handler", "--loop", loop, "--write-limit", "65536", cwd=tmp_path
    )
    with raw_connect(port) as sock:
        sock.sendall(upgrade_request())
        status, _, buffer = read_http_response(sock)
        assert status == 101
        # Read in one go: the replies to the first are held while the second waits.
        sock.sendall(client_frame(1, b"5 10 open") + client_frame(1, b"40 50000 close"))
        received = [recv_frame(sock, buffer) for _ in range(46)]
    expected = [(2, b"%06d" % i + b"." * 10) for i in range(5)]
    expected += [(2, b"%06d" % i + b"." * 50000) for i in range(40)]
    assert received[:45] == expected
    assert received[45][0] == 8 and close_code(received[45][1]) == 4000


def test_the_worker_connection_costs_no_more_memory_than_websockets() -> None:
    """wsfleet's Connection keeps its state out of the instance dict (see its __slots__)."""
    import asyncio

    from websockets.asyncio.client import connect as aconnect
    from websockets.asyncio.server import serve

    from wsfleet.connection import Connection

    async def dict_size(create_connection: type | None) -> int:
        opened: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def handler(websocket: Any) -> None:
            opened.set_result(websocket)
            await websocket.wait_closed()

        async with serve(handler, "127.0.0.1", 0, create_connection=create_connection) as server:
            port = server.sockets[0].getsockname()[1]
            async with aconnect(f"ws://127.0.0.1:{port}/"):
                websocket = await asyncio.wait_for(opened, 10)
                assert isinstance(websocket, create_connection or object)
                return sys.getsizeof(vars(websocket))

    assert asyncio.run(dict_size(Connection)) <= asyncio.run(dict_size(None))


def test_a_connection_buffers_no_more_than_write_limit_for_a_client_that_does_not_read() -> None:
    """What waits for the next pass and what the transport buffers stay within write_limit
    together, as the transport's buffer alone does in websockets; then send() waits."""
    import asyncio

    from websockets.asyncio.server import serve

    from wsfleet.connection import Connection

    limit, size = 32768, 1000

    async def peak_buffered() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        peak = held = 0
        paused: asyncio.Future[Connection] = loop.create_future()

        class Watched(Connection):
            def pause_writing(self) -> None:  # the transport asks send() to wait
                super().pause_writing()
                if not paused.done():
                    paused.set_result(self)

        async def handler(websocket: Connection) -> None:
            nonlocal peak, held
            await websocket.recv()  # the client's second message stays buffered: sends wait
            # Nothing here yields until send() must wait: all in one pass of the loop.
            for _ in range(20_000):  # at most 20 MB, far more than the buffers hold
                await websocket.send(b"x" * size)
                waiting = websocket._writes_size + websocket.transport.get_write_buffer_size()
                peak = max(peak, waiting)
                held = max(held, websocket._writes_size)

        server = await serve(handler, "127.0.0.1", 0, create_connection=Watched, write_limit=limit)
        try:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
                sock.setblocking(False)
                await loop.sock_connect(sock, server.sockets[0].getsockname())
                await loop.sock_sendall(sock, upgrade_request())
                response = b""
                while b"\r\n\r\n" not in response:
                    response += await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
                assert response.startswith(b"HTTP/1.1 101")
                await loop.sock_sendall(sock, client_frame(1, b"1") + client_frame(1, b"2"))
                websocket = await asyncio.wait_for(paused, 10)
                websocket.transport.abort()
        finally:
            server.close()
            await server.wait_closed()
        return peak, held

    peak, held = asyncio.run(peak_buffered())
    assert held > 0  # the sends did wait (for the second message's reply)
    assert limit - size <= peak <= limit + size + 100
