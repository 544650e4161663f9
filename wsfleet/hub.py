"""The hub: the one process of a host that sequences its topics and relays their messages.

Every worker connects to it (wsfleet/pubsub.py) on a Unix socket that the master opened and
keeps (an abstract name, checked by peer credentials: only this user and root). A publish is
given its offset here, stored in the topic's history (wsfleet/topics.py) and written, as one
encoded frame, to each worker that subscribes to the topic, then acknowledged: every worker
sees a topic's messages in one order, the hub's. The hub never decodes a message.

Why a process of its own and not the master's loop: the master's duties (signals, heartbeats,
the watchdog, status) never wait behind pub/sub traffic, whatever its rate (docs/pubsub.md
measures the master's loop under the heaviest publishing). The master forks it before its
workers and replaces it at once if it dies: the new one's topics have new epochs, which the
workers' cursors see (their subscribers are told by the envelope's epoch). A reload does not
touch it: the history stays. A lone ``wsfleet worker`` runs it in its own event loop.

An upgrade hands the history over: the new master's hub waits, not accepting, until the new
master serves; then it connects to the listening socket (which only the old hub accepts on),
sends TAKEOVER with the token the old master handed over, and receives the old hub's state.
The old hub stops accepting, processes what it has read, sends its state and closes every
worker's connection: the workers reconnect to the same name, where the new hub now accepts,
subscribe again and send again what was not acknowledged (the old hub had not read it: what
it read, it answered before closing). So nothing is sequenced twice, and the offsets go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from . import relay
from .admin import AdminServer, Port
from .privileges import peer_allowed
from .relay import Fields
from .topics import BrokerUnavailable, Position, Recovery, Topics

if TYPE_CHECKING:
    from .broker import Broker

log = logging.getLogger("wsfleet.hub")

# A worker that stops reading (a blocked event loop) is dropped past this much unsent: it
# reconnects and takes what it missed from the history, or tells its subscribers they missed.
MAX_UNSENT = 64 * 2**20
TAKEOVER_LIMIT = 5.0  # seconds a new hub waits for the old one's state before starting anew
CLOSE_LIMIT = 2.0  # seconds an exiting hub gives its broker's connections to close
ADMIN_FINISH = 1.0  # seconds an exiting hub gives the admin API's requests to be answered
STATS = ("delivered", "dropped_subscribers", "subscriptions")
# The figures of the status's "pubsub" (and the metrics), as the hub reports them.
FIGURES = ("published", "delivered", "dropped_subscribers", "topics", "subscriptions", "history")
STATS_INTERVAL = 1.0  # seconds between the figures each worker sends the hub, and it the master


def address(master_pid: int, token: str) -> str:
    """The hub's abstract socket name: a fleet's own, kept across upgrades (the socket is)."""
    return f"\0wsfleet-hub-{master_pid}-{token[:8]}"


def listen(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(name)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass
class Totals:
    """What the hub has counted, and the figures of workers gone (kept across an upgrade)."""

    published: int = 0  # before this store (an upgrade's old hub)
    delivered: int = 0
    dropped_subscribers: int = 0


class Peer(asyncio.Protocol):
    """One worker's connection to the hub (or, in an upgrade, the new hub asking)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.reader = relay.Reader()
        self.topics: set[str] = set()
        self.stats: dict[str, int] = {}
        self.transport: asyncio.Transport | None = None
        self.dropped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (not an isinstance check: uvloop's transports, a lone worker's hub, are not
        # asyncio.Transport subclasses, and have the same methods)
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is None or not peer_allowed(sock):
            log.warning("a process of another user connected to the hub: refused")
            self.dropped = True
            self.transport.abort()
            return
        self.hub.peers.add(self)

    def data_received(self, data: bytes) -> None:
        if self.dropped:
            return
        try:
            for frame in self.reader.feed(data):
                self.hub.on_frame(self, frame)
                if self.closed():
                    return
        except (relay.ProtocolError, ValueError) as exc:
            log.warning("the hub dropped a worker's connection: %s", exc)
            self.drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.forget(self)

    def closed(self) -> bool:
        return self.dropped

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.dropped:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_UNSENT:
            log.warning(
                "a worker read nothing of its last %d MiB from the hub: dropped (it reconnects "
                "and resumes from the history)",
                MAX_UNSENT >> 20,
            )
            self.drop()

    def drop(self) -> None:
        self.dropped = True
        if self.transport is not None:
            self.transport.abort()


class Hub:
    """The sequencer and relay of one host's topics (see the module's docstring)."""

    def __init__(
        self,
        topics: Topics,
        token: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker: Broker | None = None  # --broker: the topics live in Redis, not here
        self.topics = topics
        self.token = token
        self.clock = clock
        self.totals = Totals()
        self.peers: set[Peer] = set()
        self.subscribers: dict[str, set[Peer]] = {}
        self.server: asyncio.AbstractServer | None = None
        self.handing_over = False
        self.handed_over = asyncio.Event()  # set once handed over, every worker's connection closed
        self.tasks: set[asyncio.Task[None]] = set()  # (with a broker: what awaits Redis)
        self.publishing: set[asyncio.Future[Position]] = set()  # (workers', awaiting Redis)
        self.admin: AdminServer | None = None  # --admin, while this hub serves (wsfleet/admin.py)

    async def serve(self, listener: socket.socket) -> None:
        """Accept the workers' connections on ``listener`` (from now on)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: Peer(self), sock=listener)

    # What a worker asks

    def on_frame(self, peer: Peer, frame: relay.Frame) -> None:
        kind, fields = frame.kind, Fields(frame.body)
        if kind == relay.PUBLISH:
            request, topic = fields.integer(), fields.text()
            data = fields.rest()
            if not data:
                raise relay.ProtocolError("a message without its kind")
            if self.broker is not None:
                sequenced = self.broker.publish(topic, data)
                sequenced.add_done_callback(functools.partial(self._acknowledge, peer, request))
                self.publishing.add(sequenced)
                sequenced.add_done_callback(self.publishing.discard)
                return
            epoch, offset = self._sequence(topic, data)
            peer.write(relay.encode_ack(request, epoch, offset))
        elif kind == relay.SUBSCRIBE:
            topic = fields.text()
            if topic in peer.topics:
                raise relay.ProtocolError(f"subscribed twice to {topic!r}")
            peer.topics.add(topic)
            self.subscribers.setdefault(topic, set()).add(peer)
            if self.broker is not None:
                # Asked now, so before any question this worker sends next (answered in
                # order), and sent once the topic's channel is confirmed (broker.since).
                self.broker.watch(topic)
                self._spawn(self._position(peer, topic, self.broker.since(topic, "", 0)))
                return
            recovery = self.topics.subscribe(topic, None, self.clock())
            peer.write(relay.encode_position(topic, recovery.epoch, recovery.offset))
        elif kind == relay.UNSUBSCRIBE:
            topic = fields.text()
            if topic not in peer.topics:
                raise relay.ProtocolError(f"not subscribed to {topic!r}")
            self._leave(peer, topic)
        elif kind == relay.HISTORY:
            request, offset = fields.integer(), fields.integer()
            epoch, topic = fields.text(), fields.text()
            if self.broker is not None:
                self._spawn(self._answer(peer, request, self.broker.since(topic, epoch, offset)))
                return
            self._recovery(peer, request, self.topics.since(topic, epoch, offset, self.clock()))
        elif kind == relay.STATS:
            stats = json.loads(fields.rest())
            if not isinstance(stats, dict) or not all(
                isinstance(stats.get(key), int) for key in STATS
            ):
                raise relay.ProtocolError(f"bad figures: {stats!r:.80}")
            peer.stats = {key: stats[key] for key in STATS}
        elif kind == relay.TAKEOVER:
            pid, token = fields.integer(), fields.text()
            if token != self.token or pid == os.getpid():
                raise relay.ProtocolError("a takeover without the fleet's token")
            self.hand_over(peer, pid)
        else:
            raise relay.ProtocolError(f"unknown frame kind {kind!r}")

    def _recovery(self, peer: Peer, request: int, answer: Recovery) -> None:
        messages: Any = answer.messages  # (the hub stores payloads: bytes)
        peer.write(
            relay.encode_recovery(request, answer.epoch, answer.offset, answer.recovered, messages)
        )

    def _sequence(self, topic: str, payload: bytes) -> tuple[str, int]:
        """Sequence a payload (relay.payload) on its topic and write it to every worker
        that subscribes: its epoch and offset."""
        epoch, offset = self.topics.publish(topic, payload, self.clock())
        out = relay.encode_message(topic, epoch, offset, payload)
        for subscriber in self.subscribers.get(topic, ()):
            subscriber.write(out)
        return epoch, offset

    async def publish(self, topic: str, payload: bytes) -> int:
        """A publish from outside the workers (the admin API): its offset (with a broker,
        BrokerUnavailable after --broker-timeout)."""
        if self.broker is not None:
            return (await self.broker.publish(topic, payload)).offset
        return self._sequence(topic, payload)[1]

    def _leave(self, peer: Peer, topic: str) -> None:
        peer.topics.discard(topic)
        subscribers = self.subscribers[topic]
        subscribers.discard(peer)
        if not subscribers:
            del self.subscribers[topic]
        if self.broker is None:
            self.topics.unsubscribe(topic)
        elif not subscribers:
            self.broker.unwatch(topic)

    # With a broker: what Redis answers, and what it sends

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _acknowledge(self, peer: Peer, request: int, sequenced: asyncio.Future[Position]) -> None:
        """A publish's outcome, to its worker (a callback: no task per publish)."""
        exc = sequenced.exception()
        if exc is None:
            epoch, offset = sequenced.result()
            peer.write(relay.encode_ack(request, epoch, offset))
        else:
            peer.write(relay.encode_failed(request, str(exc)))

    async def _position(self, peer: Peer, topic: str, answer: asyncio.Future[Recovery]) -> None:
        """A worker's new stream of a topic: where the topic stands, asked once its channel
        is confirmed (so that nothing falls between the two). Refused by Redis (rare: a key
        of another type, a script error): asked again every second while it subscribes."""
        while True:
            try:
                recovery = await answer
            except asyncio.CancelledError:  # (unwatched meanwhile)
                return
            except BrokerUnavailable as exc:
                log.error("topic %r: %s; asking again in 1 s", topic, exc)
                await asyncio.sleep(1.0)
                if topic not in peer.topics or peer.closed() or self.broker is None:
                    return
                answer = self.broker.since(topic, "", 0)
                continue
            if topic in peer.topics:
                peer.write(relay.encode_position(topic, recovery.epoch, recovery.offset))
            return

    async def _answer(self, peer: Peer, request: int, answer: asyncio.Future[Recovery]) -> None:
        try:
            self._recovery(peer, request, await answer)
        except BrokerUnavailable as exc:
            peer.write(relay.encode_failed(request, str(exc)))

    def deliver(self, topic: str, epoch: str, offset: int, data: bytes) -> None:
        """A message from the broker, to this host's workers that subscribe to its topic."""
        out = relay.encode_message(topic, epoch, offset, data)
        for subscriber in self.subscribers.get(topic, ()):
            subscriber.write(out)

    def heard(self, topic: str, position: Position) -> None:
        """Where a topic stands, after the broker's channels were cut: to its subscribers,
        whose cursors fetch what they missed (or hear a new epoch)."""
        out = relay.encode_position(topic, position.epoch, position.offset)
        for subscriber in self.subscribers.get(topic, ()):
            subscriber.write(out)

    def forget(self, peer: Peer) -> None:
        """A worker's connection ended (it exited, or was dropped)."""
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        for topic in list(peer.topics):
            self._leave(peer, topic)
        self.totals.delivered += peer.stats.get("delivered", 0)
        self.totals.dropped_subscribers += peer.stats.get("dropped_subscribers", 0)
        if not self.peers and self.handing_over:
            self.handed_over.set()

    # Figures

    def stats(self) -> dict[str, int]:
        """The fleet's pub/sub figures (the status's ``pubsub``; the metrics)."""
        figures = {key: 0 for key in STATS}
        for peer in self.peers:
            for key in STATS:
                figures[key] += peer.stats.get(key, 0)
        store = self.topics.stats()
        if self.broker is not None:  # (Redis holds the history: not counted here)
            store = dataclasses.replace(
                store, published=self.broker.published, subscribed=len(self.subscribers)
            )
        return {
            "published": self.totals.published + store.published,
            "delivered": self.totals.delivered + figures["delivered"],
            "dropped_subscribers": (
                self.totals.dropped_subscribers + figures["dropped_subscribers"]
            ),
            "topics": store.subscribed,
            "subscriptions": figures["subscriptions"],
            "history": store.held,
        }

    # Upgrades

    def hand_over(self, asking: Peer, pid: int) -> None:
        """An upgrade's new hub takes over: stop accepting, send it the state, close every
        worker's connection (what each was sent is flushed first: acknowledgements too).
        With a broker, the workers' publishes still awaiting Redis are answered first, and
        nothing more is read from the workers meanwhile: a worker sends again, to the new
        hub, only what this one never sent to Redis."""
        log.info("hub %d handing its topics over to hub %d", os.getpid(), pid)
        self.handing_over = True
        if self.server is not None:
            self.server.close()  # (this process's copy of the listening socket)
            self.server = None
        if self.admin is not None:  # (the new hub serves it from now on)
            self.admin.close()
            self.admin = None
        if self.broker is not None and self.publishing:
            for peer in self.peers:
                if peer.transport is not None and peer is not asking:
                    peer.transport.pause_reading()
            self._spawn(self._hand_over_after(asking, set(self.publishing)))
            return
        self._hand_over_now(asking)

    async def _hand_over_after(self, asking: Peer, publishing: set[asyncio.Future[Any]]) -> None:
        assert self.broker is not None
        await asyncio.wait(publishing, timeout=self.broker.timeout + 1)  # (each has a deadline)
        self._hand_over_now(asking)

    def _hand_over_now(self, asking: Peer) -> None:
        asking.write(relay.encode_snapshot(pickle.dumps((self.topics, self.stats()))))
        for peer in list(self.peers):
            if peer.transport is not None:
                peer.transport.close()
        if not self.peers:
            self.handed_over.set()


def restore(data: bytes, topics: Topics) -> tuple[Topics, Totals]:
    """A new hub's state from an old hub's snapshot; the options are this hub's."""
    old, figures = pickle.loads(data)
    if not isinstance(old, Topics) or not isinstance(figures, dict):
        raise ValueError("not a hub's state")
    old.configure(topics.history_size, topics.history_ttl, topics.max_idle_topics)
    totals = Totals(
        published=int(figures["published"]) - old.stats().published,
        delivered=int(figures["delivered"]),
        dropped_subscribers=int(figures["dropped_subscribers"]),
    )
    return old, totals


async def take_over_from(name: str, token: str) -> bytes | None:
    """An upgrade's new hub: the old hub's state, or None (logged) if it did not answer."""
    try:
        async with asyncio.timeout(TAKEOVER_LIMIT):
            reader, writer = await asyncio.open_unix_connection(name)
            try:
                writer.write(relay.encode_takeover(token, os.getpid()))
                frames = relay.Reader()
                while data := await reader.read(2**20):
                    for frame in frames.feed(data):
                        if frame.kind == relay.SNAPSHOT:
                            return bytes(frame.body)
            finally:
                writer.close()
    except (OSError, TimeoutError, relay.ProtocolError) as exc:
        log.warning(
            "the old hub did not hand its topics over (%s): topics start anew, with new epochs",
            str(exc) or type(exc).__name__,
        )
        return None
    log.warning("the old hub closed without handing its topics over: topics start anew")
    return None


# The hub as a process of the master's


async def serve_process(
    listener: socket.socket,
    master: socket.socket,
    topics: Topics,
    token: str,
    wait_for_takeover: bool,
    admin: Port | None = None,
    setup: Callable[[Hub], None] | None = None,
) -> int:
    """The hub child's life (``asyncio.run`` it): serve at once, or once told to take an old
    hub's topics over (the workers, and ``admin``: --admin's port); send the master its
    figures every second; exit when the master's channel closes or on SIGTERM."""
    from . import channel

    loop = asyncio.get_running_loop()
    hub = Hub(topics, token)
    if setup is not None:
        setup(hub)  # (--broker)
    done: asyncio.Future[int] = loop.create_future()

    def stop() -> None:
        if not done.done():
            done.set_result(0)

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # Ctrl-C: the master decides
    name: str = listener.getsockname()

    admin_server: AdminServer | None = None

    async def serve() -> None:
        nonlocal admin_server
        await hub.serve(listener)
        if admin is not None:
            hub.admin = admin_server = AdminServer(admin, hub)
            await hub.admin.start()

    async def take_over() -> None:
        data = await take_over_from(name, token)
        if data is not None:
            try:
                hub.topics, hub.totals = restore(data, topics)
            except Exception as exc:  # an older wsfleet's state: start anew, say why
                log.warning("the old hub's topics could not be read (%s): they start anew", exc)
        await serve()

    def on_master() -> None:
        while True:
            try:
                message, fds = channel.receive(master)
            except BlockingIOError:
                return
            for fd in fds:
                os.close(fd)
            if message is None:  # the master is gone
                loop.remove_reader(master)
                stop()
                return
            if message.get("t") == "takeover" and hub.server is None and not tasks:
                log.debug("hub %d taking the old hub's topics over", os.getpid())
                tasks.add(loop.create_task(take_over()))

    def report() -> None:
        broker = hub.broker.status.as_dict() if hub.broker is not None else None
        channel.send(master, {"t": "stats", **hub.stats(), "broker": broker})
        loop.call_later(STATS_INTERVAL, report)

    tasks: set[asyncio.Task[None]] = set()
    loop.add_reader(master, on_master)
    if not wait_for_takeover:
        await serve()
    report()
    handed: asyncio.Task[Any] = loop.create_task(hub.handed_over.wait())
    await asyncio.wait([done, handed], return_when=asyncio.FIRST_COMPLETED)
    handed.cancel()
    if hub.handing_over and not hub.handed_over.is_set():
        # (a worker that reads nothing keeps its connection from closing: not for long)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hub.handed_over.wait(), TAKEOVER_LIMIT)
    if admin_server is not None:  # (closed already if handed over)
        admin_server.close()
        await admin_server.finish(ADMIN_FINISH)
    if hub.broker is not None:
        with contextlib.suppress(TimeoutError):  # (Redis unreachable: do not linger)
            await asyncio.wait_for(hub.broker.close(), CLOSE_LIMIT)
    return 0
