"""The admin API (``--admin HOST:PORT``): ``POST /publish/TOPIC`` publishes the request's body
on TOPIC, for a client that shows the token of ``--admin-token-file``.

The master binds the port and keeps it for its whole life, so that it outlives a hub that is
replaced and is handed over on upgrade (as the --metrics port); the hub process serves it, in
its own event loop, so that the master's loop never waits on pub/sub traffic. The old hub stops
serving it when it hands its topics over to an upgrade's new hub, which serves it from then on
(connections meanwhile wait in the socket's queue).

Every refusal is decided from the headers alone, before the body is read (a client is not made
to send a body that will be thrown away): 404 for another path, 405 for another method, 401
without the token, 411 without Content-Length, 413 over --max-size, 400 for a bad topic. Every
answer is a small JSON object (``{"offset": N}``, or ``{"error": "..."}`` saying what to do)
and closes the connection. Bounded: MAX_HEADERS bytes of headers (431 beyond), ``timeout``
seconds for the headers and as long for the body (408), MAX_CLIENTS connections at once (503
beyond). The token is compared in constant time and is never logged; a refused request is
logged at debug level, one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote_to_bytes

from . import relay, sockets
from .topics import BrokerUnavailable, check_topic

log = logging.getLogger("wsfleet.admin")

PREFIX = "/publish/"
MAX_HEADERS = 16 * 1024  # bytes of request line and headers (curl sends about 150)
TIMEOUT = 10.0  # seconds a client has to send its headers, and again its body
LINGER = 2.0  # seconds a refused request's unread body is read and dropped before closing
MAX_CLIENTS = 128  # connections served at once; more are answered 503 at once
_STATUS = http.HTTPStatus


class Publisher(Protocol):
    """What the admin API publishes through: the hub (wsfleet/hub.py)."""

    async def publish(self, topic: str, payload: bytes) -> int: ...


@dataclass
class Port:
    """The admin API's listening socket (the master's, inherited by its hub), its token and
    the largest message it takes (--max-size as the hub started)."""

    sock: socket.socket
    token: str = field(repr=False)
    max_size: int


class Refused(Exception):
    """A request answered with an error: its status, what to do, extra headers."""

    def __init__(self, status: http.HTTPStatus, message: str, *headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Gone(Exception):
    """The client closed before its request was whole: nothing to answer."""


@dataclass
class Request:
    """What the log says of a request (never its headers: the token), and whether its body
    was read."""

    line: str = ""
    body_read: bool = False


class AdminServer:
    """Serves ``POST /publish/TOPIC`` on ``port`` once started, publishing through ``hub``."""

    def __init__(self, port: Port, hub: Publisher, timeout: float = TIMEOUT) -> None:
        self.port = port
        self.hub = hub
        self.timeout = timeout
        self.server: asyncio.Server | None = None
        self.closed = False
        self.clients = 0  # connections accepted and not closed yet
        self.idle = asyncio.Event()  # set while clients is 0
        self.idle.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self.connected, sock=self.port.sock)

    def connected(self) -> asyncio.StreamReaderProtocol:
        """A connection accepted (asyncio.start_server's protocol, counted from here rather
        than from its handler's start, a turn of the loop later: see :meth:`finish`)."""
        self.clients += 1
        self.idle.clear()
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=MAX_HEADERS), self.handle)

    def close(self) -> None:
        """Accept no more (this process's copy of the socket closes, the others' stay): an
        upgrade's new hub serves the port now, or the hub stops. A request in progress that
        has not published yet is answered 503, to be sent again (to the new hub)."""
        self.closed = True
        if self.server is not None:
            self.server.close()
            self.server = None

    async def finish(self, limit: float) -> None:
        """Once closed, before the hub exits: wait until every connection accepted is
        answered and closed (``limit`` seconds at most), so that the exit cuts none: a client
        that was cut cannot tell whether its message was published. A connection accepted
        just before the close reaches :meth:`connected` before this resumes (its task was
        queued first; uvloop calls it at once)."""
        await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), limit)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: one request, one answer, closed."""
        request = Request()
        try:
            if self.clients > MAX_CLIENTS:
                raise Refused(
                    _STATUS.SERVICE_UNAVAILABLE,
                    f"over {MAX_CLIENTS} connections to the admin API at once: try again",
                )
            topic, message = await self.read(reader, writer, request)
            if self.closed:
                raise Refused(
                    _STATUS.SERVICE_UNAVAILABLE,
                    "this hub has handed the topics over to an upgrade's new one: send the "
                    "request again",
                )
            try:
                offset = await self.hub.publish(topic, relay.payload(message))
            except BrokerUnavailable as exc:
                raise Refused(
                    _STATUS.SERVICE_UNAVAILABLE,
                    f"{exc}; publish again later",
                ) from None
            await self.answer(writer, _STATUS.OK, {"offset": offset})
        except Refused as refused:
            peer = writer.get_extra_info("peername")
            log.debug(
                "admin API: refused %s from %s: %d %s",
                request.line or "a request",
                sockets.format_address(peer) if peer else "?",
                refused.status.value,
                refused.message,
            )
            with contextlib.suppress(OSError, TimeoutError):
                await self.answer(writer, refused.status, {"error": refused.message}, refused)
                if not request.body_read:
                    await self.linger(reader, writer)
        except Gone:
            pass
        except Exception:
            log.exception("admin API: error while answering %s", request.line or "a request")
            with contextlib.suppress(OSError, TimeoutError):
                error = (
                    "the hub failed while publishing (its log says why): the message may not "
                    "have been published"
                )
                await self.answer(writer, _STATUS.INTERNAL_SERVER_ERROR, {"error": error})
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await writer.wait_closed()
            self.clients -= 1
            if not self.clients:
                self.idle.set()

    async def read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request
    ) -> tuple[str, str | bytes]:
        """The request's topic and message; Refused as soon as the headers refuse it, before
        its body is read."""
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise Refused(
                _STATUS.REQUEST_TIMEOUT,
                f"the request's headers took over {self.timeout:g}s: send them at once",
            ) from None
        except asyncio.LimitOverrunError:
            raise Refused(
                _STATUS.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"the request's headers are over {MAX_HEADERS} bytes: send fewer",
            ) from None
        except (asyncio.IncompleteReadError, OSError):
            raise Gone() from None
        line, *lines = head[:-4].decode("latin-1").split("\r\n")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[1].startswith("/") or not parts[2].startswith("HTTP/1."):
            raise Refused(_STATUS.BAD_REQUEST, "not an HTTP/1 request line: POST /publish/TOPIC")
        method, target, _ = parts
        request.line = f"{method[:20]} {target[:100]!r}"
        headers = parse_headers(lines)
        path = target.partition("?")[0]
        if not path.startswith(PREFIX):
            raise Refused(_STATUS.NOT_FOUND, "no such path: the admin API is POST /publish/TOPIC")
        if method != "POST":
            raise Refused(
                _STATUS.METHOD_NOT_ALLOWED,
                f"{method[:20]} is not allowed: publish with POST /publish/TOPIC",
                "Allow: POST",
            )
        if not self.authorized(headers.get("authorization", "")):
            raise Refused(
                _STATUS.UNAUTHORIZED,
                "a missing or wrong token: send 'Authorization: Bearer TOKEN' with the token "
                "of the master's --admin-token-file",
                'WWW-Authenticate: Bearer realm="wsfleet"',
            )
        if "transfer-encoding" in headers or "content-length" not in headers:
            raise Refused(
                _STATUS.LENGTH_REQUIRED,
                "send the body with a Content-Length header (chunked transfer encoding is not "
                "supported)",
            )
        length = headers["content-length"]
        if not (length.isascii() and length.isdigit()):
            raise Refused(_STATUS.BAD_REQUEST, f"Content-Length is not a number: {length[:20]!r}")
        size = int(length)
        if size > self.port.max_size:
            raise Refused(
                _STATUS.REQUEST_ENTITY_TOO_LARGE,
                f"the message is {size} bytes, over the fleet's --max-size of "
                f"{self.port.max_size}: send a smaller one",
            )
        topic = decode_topic(path[len(PREFIX) :])
        text = is_text(headers.get("content-type", ""))
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.timeout):
                body = await reader.readexactly(size)
        except TimeoutError:
            raise Refused(
                _STATUS.REQUEST_TIMEOUT,
                f"the body took over {self.timeout:g}s to arrive: nothing was published",
            ) from None
        except (asyncio.IncompleteReadError, OSError):
            raise Gone() from None
        request.body_read = True
        if not text:
            return topic, body
        try:
            return topic, body.decode()
        except UnicodeDecodeError as exc:
            raise Refused(
                _STATUS.BAD_REQUEST,
                f"the body is not UTF-8 ({exc.reason} at byte {exc.start}) while its "
                "Content-Type is text: send bytes with another Content-Type (such as "
                "application/octet-stream)",
            ) from None

    def authorized(self, authorization: str) -> bool:
        scheme, _, credentials = authorization.partition(" ")
        given = credentials.strip().encode("latin-1")
        expected = self.port.token.encode()
        # (the comparison runs whatever the scheme: its time says nothing about the token)
        return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"

    async def answer(
        self,
        writer: asyncio.StreamWriter,
        status: http.HTTPStatus,
        content: dict[str, object],
        refused: Refused | None = None,
    ) -> None:
        body = json.dumps(content).encode() + b"\n"
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(refused.headers if refused is not None else ()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        async with asyncio.timeout(self.timeout):
            await writer.drain()

    async def linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After a refusal, before the body was read: say the answer is whole, then read
        what the client still sends, for LINGER seconds at most. Closing with unread data
        would reset the connection, and the client could lose the answer with it."""
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(LINGER):
                while await reader.read(2**16):
                    pass


def parse_headers(lines: list[str]) -> dict[str, str]:
    """Header names in lower case; those the API reads refused when given twice."""
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise Refused(_STATUS.BAD_REQUEST, f"a malformed header line: {line[:40]!r}")
        name = name.lower()
        if name in headers and name in SINGLE:
            raise Refused(_STATUS.BAD_REQUEST, f"the {name} header is given twice")
        headers[name] = value.strip()
    return headers


SINGLE = frozenset({"authorization", "content-length", "content-type", "transfer-encoding"})


def decode_topic(raw: str) -> str:
    """The topic of the path, percent-decoded as UTF-8; Refused (400) saying what is wrong."""
    try:
        topic = unquote_to_bytes(raw).decode()
    except UnicodeDecodeError:
        raise Refused(
            _STATUS.BAD_REQUEST,
            "the topic is not UTF-8 once percent-decoded: percent-encode its UTF-8 bytes",
        ) from None
    try:
        return check_topic(topic)
    except ValueError as exc:
        raise Refused(_STATUS.BAD_REQUEST, f"bad topic: {exc}") from None


def is_text(content_type: str) -> bool:
    """Whether the body is text (text/*); Refused (400) for text in another charset than
    UTF-8 (or its ASCII subset)."""
    media, *params = content_type.split(";")
    if not media.strip().lower().startswith("text/"):
        return False
    for param in params:
        key, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8", "us-ascii"):
            raise Refused(
                _STATUS.BAD_REQUEST,
                f"text is published as UTF-8, not {charset[:20]}: send it as charset=utf-8, or "
                "send bytes with another Content-Type",
            )
    return True
