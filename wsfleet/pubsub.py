"""Publish/subscribe in the app: ``wsfleet.publish`` and ``wsfleet.subscribe``, in a worker.

Each worker has one :class:`Client`, connected to its host's hub (wsfleet/hub.py), which
sequences every topic. A worker subscribes to a topic at the hub once, however many of its
connections subscribe (a :class:`Feed`, whose cursor keeps the worker's stream of the topic
in order and without a gap: after a reconnect to the hub, what was missed is fetched from the
history). Each subscription starts with its own cursor (wsfleet/topics.py), fed the history
since its ``since`` and the feed's messages meanwhile, and joins the feed's live list once
both meet: from then on a message costs, per subscriber, what ``websockets.broadcast`` costs
(a frame written without awaiting), and the envelope is called once per message for all the
subscribers that share it.

Why not ``await websocket.send()``: the publisher never waits for a subscriber. A subscriber
whose unsent bytes pass --max-backlog is closed with 1013 instead (websockets aborts it after
the close timeout if it does not read), and it can resume from the history.

The connection to the hub is a plain non-blocking socket, not an asyncio transport: when the
hub closes it (an upgrade hands over to a new hub), every acknowledgement it sent before
closing is read, even after a write failed, so that what is sent again to the next hub is
exactly what was not sequenced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from websockets.asyncio.connection import Connection as WebSocket
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State

from . import relay
from .hub import STATS_INTERVAL
from .topics import (
    BrokerUnavailable,
    Cursor,
    CursorState,
    Deliver,
    Fetch,
    Missed,
    NewEpoch,
    Position,
    Recovery,
    check_message,
    check_since,
    check_topic,
)

log = logging.getLogger("wsfleet.pubsub")

Envelope: TypeAlias = Callable[[str, str, int, "str | bytes"], "str | bytes"]
RECONNECT = (0.01, 1.0)  # first and longest wait between attempts to reach the hub
TRY_AGAIN_LATER = CloseCode.TRY_AGAIN_LATER  # 1013

_client: Client | None = None


class Subscription:
    """A connection's subscription to a topic (``await wsfleet.subscribe(...)``).

    ``epoch`` and ``offset``: the topic's position when it began (0: no message yet), which
    the app can tell its client; ``recovered``: True when ``since`` was given and nothing
    after it was missed.
    """

    __slots__ = (
        "client",
        "cursor",
        "envelope",
        "epoch",
        "offset",
        "recovered",
        "topic",
        "websocket",
    )

    def __init__(
        self, client: Client, websocket: WebSocket, topic: str, envelope: Envelope | None
    ) -> None:
        self.client = client
        self.websocket = websocket
        self.topic = topic
        self.envelope = envelope
        self.cursor: Cursor | None = Cursor()  # None once live with its feed
        self.epoch = ""
        self.offset = 0
        self.recovered = False

    @property
    def active(self) -> bool:
        """Still delivering: not unsubscribed, and its connection open."""
        return self in self.client.subscriptions.get(self.websocket, ())

    async def unsubscribe(self) -> None:
        """No more messages of this topic to this connection (nothing if already over)."""
        self.client.leave(self)

    def __repr__(self) -> str:
        return (
            f"<Subscription {self.topic!r} epoch={self.epoch} offset={self.offset} "
            f"recovered={self.recovered}>"
        )


class Feed:
    """A worker's stream of one topic, and the subscriptions it delivers to."""

    __slots__ = ("cursor", "delivered", "live", "starting", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.cursor = Cursor()
        self.delivered = ("", -1)  # the (epoch, offset) delivered last
        self.live: dict[Envelope | None, list[Subscription]] = {}
        self.starting: list[Subscription] = []

    def empty(self) -> bool:
        return not self.live and not self.starting


class Client:
    """A worker's connection to the hub, its feeds and its subscriptions."""

    def __init__(
        self, name: str, max_backlog: int, max_size: int, broker_timeout: float | None = None
    ) -> None:
        self.name = name
        self.max_backlog = max_backlog
        self.max_size = max_size
        # With a broker: how long subscribe() waits for the history's answer (the hub bounds
        # each publish itself, and answers FAILED).
        self.broker_timeout = broker_timeout
        self.sock: socket.socket | None = None
        self.out = bytearray()
        self.writable = False
        self.reader = relay.Reader()
        self.next_request = 1
        # Requests not answered yet, in the order sent: the frame (sent again after a
        # reconnect), what to do with the answer, and with a refusal (FAILED: its reason).
        self.requests: dict[
            int, tuple[bytes, Callable[[relay.Fields], None], Callable[[str], None] | None]
        ] = {}
        self.feeds: dict[str, Feed] = {}
        self.subscriptions: dict[WebSocket, list[Subscription]] = {}
        # Messages waiting for a fragmented message to end, and their size in bytes.
        self.pending: dict[WebSocket, collections.deque[tuple[bool, bytes]]] = {}
        self.pending_bytes: dict[WebSocket, int] = {}
        self.delivered = 0
        self.dropped = 0
        self.connected = asyncio.Event()
        self.retry = RECONNECT[0]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stats: asyncio.TimerHandle | None = None
        self._closed = False

    # The connection to the hub

    def start(self) -> None:
        self._connect()
        self._send_stats()

    def close(self) -> None:
        self._closed = True
        if self._stats is not None:
            self._stats.cancel()
        self._disconnect()

    def _connect(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.name)
        except OSError as exc:  # nobody listens (the master is gone), or its queue is full
            sock.close()
            log.debug("cannot reach the hub: %s; again in %.2f s", exc, self.retry)
            loop.call_later(self.retry, self._connect)
            self.retry = min(self.retry * 2, RECONNECT[1])
            return
        self.sock, self.writable, self.reader = sock, True, relay.Reader()
        loop.add_reader(sock, self._on_readable)
        # Again, in order: the topics, then every request not answered (publishes the last
        # hub did not read, history questions), then what comes next. What was left of the
        # last connection's output goes (a frame cut in the middle, frames for it only).
        self.out = bytearray()
        for topic in self.feeds:  # (each feed's cursor then hears where its topic is)
            self.out += relay.encode_subscribe(topic)
        for frame, _, _ in self.requests.values():
            self.out += frame
        self._flush()
        self.connected.set()

    def _disconnect(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)
        sock.close()
        self.writable = False
        self.connected.clear()

    def _lost(self) -> None:
        """The hub closed (replaced, handing over, or gone): reach it again, soon, then
        less and less often while it closes at once (the delay is reset by its answers)."""
        self._disconnect()
        if not self._closed:
            asyncio.get_running_loop().call_later(self.retry, self._connect)
            self.retry = min(self.retry * 2, RECONNECT[1])

    def _write(self, frame: bytes) -> None:
        self.out += frame
        if len(self.out) == len(frame):
            self._flush()

    def _flush(self) -> None:
        sock = self.sock
        if sock is None or not self.writable:
            return
        try:
            sent = sock.send(self.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Closed by the hub: stop writing, read what it sent up to its end (_lost then).
            self.writable = False
            asyncio.get_running_loop().remove_writer(sock)
            return
        del self.out[:sent]
        loop = asyncio.get_running_loop()
        if self.out:
            loop.add_writer(sock, self._flush)
        else:
            loop.remove_writer(sock)

    def _on_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                log.warning("reading from the hub: %s", exc)
            data = b""
        if not data:
            self._lost()
            return
        self.retry = RECONNECT[0]  # (it answers)
        try:
            for frame in self.reader.feed(data):
                self._on_frame(frame)
        except relay.ProtocolError as exc:
            log.error("the hub sent a malformed frame (%s): reconnecting", exc)
            self._lost()

    def _request(
        self,
        make: Callable[[int], bytes],
        then: Callable[[relay.Fields], None],
        failed: Callable[[str], None] | None = None,
    ) -> int:
        request = self.next_request
        self.next_request += 1
        frame = make(request)
        self.requests[request] = (frame, then, failed)
        self._write(frame)
        return request

    def _on_frame(self, frame: relay.Frame) -> None:
        kind, fields = frame.kind, relay.Fields(frame.body)
        if kind == relay.MESSAGE:
            offset, epoch, topic = fields.integer(), fields.text(), fields.text()
            feed = self.feeds.get(topic)
            if feed is not None:
                self._act(feed, feed.cursor.received(epoch, offset, fields.rest()))
        elif kind in (relay.ACK, relay.RECOVERY):
            entry = self.requests.pop(fields.integer(), None)
            if entry is not None:
                entry[1](fields)
        elif kind == relay.FAILED:
            entry = self.requests.pop(fields.integer(), None)
            if entry is not None and entry[2] is not None:
                entry[2](bytes(fields.rest()).decode(errors="replace"))
        elif kind == relay.POSITION:
            offset, epoch, topic = fields.integer(), fields.text(), fields.text()
            feed = self.feeds.get(topic)
            if feed is None:
                return
            if feed.cursor.state is CursorState.STARTING:
                self._act(feed, feed.cursor.start(Recovery(epoch, offset, False)))
                feed.delivered = (feed.cursor.epoch, feed.cursor.offset)
                self._promote(feed)
            else:
                self._act(feed, feed.cursor.heard(Position(epoch, offset)))
        else:
            raise relay.ProtocolError(f"unexpected frame kind {kind!r}")

    def _send_stats(self) -> None:
        if self._closed:
            return
        if self.sock is not None:
            figures = {
                "delivered": self.delivered,
                "dropped_subscribers": self.dropped,
                "subscriptions": sum(len(subs) for subs in self.subscriptions.values()),
            }
            self._write(relay.encode_stats(json.dumps(figures).encode()))
        self._stats = asyncio.get_running_loop().call_later(STATS_INTERVAL, self._send_stats)

    # Publishing

    async def publish(self, topic: str, data: bytes) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def acknowledged(fields: relay.Fields) -> None:
            if not future.done():
                future.set_result(fields.integer())

        def failed(reason: str) -> None:
            if not future.done():
                future.set_exception(BrokerUnavailable(reason))

        self._request(
            lambda request: relay.encode_publish(request, topic, data), acknowledged, failed
        )
        return await future

    # Subscribing

    async def subscribe(
        self,
        websocket: WebSocket,
        topic: str,
        since: tuple[str, int] | None,
        envelope: Envelope | None,
    ) -> Subscription:
        state = websocket.protocol.state
        if state is not State.OPEN:
            if state is State.CLOSING:  # (its close code is known once closed, as send() waits)
                await websocket.wait_closed()
            raise websocket.protocol.close_exc
        feed = self.feeds.get(topic)
        if feed is None:
            feed = self.feeds[topic] = Feed(topic)
            self._write(relay.encode_subscribe(topic))
        subscription = Subscription(self, websocket, topic, envelope)
        feed.starting.append(subscription)
        subscriptions = self.subscriptions.get(websocket)
        if subscriptions is None:
            subscriptions = self.subscriptions[websocket] = []
            self._spawn(self._watch(websocket))
        subscriptions.append(subscription)
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        epoch, offset = since if since is not None else ("", 0)

        def started(fields: relay.Fields) -> None:
            recovery = _recovery(fields)
            subscription.epoch, subscription.offset = recovery.epoch, recovery.offset
            subscription.recovered = since is not None and recovery.recovered
            if subscription.cursor is not None:  # (None: it left meanwhile)
                self._act_one(subscription, subscription.cursor.start(recovery))
                self._promote(feed)
            if not answered.done():
                answered.set_result(None)

        def failed(reason: str) -> None:
            if not answered.done():
                answered.set_exception(BrokerUnavailable(reason))

        request = self._request(
            lambda r: relay.encode_history(r, topic, epoch, offset), started, failed
        )
        try:
            async with asyncio.timeout(self.broker_timeout):
                await answered
        except TimeoutError:
            self.requests.pop(request, None)
            self.leave(subscription)
            raise BrokerUnavailable(
                f"the broker did not answer within {self.broker_timeout:g} s: not subscribed "
                f"to {topic!r}"
            ) from None
        except BaseException:
            self.requests.pop(request, None)
            self.leave(subscription)
            raise
        return subscription

    def leave(self, subscription: Subscription) -> None:
        subscriptions = self.subscriptions.get(subscription.websocket)
        if subscriptions is None or subscription not in subscriptions:
            return
        subscriptions.remove(subscription)
        if not subscriptions:
            del self.subscriptions[subscription.websocket]
        feed = self.feeds.get(subscription.topic)
        if feed is None:
            return
        if subscription.cursor is not None:
            subscription.cursor = None
            with contextlib.suppress(ValueError):
                feed.starting.remove(subscription)
        else:
            group = feed.live.get(subscription.envelope, [])
            with contextlib.suppress(ValueError):
                group.remove(subscription)
            if not group:
                feed.live.pop(subscription.envelope, None)
        if feed.empty():
            del self.feeds[subscription.topic]
            self._write(relay.encode_unsubscribe(subscription.topic))

    async def _watch(self, websocket: WebSocket) -> None:
        await websocket.wait_closed()
        for subscription in list(self.subscriptions.get(websocket, ())):
            self.leave(subscription)
        self.pending.pop(websocket, None)
        self.pending_bytes.pop(websocket, None)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Delivering

    def _act(self, feed: Feed, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Deliver):
                self._deliver(feed, action.epoch, action.offset, _bytes(action.message))
            elif isinstance(action, Fetch):
                self._fetch(feed, action)
            elif isinstance(action, Missed):
                log.warning(
                    "topic %r: the history no longer holds what this worker missed while cut "
                    "from the hub; closing its %d subscribers (1013) to resync",
                    feed.topic,
                    sum(len(g) for g in feed.live.values()) + len(feed.starting),
                )
                for group in list(feed.live.values()):
                    for subscription in list(group):
                        self._drop(subscription.websocket, "missed messages")
            elif isinstance(action, NewEpoch):
                log.info("topic %r: new epoch %s (its history was lost)", feed.topic, action.epoch)

    def _fetch(self, feed: Feed, action: Fetch) -> None:
        def filled(fields: relay.Fields) -> None:
            if self.feeds.get(feed.topic) is feed and feed.cursor.state is CursorState.FILLING:
                self._act(feed, feed.cursor.filled(_recovery(fields)))

        def failed(reason: str) -> None:  # (the broker refused: resync, as for a miss)
            if self.feeds.get(feed.topic) is feed and feed.cursor.state is CursorState.FILLING:
                log.error("topic %r: %s", feed.topic, reason)
                at = Recovery(feed.cursor.epoch, feed.cursor.offset, False)
                self._act(feed, feed.cursor.filled(at))

        topic = feed.topic
        self._request(
            lambda r: relay.encode_history(r, topic, action.epoch, action.offset), filled, failed
        )

    def _deliver(self, feed: Feed, epoch: str, offset: int, data: bytes) -> None:
        """The feed's next message, to every subscription."""
        feed.delivered = (epoch, offset)
        text, body = data[:1] == relay.TEXT, data[1:]
        for envelope, group in list(feed.live.items()):
            if envelope is None:
                out_text, out = text, body
            else:
                try:
                    out_text, out = _wrap(envelope, feed.topic, epoch, offset, text, body)
                except Exception:
                    log.exception(
                        "the envelope of topic %r failed: closing its %d subscribers (1011)",
                        feed.topic,
                        len(group),
                    )
                    for subscription in list(group):
                        self._drop(
                            subscription.websocket, "envelope failed", CloseCode.INTERNAL_ERROR
                        )
                    continue
            # The frame, serialized once for all the connections without an extension (what
            # send_text/send_binary would write to each): a frame made per subscriber was 15%
            # of a delivery's CPU (docs/pubsub.md). With permessage-deflate, each its own.
            opcode = Opcode.TEXT if out_text else Opcode.BINARY
            frame = Frame(opcode, out).serialize(mask=False, extensions=[])
            slow = [s.websocket for s in group if self._send(s.websocket, out_text, out, frame)]
            for websocket in slow:  # (after the loop: dropping changes the group)
                self._drop(websocket, "too slow")
        if feed.starting:
            for subscription in list(feed.starting):
                if subscription.cursor is not None:
                    self._act_one(subscription, subscription.cursor.received(epoch, offset, data))
            self._promote(feed)

    def _act_one(self, subscription: Subscription, actions: list[Any]) -> None:
        """A starting subscription's own deliveries (the history it recovers), and its own
        gap when the feed began after its answer (a broker answers them in any order)."""
        for action in actions:
            if isinstance(action, Fetch):
                self._fetch_one(subscription, action)
            elif isinstance(action, Missed):
                self._drop(subscription.websocket, "missed messages")
                return
            elif isinstance(action, Deliver):
                data = _bytes(action.message)
                text, body = data[:1] == relay.TEXT, data[1:]
                if subscription.envelope is not None:
                    try:
                        text, body = _wrap(
                            subscription.envelope,
                            subscription.topic,
                            action.epoch,
                            action.offset,
                            text,
                            body,
                        )
                    except Exception:
                        log.exception("the envelope of topic %r failed (1011)", subscription.topic)
                        self._drop(
                            subscription.websocket, "envelope failed", CloseCode.INTERNAL_ERROR
                        )
                        return
                if self._send(subscription.websocket, text, body):
                    self._drop(subscription.websocket, "too slow")
                    return

    def _fetch_one(self, subscription: Subscription, action: Fetch) -> None:
        def filled(fields: relay.Fields) -> None:
            cursor = subscription.cursor
            if cursor is None or cursor.state is not CursorState.FILLING:
                return  # (it left, or joined the feed)
            self._act_one(subscription, cursor.filled(_recovery(fields)))
            feed = self.feeds.get(subscription.topic)
            if feed is not None:
                self._promote(feed)

        topic = subscription.topic
        self._request(lambda r: relay.encode_history(r, topic, action.epoch, action.offset), filled)

    def _promote(self, feed: Feed) -> None:
        """Starting subscriptions that caught up with the feed join its live list."""
        for subscription in list(feed.starting):
            cursor = subscription.cursor
            if cursor is None or cursor.state is not CursorState.LIVE:
                continue
            if (cursor.epoch, cursor.offset) != feed.delivered:
                continue
            feed.starting.remove(subscription)
            subscription.cursor = None
            feed.live.setdefault(subscription.envelope, []).append(subscription)

    def _send(
        self, websocket: WebSocket, text: bool, data: bytes, frame: bytes | None = None
    ) -> bool:
        """Write one message to a subscriber without waiting, as websockets.broadcast does
        (``frame``: the message's frame, for a connection without extensions); True when its
        unsent bytes are now past --max-backlog (the caller drops it)."""
        protocol = websocket.protocol
        if protocol.state is not State.OPEN:
            return False
        if websocket.send_in_progress is not None or websocket in self.pending:
            # A fragmented message is being sent: this one follows it, in order.
            queue = self.pending.get(websocket)
            if queue is None:
                queue = self.pending[websocket] = collections.deque()
                self._spawn(self._send_later(websocket, queue))
            queue.append((text, data))
            waiting = self.pending_bytes.get(websocket, 0) + len(data)
            self.pending_bytes[websocket] = waiting
            return waiting > self.max_backlog
        try:
            if frame is not None and not protocol.extensions:
                # What send_binary/send_text queue, checks included: the state is OPEN (above)
                # and no fragmented message is in progress (send_in_progress, above). Only
                # websockets' debug log of each frame is not written for these.
                protocol.writes.append(frame)
            elif text:
                protocol.send_text(data)
            else:
                protocol.send_binary(data)
            websocket.send_data()
        except Exception as exc:  # as broadcast: the connection's end is its handler's to see
            log.debug("delivering to a subscriber failed: %s", exc)
            return False
        self.delivered += 1
        unsent = websocket.transport.get_write_buffer_size()
        return unsent + getattr(websocket, "_writes_size", 0) > self.max_backlog

    async def _send_later(
        self, websocket: WebSocket, queue: collections.deque[tuple[bool, bytes]]
    ) -> None:
        try:
            while queue:
                text, data = queue[0]
                await websocket.send(data, text=text)
                queue.popleft()
                self.pending_bytes[websocket] -= len(data)
                self.delivered += 1
        except Exception:
            pass
        finally:
            self.pending.pop(websocket, None)
            self.pending_bytes.pop(websocket, None)

    def _drop(self, websocket: WebSocket, why: str, code: int = TRY_AGAIN_LATER) -> None:
        """Close a subscriber (its subscriptions end now): too slow, or its worker missed
        messages (1013, counted in dropped_subscribers), or its envelope failed (1011: the
        app's error, logged with its traceback, not counted as dropped)."""
        if websocket not in self.subscriptions:
            return
        for subscription in list(self.subscriptions[websocket]):
            self.leave(subscription)
        self.pending.pop(websocket, None)
        self.pending_bytes.pop(websocket, None)
        if code == TRY_AGAIN_LATER:
            self.dropped += 1
            log.info("subscriber %s closed (1013): %s", _peer(websocket), why)
        self._spawn(websocket.close(code, why))


def _wrap(
    envelope: Envelope, topic: str, epoch: str, offset: int, text: bool, body: bytes
) -> tuple[bool, bytes]:
    out = envelope(topic, epoch, offset, body.decode() if text else body)
    if isinstance(out, str):
        return True, out.encode()
    if isinstance(out, bytes | bytearray | memoryview):
        return False, bytes(out)
    raise TypeError(f"an envelope returns str or bytes, not {type(out).__name__}")


def _bytes(message: str | bytes) -> bytes:
    """A payload as the hub relays it (the store holds payloads, which are bytes, here)."""
    assert isinstance(message, bytes)
    return message


def _recovery(fields: relay.Fields) -> Recovery:
    offset, recovered, epoch = fields.integer(), fields.flag(), fields.text()
    return Recovery(epoch, offset, recovered, fields.messages())


def _peer(websocket: WebSocket) -> str:
    address = websocket.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


# The API


def start(
    name: str, max_backlog: int, max_size: int, broker_timeout: float | None = None
) -> Client:
    """In a worker, once its event loop runs: reach the hub listening on ``name``."""
    global _client
    _client = Client(name, max_backlog, max_size, broker_timeout)
    _client.start()
    return _client


def current() -> Client:
    if _client is None:
        raise RuntimeError(
            "wsfleet.publish() and wsfleet.subscribe() work in an app that wsfleet serves "
            f"(wsfleet start, wsfleet worker, wsfleet.run()), not in process {os.getpid()}"
        )
    return _client


async def publish(topic: str, message: str | bytes) -> int:
    """Publish ``message`` on ``topic`` to every subscriber of the fleet; its offset.

    TypeError for a topic that is not a str or a message neither str nor bytes-like;
    ValueError for an empty topic, one over 256 characters, or a message over --max-size:
    raised at once, nothing published. With --broker: BrokerUnavailable when Redis could
    not take it within --broker-timeout.
    """
    topic = check_topic(topic)
    client = current()
    checked = check_message(message, client.max_size)
    return await client.publish(topic, relay.payload(checked))


async def subscribe(
    websocket: Any,
    topic: str,
    *,
    since: tuple[str, int] | None = None,
    envelope: Envelope | None = None,
) -> Subscription:
    """Send every message published on ``topic`` to ``websocket`` from now on (see the
    README's pub/sub section): with ``since=(epoch, offset)``, first what it missed."""
    topic = check_topic(topic)
    since = check_since(since)
    if envelope is not None and not callable(envelope):
        raise TypeError(f"envelope is a function, not {type(envelope).__name__}")
    if not isinstance(websocket, WebSocket):
        raise TypeError(
            f"subscribe() takes a websockets connection, not {type(websocket).__name__}"
        )
    return await current().subscribe(websocket, topic, since, envelope)
