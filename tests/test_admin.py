"""The admin API (``wsfleet start --admin HOST:PORT --admin-token-file FILE``; wsfleet/admin.py):
``POST /publish/TOPIC`` publishes from outside the app.

First the HTTP side in this process, against a stand-in for the hub (each refusal, decided
from the headers before any body is sent; the bounds; the token never logged); then real
masters: a subscriber on every worker receives what a POST published, the refusals on the
wire, the options' exit statuses, the port kept by the master when its hub is replaced, and
handed over by an upgrade (or closed by a new master without --admin).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wsfleet import admin, control, relay
from wsfleet import config as cfg
from wsfleet.config import Address
from wsfleet.sockets import bind_plain

from .support.harness import free_port, wait_for
from .support.helpers import Master, app_master, new_masters, run_wsfleet
from .support.pubsub_api import APP, open_client, path, spread

TOKEN = "s3cret-token-0123456789abcdef"


# The HTTP side, in this process


class Hub:
    """What the admin server publishes through: records each publish, gives offsets."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.fail = fail

    async def publish(self, topic: str, payload: bytes) -> int:
        if self.fail is not None:
            raise self.fail
        self.published.append((topic, payload))
        return len(self.published)


@contextlib.asynccontextmanager
async def serving(
    hub: Hub, max_size: int = 1000, timeout: float = 5.0
) -> AsyncIterator[tuple[admin.AdminServer, int]]:
    sock = bind_plain(Address("127.0.0.1", 0), 16)
    server = admin.AdminServer(admin.Port(sock, TOKEN, max_size), hub, timeout)
    await server.start()
    try:
        yield server, sock.getsockname()[1]
    finally:
        server.close()


def request(
    target: str = "/publish/news",
    body: bytes = b"",
    *headers: str,
    method: str = "POST",
    token: str | None = TOKEN,
    length: int | None = None,
) -> bytes:
    """A request's bytes: the token and Content-Length (the body's, unless given) included
    unless None."""
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if length is None:
        length = len(body)
    if length >= 0:
        lines.append(f"Content-Length: {length}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(port: int, data: bytes, timeout: float = 5) -> tuple[int, dict[str, str], Any]:
    """Send ``data``, read the answer to its end: (status, headers, the JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            answer = await reader.read()  # (to the server's end of the stream)
    finally:
        writer.close()
    return parse_answer(answer)


def parse_answer(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    assert int(headers["content-length"]) == len(body), answer
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    return int(line.split(" ")[1]), headers, json.loads(body)


def test_a_post_is_published_as_text_or_bytes_on_the_percent_decoded_topic() -> None:
    async def scenario() -> None:
        hub = Hub()
        async with serving(hub) as (_, port):
            text = "h\u00e9llo".encode()
            answers = [
                await exchange(port, request("/publish/news", text, "Content-Type: text/plain")),
                await exchange(
                    port,
                    request(
                        "/publish/a%20b%2F%C3%A9?ignored=1",
                        b"\xff\x00",
                        "Content-Type: application/octet-stream",
                    ),
                ),
                await exchange(port, request("/publish/raw", b"no type: bytes")),
                await exchange(
                    port, request("/publish/t", b"", "Content-Type: TEXT/html; charset=UTF-8")
                ),
            ]
        assert [(status, body) for status, _, body in answers] == [
            (200, {"offset": n}) for n in (1, 2, 3, 4)
        ]
        assert hub.published == [
            ("news", relay.payload("h\u00e9llo")),
            ("a b/\u00e9", relay.payload(b"\xff\x00")),
            ("raw", relay.payload(b"no type: bytes")),
            ("t", relay.payload("")),
        ]

    asyncio.run(scenario())


BIG = 10**6  # a Content-Length whose body is never sent: the answer comes from the headers


@pytest.mark.parametrize(
    ("data", "status", "says", "header"),
    [
        (request("/other", method="GET"), 404, "POST /publish/TOPIC", None),
        (request("/publish"), 404, "POST /publish/TOPIC", None),
        (request(method="GET", length=-1), 405, "publish with POST", ("allow", "POST")),
        (request(method="PUT", length=BIG), 405, "publish with POST", ("allow", "POST")),
        (request(token=None, length=BIG), 401, "Authorization: Bearer", ("www-authenticate",)),
        (request(token="wrong", length=BIG), 401, "--admin-token-file", ("www-authenticate",)),
        (request(token=TOKEN + "x", length=BIG), 401, "token", ("www-authenticate",)),
        (
            request(length=BIG, token=None)[:-2] + f"Authorization: Basic {TOKEN}\r\n\r\n".encode(),
            401,
            "token",
            None,
        ),
        (request(length=-1), 411, "chunked transfer encoding is not supported", None),
        (
            request(length=-1)[:-2] + b"Transfer-Encoding: chunked\r\n\r\n",
            411,
            "not supported",
            None,
        ),
        (request(length=BIG), 413, "over the fleet's --max-size of 1000", None),
        (request(length=1001), 413, "1001 bytes", None),
        (request("/publish/%FF%FE", length=1), 400, "not UTF-8", None),
        (request("/publish/", length=1), 400, "bad topic: a topic is a non-empty str", None),
        (request("/publish/" + "t" * 257, length=1), 400, "at most 256 characters", None),
        (
            request(length=1)[:-2] + b"Content-Type: text/plain; charset=latin-1\r\n\r\n",
            400,
            "charset=utf-8",
            None,
        ),
        (request(length=1)[:-2] + b"Content-Length: 2\r\n\r\n", 400, "given twice", None),
        (request(length=1)[:-2] + b"bad header line\r\n\r\n", 400, "malformed header", None),
        (b"POST /publish/x\r\n\r\n", 400, "not an HTTP/1 request line", None),
        (request(length=-1)[:-2] + b"X: " + b"y" * 17000 + b"\r\n\r\n", 431, "headers", None),
    ],
)
def test_a_refusal_is_answered_from_the_headers_before_any_body(
    data: bytes, status: int, says: str, header: tuple[str, ...] | None
) -> None:
    """Nothing of the body is sent (BIG bytes announced for most): the answer arrives all
    the same, with the error saying what to do, and nothing is published."""

    async def scenario() -> None:
        hub = Hub()
        async with serving(hub) as (_, port):
            found, headers, body = await exchange(port, data)
        assert (found, hub.published) == (status, [])
        assert says in body["error"], body
        if header is not None:
            assert header[0] in headers
            if len(header) > 1:
                assert headers[header[0]] == header[1]
        if status == 401:
            assert headers["www-authenticate"].startswith("Bearer")

    asyncio.run(scenario())


def test_a_text_body_that_is_not_utf8_is_400() -> None:
    async def scenario() -> None:
        hub = Hub()
        async with serving(hub) as (_, port):
            found, _, body = await exchange(
                port, request("/publish/x", b"caf\xe9", "Content-Type: text/plain")
            )
        assert found == 400 and "not UTF-8" in body["error"] and "octet-stream" in body["error"]
        assert hub.published == []

    asyncio.run(scenario())


def test_a_slow_client_gets_408_for_its_headers_and_for_its_body() -> None:
    """Headers that never end, and a body that never comes whole: 408 after the timeout."""

    async def scenario() -> None:
        hub = Hub()
        async with serving(hub, timeout=0.3) as (_, port):
            started = time.monotonic()
            head, _, _ = await exchange(port, request()[:30])
            body, _, said = await exchange(port, request(length=10) + b"12345")
            took = time.monotonic() - started
        assert (head, body) == (408, 408), (head, body)
        assert "body took over 0.3s" in said["error"]
        assert took < 3 and hub.published == []

    asyncio.run(scenario())


def test_the_broker_unavailable_is_503_and_another_error_500() -> None:
    async def scenario() -> None:
        async with serving(Hub(admin.BrokerUnavailable("redis down"))) as (_, port):
            unavailable, _, said = await exchange(port, request(body=b"x"))
        assert unavailable == 503
        assert said["error"] == "redis down; publish again later"
        async with serving(Hub(RuntimeError("a bug"))) as (_, port):
            failed, _, said = await exchange(port, request(body=b"x"))
        assert failed == 500 and "log" in said["error"]

    asyncio.run(scenario())


def test_a_closed_server_accepts_no_more_and_answers_503_to_a_request_in_progress() -> None:
    """An upgrade's hand-over: a request whose headers came before close() is answered 503
    (send it again), nothing published; a new connection is refused (this process's copy of
    the socket is closed)."""

    async def scenario() -> None:
        hub = Hub()
        async with serving(hub) as (server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request(length=3)[:-2] + b"Expect: 100-continue\r\n\r\n")
            async with asyncio.timeout(5):  # the headers are taken: the body is awaited
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            server.close()
            writer.write(b"abc")
            async with asyncio.timeout(5):
                status, _, said = parse_answer(await reader.read())
            writer.close()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
        assert status == 503 and "send the request again" in said["error"]
        assert hub.published == []

    asyncio.run(scenario())


class SlowHub(Hub):
    """A hub whose publish waits until ``release`` is set (``entered`` says it began)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def publish(self, topic: str, payload: bytes) -> int:
        self.entered.set()
        await self.release.wait()
        return await super().publish(topic, payload)


def test_an_exiting_hub_waits_until_a_publish_in_progress_is_answered() -> None:
    """The hub exits (stopped, or handed over): finish() returns once the request that was
    publishing has its answer, so that the client learns its offset rather than meeting a
    cut connection; with none in progress, at once."""

    async def scenario() -> None:
        hub = SlowHub()
        async with serving(hub) as (server, port):
            answer = asyncio.create_task(exchange(port, request(body=b"x")))
            async with asyncio.timeout(5):
                await hub.entered.wait()
            server.close()
            finishing = asyncio.create_task(server.finish(5))
            done, _ = await asyncio.wait([finishing, answer], timeout=0.2)
            assert not done  # (both wait for the publish)
            hub.release.set()
            async with asyncio.timeout(5):
                status, _, said = await answer
                await finishing
            assert (status, said) == (200, {"offset": 1})
            async with asyncio.timeout(1):
                await server.finish(5)  # (none in progress)

    asyncio.run(scenario())


def test_connections_beyond_the_limit_are_answered_503_at_once(monkeypatch) -> None:
    monkeypatch.setattr(admin, "MAX_CLIENTS", 1)

    async def scenario() -> None:
        async with serving(Hub()) as (server, port):
            _, holding = await asyncio.open_connection("127.0.0.1", port)
            holding.write(b"POST /pub")  # (its headers never end)
            async with asyncio.timeout(5):
                while server.clients < 1:  # (until the server has taken it)
                    await asyncio.sleep(0.01)
            status, _, said = await exchange(port, request(body=b"x"), timeout=2)
            holding.close()
        assert status == 503 and "connections to the admin API at once" in said["error"]

    asyncio.run(scenario())


def test_the_token_is_never_logged_nor_in_a_repr(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="wsfleet.admin")

    async def scenario() -> None:
        async with serving(Hub()) as (_, port):
            await exchange(port, request(token=TOKEN[:-1], length=BIG))  # almost the token
            await exchange(port, request(body=b"ok"))
            port_repr = repr(admin.Port(socket.socket(), TOKEN, 1))
        assert TOKEN not in port_repr

    asyncio.run(scenario())
    assert "refused POST '/publish/news'" in caplog.text and "401" in caplog.text
    assert TOKEN[:-1] not in caplog.text


# The options


def test_admin_options_parse_and_a_bare_port_is_the_loopback(tmp_path: Path) -> None:
    assert cfg.parse_value("admin", "8081") == "127.0.0.1:8081"
    assert cfg.parse_value("admin", "[::1]:8081") == "[::1]:8081"
    assert cfg.parse_value("admin", "") is None
    for wrong in ("unix:/tmp/a.sock", "::1:80", "99999", "host"):
        with pytest.raises(ValueError, match="expected PORT, HOST:PORT or"):
            cfg.parse_value("admin", wrong)
    assert {"admin", "admin_token_file"} <= set(cfg.RELOAD_IGNORES)
    token = tmp_path / "token"
    token.write_text(f"\n  {TOKEN}\n\n")
    config = cfg.Config(admin="127.0.0.1:0", admin_token_file=str(token))
    assert cfg.admin_token(config) == TOKEN
    assert cfg.admin_token(cfg.Config(admin_token_file=str(token))) is None  # no --admin


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "--admin needs --admin-token-file FILE"),
        ("", "is empty: write the token in it"),
        (" \n\t\n", "is empty"),
        ("two words", "one word of visible ASCII characters"),
        ("missing", "cannot read: No such file or directory"),
    ],
)
def test_a_missing_empty_or_unreadable_token_file_is_exit_2(
    tmp_path: Path, content: str | None, says: str
) -> None:
    args = ["start", "--port", "0", "--admin", "0", "--pidfile", str(tmp_path / "m.pid")]
    token = tmp_path / "token"
    if content is not None:
        if content != "missing":
            token.write_text(content)
        args += ["--admin-token-file", str(token)]
    result = run_wsfleet(args)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("wsfleet: error: ") and says in line, line
    assert content is None or content.strip() in ("", "missing") or content not in line
    assert not (tmp_path / "m.pid").exists()  # nothing started


# Real masters


def post(port: int, topic: str, body: bytes, token: str = TOKEN, **headers: str) -> tuple:
    """POST /publish/TOPIC (topic as it goes in the path): (status, the JSON answer)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sent = {"Authorization": f"Bearer {token}", **headers}
        connection.request("POST", f"/publish/{topic}", body, sent)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw(port: int, data: bytes) -> tuple[int, dict[str, str], Any]:
    """Send ``data`` (headers without their body, say): the answer, read to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return parse_answer(b"".join(chunks))


def token_file(tmp_path: Path) -> str:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


def admin_fleet(spawn: Any, tmp_path: Path, *args: str, workers: int = 2) -> tuple[Master, int]:
    """A master serving the pub/sub test app with --admin on a free port given bare (so on
    127.0.0.1), its workers ready: it and the admin port."""
    port = free_port()
    master = app_master(
        spawn,
        tmp_path,
        APP,
        "-w",
        str(workers),
        "--admin",
        str(port),
        "--admin-token-file",
        token_file(tmp_path),
        *args,
    )
    master.wait_workers(workers)
    return master, port


def test_a_post_reaches_the_subscribers_of_every_worker(spawn, tmp_path: Path) -> None:
    """Subscribers on both workers receive a POSTed text as text and bytes as bytes, at the
    offsets the answers gave, which the app's own publishes continue; the status shows the
    URL (bound to 127.0.0.1 for a bare port); the log, at debug level, never the token."""
    master, port = admin_fleet(spawn, tmp_path, "--log-level", "debug")
    pids = master.worker_pids()

    async def scenario() -> None:
        subscribers = await spread(master.url, path("news"), 1, pids)
        app = await open_client(master.url)
        text = await asyncio.to_thread(
            post, port, "news", "\u00e9t\u00e9".encode(), **{"Content-Type": "text/plain"}
        )
        binary = await asyncio.to_thread(post, port, "news", b"\x00\xff")
        assert (text, binary) == ((200, {"offset": 1}), (200, {"offset": 2}))
        assert await app.call("publish", topic="news", text="from the app") == 3
        for subscriber in subscribers:
            assert await subscriber.messages(3) == ["\u00e9t\u00e9", b"\x00\xff", "from the app"]
        # Refused: a wrong token (logged at debug, without it).
        assert await asyncio.to_thread(post, port, "news", b"x", TOKEN[:-1] + "?") == (
            401,
            {"error": _UNAUTHORIZED},
        )
        for client in [*subscribers, app]:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert master.status()["master"]["admin"] == f"http://127.0.0.1:{port}/"
    published = lambda: master.status()["pubsub"]["published"] == 3  # noqa: E731
    wait_for(published, 5, "the hub's figures (every second) to count the 3")
    text = run_wsfleet(["status", "--pidfile", master.pidfile]).stdout
    assert f"admin API: POST http://127.0.0.1:{port}/publish/TOPIC" in text
    master.proc.wait_line("admin API: refused POST '/publish/news'")
    assert TOKEN not in master.proc.output and TOKEN[:-1] not in master.proc.output


_UNAUTHORIZED = (
    "a missing or wrong token: send 'Authorization: Bearer TOKEN' with the token of the "
    "master's --admin-token-file"
)


def test_refusals_on_a_running_fleet_come_before_the_body(spawn, tmp_path: Path) -> None:
    """On the hub's port: 401 without or with a wrong token, and 413, though the announced
    body is never sent; 404, 405, 411, 400 for a bad topic; nothing of it published."""
    _, port = admin_fleet(spawn, tmp_path, "--max-size", "100", workers=1)
    unauthorized = raw(port, request(token=None, length=BIG))
    assert unauthorized[0] == 401 and unauthorized[1]["www-authenticate"].startswith("Bearer")
    assert raw(port, request(token="nope", length=BIG))[0] == 401
    too_large = raw(port, request(length=101))
    assert too_large[0] == 413 and "--max-size of 100" in too_large[2]["error"]
    assert raw(port, request("/metrics", method="GET"))[0] == 404
    not_allowed = raw(port, request(method="GET", length=-1))
    assert not_allowed[0] == 405 and not_allowed[1]["allow"] == "POST"
    assert raw(port, request(length=-1))[0] == 411
    assert post(port, "%C3", b"x") == (400, {"error": _NOT_UTF8})
    assert post(port, "t" * 300, b"x")[0] == 400
    assert post(port, "news", b"x" * 100) == (200, {"offset": 1})  # the first on "news"


_NOT_UTF8 = "the topic is not UTF-8 once percent-decoded: percent-encode its UTF-8 bytes"


def test_the_master_keeps_the_port_when_its_hub_is_replaced(spawn, tmp_path: Path) -> None:
    """kill -9 of the hub: the master's socket stays, and the new hub serves it (its topics
    start anew: offset 1 again)."""
    master, port = admin_fleet(spawn, tmp_path, workers=1)
    assert post(port, "t", b"a") == (200, {"offset": 1})
    old = master.status()["hub"]["pid"]
    os.kill(old, signal.SIGKILL)

    def replaced() -> bool:
        hub = master.status()["hub"]
        return bool(hub["pid"]) and hub["pid"] != old

    wait_for(replaced, 10, "a new hub")
    assert post(port, "t", b"b") == (200, {"offset": 1})


def test_an_upgrade_hands_the_admin_port_over(spawn, tmp_path: Path) -> None:
    """POSTs while the fleet upgrades: each is answered (200, or 503 'send it again' in the
    hand-over), none meets a closed port, and the offsets go on from the old hub's without a
    gap or a repeat; after the old master exits, the new master's hub answers."""
    master, port = admin_fleet(spawn, tmp_path, "--drain-window", "0", workers=1)
    answers: list[tuple[int, Any]] = []
    stop = threading.Event()

    def keep_posting() -> None:
        while not stop.is_set():
            try:
                answers.append(post(port, "t", b"m"))
            except OSError as exc:  # (a closed port, a reset: what must not happen)
                answers.append((0, repr(exc)))
            time.sleep(0.01)

    with new_masters(master):
        assert post(port, "t", b"first") == (200, {"offset": 1})
        poster = threading.Thread(target=keep_posting)
        poster.start()
        try:
            result = run_wsfleet(["upgrade", "--pidfile", master.pidfile], timeout=60)
            assert result.returncode == 0, result.stderr
            assert master.proc.popen.wait(30) == 0  # the old master is gone (its hub too)
            before = len(answers)
            wait_for(lambda: len(answers) >= before + 5, 10, "answers from the new hub")
        finally:
            stop.set()
            poster.join(15)
        new = control.read_pid(master.pidfile)
        assert new != master.proc.pid
        assert control.query_status(new)["master"]["admin"] == f"http://127.0.0.1:{port}/"
        statuses = {status for status, _ in answers}
        assert statuses <= {200, 503}, [a for a in answers if a[0] != 200]
        offsets = [said["offset"] for status, said in answers if status == 200]
        assert offsets == list(range(2, 2 + len(offsets))), (offsets, master.proc.output[-4000:])
        assert post(port, "t", b"last") == (200, {"offset": 2 + len(offsets)})


def test_a_new_master_without_admin_closes_the_port(spawn, tmp_path: Path) -> None:
    """--admin from the config file, removed before the upgrade: the new master closes the
    handed port, which refuses connections once the old master is gone."""
    port = free_port()
    conf = tmp_path / "wsfleet.toml"
    conf.write_text(f'admin = "{port}"\nadmin_token_file = "{token_file(tmp_path)}"\n')
    master = Master(spawn, tmp_path, "-w", "1", "--drain-window", "0", "--config", str(conf))
    with new_masters(master):
        assert post(port, "t", b"a") == (200, {"offset": 1})
        conf.write_text("")
        result = run_wsfleet(["upgrade", "--pidfile", master.pidfile], timeout=60)
        assert result.returncode == 0, result.stderr
        assert master.proc.popen.wait(30) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
