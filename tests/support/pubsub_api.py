"""What tests/test_pubsub.py needs to drive wsfleet's publish/subscribe API from outside: the
app it serves (:data:`APP`), asyncio clients for it, and :class:`Stalled`, a subscriber that
stops reading.

The app answers on every connection:

- the query says what to subscribe to: ``?sub=TOPIC`` (repeatable), ``&epoch=E&offset=N``
  (``since``), ``&envelope=NAME`` (one of :data:`ENVELOPES` in the app), ``&name=N`` (the
  app keeps the connection under that name, open or closed, for a later request);
- its first message, the hello: ``{"pid": ..., "subscriptions": [{"topic", "epoch",
  "offset", "recovered"}, ...]}``;
- then each text message is a request (JSON ``{"op": ...}``), answered with one JSON message:
  ``{"value": ...}`` or ``{"error": {"type", "mro", "message"}}`` when the call raised.
  A connection that subscribed also receives its messages, so requests go on connections
  that subscribe to nothing (a "control" connection) unless the test means otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.frames import Close, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

APP = r'''
import asyncio
import json
import os
import time
from urllib.parse import parse_qs, urlsplit

import wsfleet

CALLS = {}  # envelope name -> calls in this worker
CONNECTIONS = {}  # ?name= -> the connection
SUBSCRIPTIONS = {}  # (id of the connection, topic) -> its subscription


def counted(name, make):
    def envelope(topic, epoch, offset, message):
        CALLS[name] = CALLS.get(name, 0) + 1
        return make(topic, epoch, offset, message)

    return envelope


def describe(topic, epoch, offset, message):
    """Everything the envelope saw, as JSON text."""
    shown = message if isinstance(message, str) else message.hex()
    return json.dumps(
        {"topic": topic, "epoch": epoch, "offset": offset, "type": type(message).__name__,
         "message": shown}
    )


def fail(topic, epoch, offset, message):
    raise RuntimeError("this envelope fails on purpose")


ENVELOPES = {
    "describe": counted("describe", describe),
    "other": counted("other", describe),  # another function: called apart
    "same": counted("same", lambda topic, epoch, offset, message: message),
    "fail": fail,
    "int": lambda topic, epoch, offset, message: 42,
}


def error(exc):
    return {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc)}


async def subscribe_closed(name, topic):
    """Subscribe a connection of this worker once it has closed."""
    websocket = CONNECTIONS[name]
    await websocket.wait_closed()
    return await wsfleet.subscribe(websocket, topic)


async def subscribe_closing(name, topic):
    """Subscribe a connection of this worker while it closes (its close frame sent, the
    client's not received yet)."""
    websocket = CONNECTIONS[name]
    closing = asyncio.ensure_future(websocket.close(1000, "closing"))
    await asyncio.sleep(0)  # (the close frame goes out; the answer takes a round trip)
    state = websocket.protocol.state.name
    try:
        await wsfleet.subscribe(websocket, topic)
    finally:
        await closing
    return state


async def publish_paced(topic, count, size, rate, prefix=""):
    """count messages of size bytes at rate per second; each publish awaited."""
    start = time.monotonic()
    offsets, slowest = [], 0.0
    for index in range(count):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        head = f"{prefix}{index}:".encode()
        sent = time.monotonic()
        offsets.append(await wsfleet.publish(topic, head + b"x" * (size - len(head))))
        slowest = max(slowest, time.monotonic() - sent)
    end = time.monotonic()
    return {"offsets": offsets, "start": start, "end": end, "slowest": slowest}


async def request(websocket, message):
    call = json.loads(message)
    op = call.pop("op")
    if op == "publish":
        data = bytes.fromhex(call["hex"]) if "hex" in call else call["text"]
        return await wsfleet.publish(call["topic"], data)
    if op == "publish_many":  # [[topic, text], ...]: their offsets
        publishes = [wsfleet.publish(topic, text) for topic, text in call["messages"]]
        if call.get("concurrent"):
            return list(await asyncio.gather(*publishes))
        return [await publish for publish in publishes]
    if op == "publish_paced":
        return await publish_paced(**call)
    if op == "calls":
        return CALLS
    if op == "unsubscribe":  # one of this connection's subscriptions: whether it was active
        subscription = SUBSCRIPTIONS[id(websocket), call["topic"]]
        was = subscription.active
        await subscription.unsubscribe()
        await subscription.unsubscribe()  # (twice: nothing more)
        return [was, subscription.active]
    if op == "eval":
        # (the test's own expressions: bad calls to the API, whose exception it checks)
        scope = {"wsfleet": wsfleet, "websocket": websocket, "asyncio": asyncio,
                 "subscribe_closed": subscribe_closed, "subscribe_closing": subscribe_closing}
        value = eval(call["expr"], scope)
        if asyncio.iscoroutine(value):
            value = await value
        return value if isinstance(value, (int, str, type(None))) else repr(value)
    raise ValueError(f"unknown op {op!r}")


async def handler(websocket):
    query = parse_qs(urlsplit(websocket.request.path).query)
    if "name" in query:
        CONNECTIONS[query["name"][0]] = websocket
    since = None
    if "epoch" in query:
        since = (query["epoch"][0], int(query["offset"][0]))
    envelope = ENVELOPES.get(query.get("envelope", [""])[0])
    hello = {"pid": os.getpid(), "subscriptions": []}
    for topic in query.get("sub", []):
        subscription = await wsfleet.subscribe(websocket, topic, since=since, envelope=envelope)
        SUBSCRIPTIONS[id(websocket), topic] = subscription
        hello["subscriptions"].append({
            "topic": topic, "epoch": subscription.epoch, "offset": subscription.offset,
            "recovered": subscription.recovered, "active": subscription.active,
        })
    await websocket.send(json.dumps(hello))
    async for message in websocket:
        try:
            answer = {"value": await request(websocket, message)}
        except Exception as exc:
            answer = {"error": error(exc)}
        await websocket.send(json.dumps(answer))
'''


def path(
    *topics: str,
    since: tuple[str, int] | None = None,
    envelope: str | None = None,
    name: str | None = None,
) -> str:
    """The path that makes the app subscribe a connection as told."""
    query: list[tuple[str, str | int]] = [("sub", topic) for topic in topics]
    if since is not None:
        query += [("epoch", since[0]), ("offset", since[1])]
    if envelope is not None:
        query.append(("envelope", envelope))
    if name is not None:
        query.append(("name", name))
    return "/?" + urlencode(query) if query else "/"


class Client:
    """A connection to the app, with its hello."""

    def __init__(
        self, ws: ClientConnection, hello: dict[str, Any], early: list[str | bytes]
    ) -> None:
        self.ws = ws
        self.hello = hello
        self.pid: int = hello["pid"]
        self.early = early  # messages that came before the hello

    @property
    def subscriptions(self) -> list[dict[str, Any]]:
        subscriptions: list[dict[str, Any]] = self.hello["subscriptions"]
        return subscriptions

    async def call(self, op: str, timeout: float = 10, **fields: Any) -> Any:
        """A request's value; AssertionError with the app's answer if it raised."""
        answer = await self.ask(op, timeout, **fields)
        if "error" in answer:
            raise AssertionError(f"{op} {fields} raised in the app: {answer['error']}")
        return answer["value"]

    async def ask(self, op: str, timeout: float = 10, **fields: Any) -> dict[str, Any]:
        """A request's answer: {"value": ...} or {"error": ...}."""
        await self.ws.send(json.dumps({"op": op, **fields}))
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        return answer

    async def raised(self, expr: str, timeout: float = 10) -> dict[str, Any]:
        """What evaluating ``expr`` in the app raised (its type, mro and message); fails if
        it did not raise."""
        answer = await self.ask("eval", timeout, expr=expr)
        if "error" not in answer:
            raise AssertionError(f"{expr} did not raise in the app: {answer}")
        error: dict[str, Any] = answer["error"]
        return error

    async def messages(self, count: int, timeout: float = 10) -> list[str | bytes]:
        """The next ``count`` messages."""
        found, self.early = self.early[:count], self.early[count:]
        async with asyncio.timeout(timeout):
            return found + [await self.ws.recv() for _ in range(count - len(found))]

    async def upto(self, count: int, silence: float = 3) -> list[str | bytes]:
        """The next ``count`` messages, or fewer if none comes for ``silence`` seconds (so
        that a test shows what was missed, not a timeout)."""
        found, self.early = self.early[:count], self.early[count:]
        with contextlib.suppress(TimeoutError):
            while len(found) < count:
                found.append(await asyncio.wait_for(self.ws.recv(), silence))
        return found

    async def close(self) -> None:
        await self.ws.close()


async def open_client(url: str, path: str = "/", **kw: Any) -> Client:
    """A connection to the app, once its hello came (what a subscription with ``since``
    replays comes before it: the app subscribes, then says hello)."""
    ws = await connect(url.rstrip("/") + path, open_timeout=10, **kw)
    early: list[str | bytes] = []
    try:
        async with asyncio.timeout(10):
            while True:
                message = await ws.recv()
                if isinstance(message, str) and message.startswith('{"pid": '):
                    return Client(ws, json.loads(message), early)
                early.append(message)
    except BaseException:
        await ws.close()
        raise


async def spread(
    url: str, path: str, per_worker: int, pids: Iterable[int], **kw: Any
) -> list[Client]:
    """``per_worker`` connections on each worker of ``pids``, checked by the pid in each
    hello: the kernel hashes connections over the workers, so those that land elsewhere, or
    on a worker that has its count, are closed."""
    wanted = set(pids)
    clients: dict[int, list[Client]] = {pid: [] for pid in wanted}
    for _ in range(per_worker * len(wanted) * 30):
        if all(len(found) == per_worker for found in clients.values()):
            return [client for found in clients.values() for client in found]
        client = await open_client(url, path, **kw)
        if len(clients.get(client.pid, [None] * per_worker)) < per_worker:
            clients[client.pid].append(client)
        else:
            await client.close()
    raise AssertionError(f"could not spread {per_worker} connections on each of {wanted}")


async def until(
    predicate: Callable[[], Awaitable[object]], timeout: float = 10, what: str = "condition"
) -> None:
    """Poll an async condition until it holds (as harness.wait_for, in an event loop)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def settles(get: Callable[[], Any], expected: Any, timeout: float = 10) -> None:
    """Poll ``get()`` (blocking: run in a thread) until it returns ``expected``; fail with the
    last value (figures that the workers report every second, say)."""
    deadline = time.monotonic() + timeout
    while (found := await asyncio.to_thread(get)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s: {found}, not {expected}")
        await asyncio.sleep(0.05)


class Stalled:
    """A subscriber that stops reading after its hello, as a client whose event loop hangs:
    a raw socket with a small receive buffer, so that what the server sends piles up on the
    server's side. :meth:`read_to_end` then reads everything the server sent, up to its
    close frame, as a client that wakes up would."""

    def __init__(self, port: int, path: str, timeout: float = 10) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"), max_size=None)
        self.protocol.send_request(self.protocol.connect())
        self.sock.sendall(b"".join(self.protocol.data_to_send()))
        self.hello: dict[str, Any] | None = None
        self.received = 0  # messages after the hello
        self.close_code: int | None = None
        self._events(lambda: self.hello is not None)
        assert self.hello is not None, "the stream ended before the hello"
        self.pid: int = self.hello["pid"]

    def _events(self, enough: Callable[[], bool]) -> None:
        while not enough():
            data = self.sock.recv(2**16)
            if not data:
                self.protocol.receive_eof()
                return
            self.protocol.receive_data(data)
            for event in self.protocol.events_received():
                if isinstance(event, Response):
                    if event.status_code != 101:
                        raise AssertionError(f"handshake refused: {event.status_code}")
                elif event.opcode is Opcode.CLOSE:
                    self.close_code = Close.parse(event.data).code
                    return
                elif event.opcode in (Opcode.TEXT, Opcode.BINARY):
                    if self.hello is None:
                        self.hello = json.loads(event.data)
                    else:
                        self.received += 1

    def read_to_end(self) -> int | None:
        """Read up to the server's close frame (or the end of the stream): its close code, or
        None when the stream ended without one."""
        with contextlib.suppress(ConnectionResetError):
            self._events(lambda: False)
        return self.close_code

    def close(self) -> None:
        self.sock.close()
