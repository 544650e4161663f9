"""The options an operator sets where nginx or gunicorn stood (docs/options.md,
docs/security.md), with real worker processes and real clients on 127.0.0.1."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from wsfleet.proxy import V2_SIGNATURE

from .support.harness import wait_for
from .support.helpers import CLIENT_APP, Master, echo_once, run_wsfleet, start_worker
from .support.wire import client_frame, raw_connect, read_http_response, recv_frame, upgrade_request


def test_max_connections_answers_503_with_retry_after(spawn) -> None:
    _, port = start_worker(spawn, "--max-connections", "2")
    url = f"ws://127.0.0.1:{port}/"
    with connect(url) as first, connect(url) as second:
        for ws in (first, second):
            ws.send("in")
            assert ws.recv(timeout=5) == "in"  # both handlers run: the limit is reached
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=5)
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "1"
        first.send("untouched")
        assert first.recv(timeout=5) == "untouched"
    # Below the limit again: accepted.
    wait_for(lambda: _accepts(url), what="a connection to be accepted again")


def _accepts(url: str) -> bool:
    with contextlib.suppress(InvalidStatus), connect(url, open_timeout=5) as ws:
        ws.send("x")
        return ws.recv(timeout=5) == "x"
    return False


def test_max_connections_through_the_master(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "1", "--max-connections", "1")
    with connect(master.url) as ws:
        ws.send("x")
        ws.recv(timeout=5)
        with pytest.raises(InvalidStatus) as refused:
            connect(master.url, open_timeout=5)
        assert refused.value.response.status_code == 503


def test_origins_are_checked_and_a_missing_origin_is_accepted(spawn) -> None:
    _, port = start_worker(spawn, "--origins", "https://a.example, https://b.example:8443")
    url = f"ws://127.0.0.1:{port}/"
    for origin in ("https://a.example", "https://b.example:8443", None):
        with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
            ws.send("ok")
            assert ws.recv(timeout=5) == "ok"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin="https://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403


TIMEOUTS_APP = """
async def handler(websocket):
    async for message in websocket:
        await websocket.send(
            repr((websocket.ping_interval, websocket.ping_timeout, websocket.close_timeout))
        )
"""


def test_timeouts_reach_websockets(spawn, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(TIMEOUTS_APP)
    _, port = start_worker(
        spawn,
        "--app",
        "app:handler",
        "--ping-interval",
        "0",
        "--ping-timeout",
        "7",
        "--close-timeout",
        "3",
        "--open-timeout",
        "1",
        cwd=tmp_path,
    )
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("?")
        assert ws.recv(timeout=5) == "(None, 7.0, 3.0)"  # 0 turns pings off
    with raw_connect(port, timeout=10) as sock:  # never sends its handshake
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        assert time.monotonic() - started < 5  # --open-timeout 1, not websockets' 10


@pytest.mark.parametrize(("value", "expected"), [("", None), ("edge/1", b"edge/1")])
def test_server_header(spawn, value: str, expected: bytes | None) -> None:
    _, port = start_worker(spawn, "--server-header", value)
    with raw_connect(port) as sock:
        sock.sendall(upgrade_request())
        status, head, _ = read_http_response(sock)
    assert status == 101
    servers = [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]
    assert servers == ([] if expected is None else [b"Server: " + expected])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--origins", "a.example"], "argument --origins: expected origins such as"),
        (["--origins", "https://a.example,"], "expected origins such as"),
        (["--max-connections", "-1"], "argument --max-connections: expected an integer"),
        (["--close-timeout", "soon"], "argument --close-timeout: expected a non-negative"),
    ],
)
def test_bad_edge_values_are_exit_2_on_one_line(args: list[str], message: str) -> None:
    result = run_wsfleet(["worker", *args])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_origins_from_a_toml_list(spawn, tmp_path: Path) -> None:
    toml = tmp_path / "edge.toml"
    toml.write_text('origins = ["https://a.example"]\nmax_connections = 5\n')
    master = Master(spawn, tmp_path, "-w", "1", "--config", str(toml))
    assert echo_once(master.url) == "hi"
    with pytest.raises(InvalidStatus):
        connect(master.url, origin="https://b.example")  # type: ignore[arg-type]


def test_access_log_has_one_line_per_handshake_and_per_close(spawn, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    _, port = start_worker(spawn, "--access-log", "--log-file", str(log))
    with connect(f"ws://127.0.0.1:{port}/chat?room=1") as ws:
        for message in ("a", "b", "c"):
            ws.send(message)
            ws.recv(timeout=5)
    health = raw_connect(port)
    with health:
        health.sendall(b"GET /health/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_http_response(health)[0] == 200

    def lines() -> list[str]:
        return [line for line in log.read_text().splitlines() if "wsfleet.access" in line]

    wait_for(lambda: len(lines()) == 3, what="three access log lines")
    handshake, closed, probe = lines()
    assert '127.0.0.1 "GET /chat?room=1" 101' in handshake
    assert "127.0.0.1 /chat?room=1 closed 1000 after " in closed
    assert closed.endswith(", 3 in, 3 out")
    assert '"GET /health/" 200' in probe


def test_no_access_log_by_default(spawn, tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    _, port = start_worker(spawn, "--log-file", str(log))
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send("x")
        ws.recv(timeout=5)
    assert "wsfleet.access" not in log.read_text()


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        (None, "203.0.113.9"),  # the default trusts 127.0.0.1: the last entry counts
        ("10.0.0.0/8", "127.0.0.1"),  # the peer is not trusted: the header is ignored
        ("*", "203.0.113.9"),
    ],
)
def test_client_address_behind_a_trusted_proxy(
    spawn, tmp_path: Path, allowed: str | None, expected: str
) -> None:
    (tmp_path / "app.py").write_text(CLIENT_APP)
    options = [] if allowed is None else ["--forwarded-allow-ips", allowed]
    _, port = start_worker(spawn, "--app", "app:handler", *options, cwd=tmp_path)
    headers = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}  # spoofed first, then the proxy's
    with connect(f"ws://127.0.0.1:{port}/", additional_headers=headers) as ws:
        ws.send("who?")
        assert ws.recv(timeout=5) == expected
    with connect(f"ws://127.0.0.1:{port}/") as ws:  # no header: the peer
        ws.send("who?")
        assert ws.recv(timeout=5) == "127.0.0.1"


def test_bad_forwarded_allow_ips_is_exit_2() -> None:
    result = run_wsfleet(["worker", "--forwarded-allow-ips", "127.0.0.1,proxy.local"])
    assert result.returncode == 2
    assert "expected IP addresses or networks (or *), got 'proxy.local'" in result.stderr


def proxy_v2(source: str, port: int = 40000) -> bytes:
    """A PROXY v2 header for a TCP over IPv4 connection from source."""
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    body = addresses + struct.pack("!HH", port, 80)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def ask_client_address(port: int, *chunks: bytes) -> str:
    """Send the chunks (a PROXY header, in pieces or not), then a handshake; the app's answer."""
    with raw_connect(port) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
        sock.sendall(upgrade_request())
        status, _, buffer = read_http_response(sock)
        assert status == 101
        sock.sendall(client_frame(1, b"who?"))
        return recv_frame(sock, buffer)[1].decode()


def test_proxy_protocol_v1_and_v2_name_the_client(spawn, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(CLIENT_APP)
    _, port = start_worker(spawn, "--app", "app:handler", "--proxy-protocol", cwd=tmp_path)
    v1 = b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 80\r\n"
    assert ask_client_address(port, v1) == "192.0.2.10"
    assert ask_client_address(port, v1[:9], v1[9:]) == "192.0.2.10"  # in two reads
    assert ask_client_address(port, proxy_v2("198.51.100.20")) == "198.51.100.20"
    assert ask_client_address(port, b"PROXY UNKNOWN\r\n") == "127.0.0.1"  # the peer itself


@pytest.mark.parametrize(
    "header", [b"GET / HTTP/1.1\r\n", b"PROXY TCP4 nobody 127.0.0.1 1 2\r\n", b"PROXY " * 30]
)
def test_a_connection_without_a_valid_proxy_header_is_closed(spawn, header: bytes) -> None:
    proc, port = start_worker(spawn, "--proxy-protocol")
    with raw_connect(port) as sock:
        sock.sendall(header)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # closed, without an answer
    # The worker is untouched.
    v1 = b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 80\r\n"
    with raw_connect(port) as sock:
        sock.sendall(v1 + upgrade_request())
        assert read_http_response(sock)[0] == 101
    assert proc.popen.poll() is None and "Traceback" not in proc.output


# A worker that became nobody must still read the interpreter, the virtualenv and wsfleet's
# own source: on these machines Python lives in root's home (mode 0700), and a clone may sit
# in a folder that only root may enter (what `mktemp -d` makes). The host stays as it is: the
# master runs in a private mount namespace (unshare -m) where each such closed directory is
# covered by a 0711 one that shows only the way on to what the worker needs.
COVER = """
import collections, os, subprocess, sys, tempfile

separator = sys.argv.index("--")
covers, paths, command = sys.argv[1], sys.argv[2:separator], sys.argv[separator + 1 :]
ways = collections.defaultdict(set)  # a closed directory -> the entries to show in it
for path in paths:
    parts = path.strip("/").split("/")
    for depth in range(len(parts)):
        directory = "/" + "/".join(parts[:depth])
        if not os.stat(directory).st_mode & 0o001:  # others may not pass through it
            ways[directory].add(parts[depth])
for directory in sorted(ways, key=lambda d: len(d.rstrip("/").split("/"))):  # outer first
    cover = tempfile.mkdtemp(dir=covers)
    os.chmod(cover, 0o711)
    for entry in sorted(ways[directory]):
        source, shown = os.path.join(directory, entry), os.path.join(cover, entry)
        if os.path.isdir(source):
            os.mkdir(shown)
        else:
            open(shown, "w").close()
        subprocess.run(["mount", "--rbind", source, shown], check=True)
    subprocess.run(["mount", "--rbind", cover, directory], check=True)
os.execvp(command[0], command)
"""


def open_to_every_user(covers: Path) -> list[str]:
    """The command that runs wsfleet with what a worker needs readable by any user: as it is
    where nothing on the way to it is closed, else inside a mount namespace (COVER)."""
    import wsfleet

    needed = [*sys.path, sys.prefix, sys.base_prefix, str(Path(wsfleet.__file__).parent)]
    paths = sorted({os.path.realpath(p) for p in needed if p and os.path.exists(p)})
    command = [sys.executable, "-m", "wsfleet"]
    closed = [d for p in paths for d in map(str, Path(p).parents) if not os.stat(d).st_mode & 0o001]
    if not closed:
        return command
    covers.mkdir()
    return ["unshare", "-m", sys.executable, "-c", COVER, str(covers), *paths, "--", *command]


def ids(pid: int) -> tuple[int, int]:
    """(effective uid, effective gid) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(line for line in status if line.startswith("Uid:")).split()[2]
    gid = next(line for line in status if line.startswith("Gid:")).split()[2]
    return int(uid), int(gid)


def test_workers_switch_to_user_and_group_the_master_keeps_root(spawn, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    program = open_to_every_user(tmp_path / "covers")
    pidfile = str(tmp_path / "m.pid")
    proc = spawn(
        "start",
        "-w",
        "2",
        "--port",
        "0",
        "--pidfile",
        pidfile,
        "--user",
        "nobody",
        "--group",
        group,
        program=program,
        cwd="/",
    )
    port = proc.wait_ready(timeout=30)
    assert echo_once(f"ws://127.0.0.1:{port}/") == "hi"
    workers = [child.pid for child in proc.workers()]
    assert len(workers) == 2
    for pid in workers:
        assert ids(pid) == (nobody.pw_uid, nobody.pw_gid)
    hub = proc.hub()  # (the workers' user: they connect to it, it checks who)
    assert hub is not None and ids(hub.pid) == (nobody.pw_uid, nobody.pw_gid)
    assert ids(proc.pid) == (0, 0)  # the master: still root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "no-such-user-here"], "--user no-such-user-here: no such user"),
        (["--group", "no-such-group-here"], "--group no-such-group-here: no such group"),
    ],
)
def test_unknown_user_or_group_is_exit_2(args: list[str], message: str) -> None:
    for command in ("start", "worker"):
        result = run_wsfleet([command, "--port", "0", *args])
        assert result.returncode == 2 and message in result.stderr, result.stderr
