"""Clients of wsfleet's pub/sub for the tests: subscribers that resume, paced publishers, and
the checks of what each subscriber received (gaps, duplicates, order).

The server side is :data:`APP`, written into the test's directory (:func:`write_app`): as the
chat example (wsfleet/chat.py) it sends each message in an envelope with its epoch and offset
and greets each subscriber with where it stands (``{"epoch", "offset", "recovered"}``), and it
also says which worker the connection landed on (``"pid"``), so that a test can check that its
clients are spread over every worker. ``?topic=T`` subscribes (``&epoch=E&offset=N``: resumes);
``?publish=1&topic=T`` makes a publishing connection: each text message it receives is
published, and answered with ``{"ack": offset}`` (or ``{"error": ...}``), in order.

The clients run on an event loop of their own in a thread (:class:`Clients`), so that a test's
body stays synchronous: it reloads, upgrades or kills processes while its clients go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from . import harness

T = TypeVar("T")

APP = """
import json
import os
from urllib.parse import parse_qs, urlsplit

from websockets.protocol import State

import wsfleet


def envelope(topic, epoch, offset, message):
    return json.dumps({"epoch": epoch, "offset": offset, "text": message})


async def handler(websocket):
    query = parse_qs(urlsplit(websocket.request.path).query)
    topic = query["topic"][0]
    if "publish" in query:
        await websocket.send(json.dumps({"pid": os.getpid()}))
        async for message in websocket:
            try:
                answer = {"ack": await wsfleet.publish(topic, message), "text": message}
            except Exception as exc:
                answer = {"error": repr(exc), "text": message}
            # Closing (a drain's 1012): no answer, but go on reading. send() would wait for
            # the close to end, which needs the client's close frame read, behind what it
            # sent meanwhile: with 16 messages queued, websockets stops reading, and the
            # close waits for --close-timeout (10 s).
            if websocket.protocol.state is State.OPEN:
                await websocket.send(json.dumps(answer))
        return
    since = None
    if "epoch" in query:
        since = (query["epoch"][0], int(query["offset"][0]))
    subscription = await wsfleet.subscribe(websocket, topic, since=since, envelope=envelope)
    hello = {"epoch": subscription.epoch, "offset": subscription.offset}
    hello.update(recovered=subscription.recovered, pid=os.getpid())
    await websocket.send(json.dumps(hello))
    await websocket.wait_closed()
"""

CONNECT_TIMEOUT = 10.0  # seconds a (re)connection may take, the retries included
RETRY = 0.05  # seconds between attempts to connect (a worker replaced, a master handing over)


def write_app(directory: Path) -> str:
    """Write :data:`APP` into ``directory`` (the master's cwd); its ``--app`` value."""
    (directory / "pubsub_app.py").write_text(APP)
    return "pubsub_app:handler"


class Clients:
    """An event loop in a thread for the test's clients; ended (every task cancelled) on exit.

    uvloop's (a dependency of wsfleet's): 200 subscribers of a topic at 200 messages per
    second are 40,000 messages per second to read here, on a machine the servers share, and
    it reads them in 8 us each, not 10 (measured with this module's subscribers).
    """

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Clients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the clients' loop; its result (its exception), within ``timeout``."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"the clients did not finish within {timeout}s") from None

    def call(self, function: Any, *args: Any) -> Any:
        """A plain function on the clients' loop (to read their state consistently)."""

        async def call() -> Any:
            return function(*args)

        return self.run(call(), 10)


def _url(base: str, **query: object) -> str:
    return f"{base}?{urlencode({k: v for k, v in query.items() if v is not None})}"


async def _connect(url: str, deadline: float) -> ClientConnection:
    """Connect, trying again (a worker restarting, a master handing over) until ``deadline``."""
    while True:
        try:
            return await connect(url, open_timeout=CONNECT_TIMEOUT, max_size=None)
        except Exception as exc:  # refused, reset, a 503 from a draining worker, a timeout
            if time.monotonic() >= deadline:
                raise AssertionError(f"cannot connect to {url}: {exc!r}") from exc
            await asyncio.sleep(RETRY)


# Subscribers


@dataclass
class Session:
    """One connection of a subscriber: where it resumed from and what the server said."""

    since: tuple[str, int] | None
    pid: int = 0
    epoch: str = ""
    offset: int = -1  # the subscription's offset (the hello's), -1 before the hello
    recovered: bool | None = None
    received: int = 0  # messages in this connection
    close_code: int | None = None  # None while open; 1006 when closed without a close frame


class Subscriber:
    """A subscriber of ``topic`` that, when its connection ends (closed by the server with
    1012 or 1013, or cut: 1006), reconnects with the last ``(epoch, offset)`` it saw, as the
    chat example's page does; every message it receives is kept in ``received`` as
    ``(epoch, offset, text)``, over all its connections (``sessions``).

    Its position follows the page's rule: a message's (or a hello's) epoch and offset
    replace the last ones when the epoch differs or the offset is further on.
    """

    def __init__(self, url: str, topic: str, *, resume: bool = True) -> None:
        self.url = url
        self.topic = topic
        self.resume = resume
        self.received: list[tuple[str, int, str]] = []
        self.sessions: list[Session] = []
        self.position: tuple[str, int] | None = None
        self.greeted = asyncio.Event()  # the current connection's hello came
        self.errors: list[str] = []
        self._ws: ClientConnection | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        """The worker the current (last) connection landed on."""
        return self.sessions[-1].pid if self.sessions else 0

    async def connect(self, since: tuple[str, int] | None = None) -> None:
        """Connect (from ``since``, else from the last position) and wait for the hello;
        then keep reading (and resuming) in the background until :meth:`drop`."""
        if since is not None:
            self.position = since
        await self._open(time.monotonic() + CONNECT_TIMEOUT)
        self._task = asyncio.ensure_future(self._run())
        await asyncio.wait_for(self.greeted.wait(), CONNECT_TIMEOUT)

    async def _open(self, deadline: float) -> None:
        epoch, offset = self.position if self.position is not None else (None, None)
        self.greeted.clear()
        ws = await _connect(_url(self.url, topic=self.topic, epoch=epoch, offset=offset), deadline)
        self._ws = ws
        self.sessions.append(Session(since=self.position))

    async def _run(self) -> None:
        while True:
            ws, session = self._ws, self.sessions[-1]
            assert ws is not None
            try:
                async for data in ws:
                    self._on_message(session, data)
            except ConnectionClosed:
                pass
            session.close_code = ws.close_code if ws.close_code is not None else 1006
            if self._stopping or not self.resume:
                return
            try:
                await self._open(time.monotonic() + CONNECT_TIMEOUT)
            except AssertionError as exc:
                self.errors.append(str(exc))
                return

    def _on_message(self, session: Session, data: str | bytes) -> None:
        message = json.loads(data)
        epoch, offset = message["epoch"], message["offset"]
        if "text" in message:
            self.received.append((epoch, offset, message["text"]))
            session.received += 1
        else:
            session.pid, session.epoch, session.offset = message["pid"], epoch, offset
            session.recovered = message["recovered"]
            self.greeted.set()
        position = self.position
        if position is None or epoch != position[0] or offset > position[1]:
            self.position = (epoch, offset)

    async def drop(self) -> None:
        """Close the connection from the client's side, without resuming (:meth:`connect`
        resumes later from the last position)."""
        self._stopping = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            await self._task
        self._stopping = False


# Publishers


@dataclass
class Sent:
    """A published message, and what became of it."""

    text: str
    at: float  # time.monotonic() when sent
    session: int  # index of the publisher's connection it was sent on
    offset: int = 0  # acknowledged offset (0: not acknowledged)
    acked_at: float = 0.0
    error: str = ""


class Publisher:
    """Publishes ``{name}-{n}`` messages at ``rate`` per second (on a fixed schedule, not
    waiting for the acknowledgements) through a publishing connection, which it opens again
    (on the next send) when the server closes it. A message sent on a connection that closed
    before its acknowledgement came has an unknown fate (offset 0, no error)."""

    def __init__(self, url: str, topic: str, name: str) -> None:
        self.url = url
        self.topic = topic
        self.name = name
        self.sent: list[Sent] = []
        self.pids: list[int] = []  # the worker of each connection
        self.close_codes: list[int] = []
        self.errors: list[str] = []
        self._ws: ClientConnection | None = None
        self._unacked: collections.deque[Sent] = collections.deque()
        self._readers: list[asyncio.Task[None]] = []
        self._pacer: asyncio.Task[None] | None = None
        self._open_lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.pids[-1] if self.pids else 0

    async def connect(self) -> None:
        """Open the publishing connection (its worker's pid in ``pids``)."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        ws = await _connect(_url(self.url, topic=self.topic, publish=1), deadline)
        hello = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT))
        self._ws = ws
        self.pids.append(hello["pid"])
        self._unacked = collections.deque()
        self._readers.append(asyncio.ensure_future(self._read(ws, self._unacked)))

    async def close(self) -> None:
        await self.stop(settle=0)
        if self._ws is not None:
            await self._ws.close()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def start(self, rate: float, count: int | None = None) -> None:
        """Publish in the background, ``rate`` messages per second (``count`` at most)."""
        self._pacer = asyncio.ensure_future(self._pace(rate, count))

    async def stop(self, settle: float = 5.0) -> None:
        """Stop publishing; wait up to ``settle`` seconds for the acknowledgements due."""
        if self._pacer is not None:
            self._pacer.cancel()
            await asyncio.gather(self._pacer, return_exceptions=True)
        deadline = time.monotonic() + settle
        while self._unacked and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def publish(self, text: str, timeout: float = CONNECT_TIMEOUT) -> Sent:
        """Send one message; wait for its acknowledgement (or an error, or the connection's
        end, or ``timeout``)."""
        sent = await self._send(text)
        unacked = self._unacked
        deadline = time.monotonic() + timeout
        while sent in unacked and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return sent

    async def _send(self, text: str) -> Sent:
        if self._ws is None or self._ws.close_code is not None:
            async with self._open_lock:
                if self._ws is None or self._ws.close_code is not None:
                    await self.connect()
        ws = self._ws
        assert ws is not None
        sent = Sent(text, time.monotonic(), len(self.pids) - 1)
        self.sent.append(sent)
        self._unacked.append(sent)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)
        return sent

    async def _pace(self, rate: float, count: int | None) -> None:
        due, n = time.monotonic(), 0
        while count is None or n < count:
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            # Late (a send that waited for its connection's close, a busy machine): on at
            # the rate from now, not in a burst that makes up for it.
            due = max(due, time.monotonic()) + 1 / rate
            try:
                await self._send(f"{self.name}-{n}")
            except AssertionError as exc:  # could not connect again
                self.errors.append(str(exc))
                return
            n += 1

    async def _read(self, ws: ClientConnection, unacked: collections.deque[Sent]) -> None:
        try:
            async for data in ws:
                answer = json.loads(data)
                if not unacked or unacked[0].text != answer["text"]:
                    self.errors.append(f"an answer for {answer['text']!r} out of turn")
                    continue
                sent = unacked.popleft()
                sent.acked_at = time.monotonic()
                if "ack" in answer:
                    sent.offset = answer["ack"]
                else:
                    sent.error = answer["error"]
        except ConnectionClosed:
            pass
        self.close_codes.append(ws.close_code if ws.close_code is not None else 1006)
        unacked.clear()  # (their fate is unknown: sent, not acknowledged)

    def acked(self) -> list[Sent]:
        return [s for s in self.sent if s.offset]

    def failed(self) -> list[Sent]:
        """Messages answered with an error, or never acknowledged."""
        return [s for s in self.sent if not s.offset]


# Spreading clients over the workers


async def subscribe_all(url: str, topic: str, count: int, *, batch: int = 50) -> list[Subscriber]:
    """``count`` subscribers, each greeted (connected ``batch`` at a time)."""
    subscribers = [Subscriber(url, topic) for _ in range(count)]
    for start in range(0, count, batch):
        await asyncio.gather(*(s.connect() for s in subscribers[start : start + batch]))
    return subscribers


async def publishers_on(
    url: str, topic: str, workers: Iterable[int], per_worker: int = 1, attempts: int = 40
) -> list[Publisher]:
    """Publishing connections, ``per_worker`` on each of ``workers`` (by pid): connections
    land where the kernel puts them, so extra ones are opened, and closed again."""
    wanted = {pid: per_worker for pid in workers}
    chosen: list[Publisher] = []
    extra: list[Publisher] = []
    for n in range(attempts):
        if not any(wanted.values()):
            break
        publisher = Publisher(url, topic, f"p{n}")
        await publisher.connect()
        if wanted.get(publisher.pid, 0) > 0:
            wanted[publisher.pid] -= 1
            chosen.append(publisher)
        else:
            extra.append(publisher)
    for publisher in extra:
        await publisher.close()
    if any(wanted.values()):
        raise AssertionError(f"no publishing connection landed on {wanted} in {attempts} tries")
    return chosen


# Checks


@dataclass
class Report:
    """What one subscriber received, against the topic's sequence."""

    gaps: list[tuple[str, int]] = field(default_factory=list)  # (epoch, offset) never received
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    disorder: list[str] = field(default_factory=list)  # out of order, an epoch gone back to
    unrecovered: list[int] = field(default_factory=list)  # sessions resumed not recovered
    errors: list[str] = field(default_factory=list)  # could not connect again

    @property
    def clean(self) -> bool:
        return not (
            self.gaps or self.duplicates or self.disorder or self.unrecovered or self.errors
        )

    def __str__(self) -> str:
        return (
            f"{len(self.gaps)} gaps {self.gaps[:5]}, {len(self.duplicates)} duplicates "
            f"{self.duplicates[:5]}, disorder {self.disorder[:3]}, "
            f"sessions resumed not recovered: {self.unrecovered}, errors: {self.errors[:2]}"
        )


def check(subscriber: Subscriber, last: dict[str, int]) -> Report:
    """Whether ``subscriber`` received every message once, in order, from where its first
    connection began to the topic's ``last`` offset of each epoch (``{epoch: offset}``), and
    each of its resumes was recovered.

    Messages of an epoch start after the first hello's offset (the first epoch) or at 1 (an
    epoch that began while it listened); an epoch, once left, is not seen again.
    """
    report = Report(errors=list(subscriber.errors))
    first = subscriber.sessions[0]
    seen: dict[str, list[int]] = {}
    order: list[str] = []
    for epoch, offset, _ in subscriber.received:
        if epoch not in seen:
            seen[epoch] = []
            order.append(epoch)
        elif order[-1] != epoch:
            report.disorder.append(f"epoch {epoch} again after {order[-1]}")
        offsets = seen[epoch]
        if offsets and offset <= offsets[-1]:
            if offset in offsets:
                report.duplicates.append((epoch, offset))
            else:
                report.disorder.append(f"{epoch}:{offset} after {offsets[-1]}")
            continue
        offsets.append(offset)
    epochs = order or [first.epoch]
    for index, epoch in enumerate(epochs):
        begin = first.offset + 1 if epoch == first.epoch and index == 0 else 1
        end = last.get(epoch, 0)
        got = set(seen.get(epoch, ()))
        report.gaps.extend((epoch, o) for o in range(begin, end + 1) if o not in got)
        if any(o < begin or o > end for o in got):
            report.disorder.append(f"{epoch}: offsets outside {begin}..{end}")
    for number, session in enumerate(subscriber.sessions):
        if session.since is not None and session.recovered is not True:
            report.unrecovered.append(number)
    return report


def one_order(subscribers: Iterable[Subscriber]) -> dict[tuple[str, int], str]:
    """The topic's messages by (epoch, offset), as all the subscribers received them; an
    AssertionError when two received different messages at one place."""
    found: dict[tuple[str, int], str] = {}
    for subscriber in subscribers:
        for epoch, offset, text in subscriber.received:
            if found.setdefault((epoch, offset), text) != text:
                raise AssertionError(
                    f"{epoch}:{offset} is {text!r} for one subscriber and "
                    f"{found[(epoch, offset)]!r} for another"
                )
    return found


def repeated(found: dict[tuple[str, int], str]) -> dict[str, list[tuple[str, int]]]:
    """Messages found at more than one place (published once, sequenced twice)."""
    places: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for place, text in found.items():
        places[text].append(place)
    return {text: where for text, where in places.items() if len(where) > 1}


def last_offsets(found: dict[tuple[str, int], str]) -> dict[str, int]:
    last: dict[str, int] = {}
    for epoch, offset in found:
        last[epoch] = max(last.get(epoch, 0), offset)
    return last


def unseen_acks(publishers: Iterable[Publisher], found: dict[tuple[str, int], str]) -> list[str]:
    """Acknowledged messages that no subscriber received at their acknowledged offset (in
    whatever epoch: a publish returns its offset alone)."""
    where: dict[str, set[int]] = collections.defaultdict(set)
    for (_, offset), text in found.items():
        where[text].add(offset)
    return [
        f"{s.text}@{s.offset}"
        for publisher in publishers
        for s in publisher.acked()
        if s.offset not in where[s.text]
    ]


async def settle(subscribers: Iterable[Subscriber], text: str, timeout: float = 10) -> None:
    """Wait until every subscriber received ``text`` (the last message published), or
    ``timeout`` passes (the checks then say what is missing)."""
    waiting = list(subscribers)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        waiting = [s for s in waiting if not any(r[2] == text for r in s.received[-20:])]
        await asyncio.sleep(0.05)


# Load, and its end


def acked(clients: Clients, publishers: list[Publisher]) -> int:
    return int(clients.call(lambda: sum(len(p.acked()) for p in publishers)))


def publish_for(clients: Clients, publishers: list[Publisher], count: int, timeout: float = 30):
    """Wait until ``count`` more messages than now are acknowledged: the load ran (not a
    sleep: the count is what the test needs before and after a restart)."""
    target = acked(clients, publishers) + count
    harness.wait_for(
        lambda: acked(clients, publishers) >= target, timeout, f"{count} more publishes"
    )


def finish(
    clients: Clients, subscribers: list[Subscriber], publishers: list[Publisher]
) -> tuple[int, dict[tuple[str, int], str]]:
    """Stop publishing, publish a last message and wait until every subscriber has it: its
    offset, and the topic's messages as the subscribers received them."""

    async def last() -> int:
        await asyncio.gather(*(publisher.stop() for publisher in publishers))
        sent = await publishers[0].publish("last")
        assert sent.offset, f"the last message was not acknowledged: {sent}"
        await settle(subscribers, "last", timeout=40)
        return sent.offset

    offset = clients.run(last(), 60)
    return offset, clients.call(one_order, subscribers)
