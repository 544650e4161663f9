"""The worker's WebSocket connection: websockets' ServerConnection, answering a batch at once.

websockets writes every frame to the socket as soon as it is produced: one ``send()`` is one
``write()`` system call. Under load a client's messages arrive in batches (one read brings
several), and an echo answers each with its own system call; those calls took a third to two
fifths of a worker's time (py-spy, 50 connections x 4 messages in flight).

The rule, one condition in ``send_data()``: a frame may wait only while the connection has more
incoming messages already received that the app has not read yet. The app then reads the next
one without giving the event loop back, so the replies to one batch leave together, in one
call, when the last of the batch is answered, or when the app yields first (whichever comes
sooner). Every other frame is written at once, after whatever waits, as websockets writes it:
a handler that sends progress updates between pieces of blocking work, or sends and then
blocks, has each message on the wire before it blocks.

What stays as in websockets:
- Ordering: everything a connection writes goes through ``send_data()``, here as there.
- Backpressure: what waits here and in the transport's buffer together stays within
  ``write_limit``, as the transport's buffer alone does in websockets; beyond it, frames go to
  the transport at once, whose buffer limits make ``send()`` wait as before.
- Everything outside the OPEN state (a refused handshake's response, closing frames, the end
  of the TCP stream) is written at once; the 101 response before the handler starts.

What an app can notice, both only while more of its client's messages are buffered unread: one
that sends and then blocks the loop before reading them (or sends from another task that
blocks) delays that send until it yields or answers the batch (the one liberty wsfleet takes
with timing, docs/how-it-works.md); one that closes or aborts the *transport* itself right
after a send loses that send unless it calls ``write_waiting()`` first (``close()`` on the
connection needs no help).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import DATA_OPCODES, Frame
from websockets.protocol import Event, Protocol, State
from websockets.server import ServerProtocol

from . import proxy
from .counts import COUNTS


class Connection(ServerConnection):
    """A ServerConnection that answers a batch of incoming messages in one write."""

    # Slots, not the instance dict: three more keys in a ServerConnection's 27 take its dict
    # from 296 bytes to 1,584 (scripts/bench-capacity, 10,000 connections on asyncio: 56.4 KiB
    # each that way, 55.0 KiB with slots).
    __slots__ = ("_writes", "_writes_limit", "_writes_size")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writes: list[bytes] = []
        self._writes_size = 0
        self._writes_limit = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # websockets has just set the transport's limits from write_limit.
        self._writes_limit = self.transport.get_write_buffer_limits()[1]

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        await super().handshake(*args, **kwargs)
        # The 101 response leaves in the OPEN state: never hold it behind the handler.
        self.write_waiting()

    def send_data(self) -> None:
        if self.protocol.state is not State.OPEN:
            self.write_waiting()
            super().send_data()
            return
        held_before = bool(self._writes)
        for data in self.protocol.data_to_send():
            self._writes.append(data)
            self._writes_size += len(data)
        # The rule: hold only while the app has more received messages to read (it reads the
        # next without yielding), and within write_limit. Counting the transport's buffer
        # keeps a connection's total at websockets' own bound; with a backlog there, writing
        # at once costs no extra system call anyway. (The deque, not len(frames): hot path.)
        if (
            self.recv_messages.frames.queue
            and self._writes_size + self.transport.get_write_buffer_size() <= self._writes_limit
        ):
            if not held_before:
                # The app may yield before it answers the whole batch: write then.
                self.loop.call_soon(self.write_waiting)
        else:
            # Inside send(), as websockets writes: a failure is send()'s to report.
            self._write()

    def write_waiting(self) -> None:
        """Write what waits now.

        Call it before closing or aborting the transport directly; close() needs no help.
        """
        if self.transport.is_closing():  # closed by the app: what waits is lost (see above)
            self._writes, self._writes_size = [], 0
            return
        try:
            self._write()
        except Exception as exc:
            # What websockets' send() does when writing fails, though send() has returned:
            # the connection ends, and recv() and the next send() raise ConnectionClosed.
            self.set_connection_exc(exc)
            self.transport.abort()

    counting = False  # --metrics (with_metrics): count the messages written

    def _write(self) -> None:
        """Write what waits, in one call."""
        if not self._writes:
            return
        writes, self._writes, self._writes_size = self._writes, [], 0
        if self.counting:  # one frame per item: its first byte says whether it ends a message
            ends = 0
            for data in writes:
                if data and data[0] & 0x8F in _MESSAGE_ENDS:
                    ends += 1
            COUNTS.sent += ends
        if len(writes) == 1:  # the common case: no join (asyncio's writelines copies)
            self.transport.write(writes[0])
        else:
            self.transport.writelines(writes)


class CountedConnection(Connection):
    """A Connection that counts the messages the app receives and sends, for --access-log
    (a coroutine more per message, which is why it is not the default class)."""

    __slots__ = ("messages_in", "messages_out", "opened")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.messages_in = self.messages_out = 0
        self.opened = time.monotonic()

    async def recv(self, decode: bool | None = None) -> Any:
        message = await super().recv(decode)
        self.messages_in += 1
        return message

    async def send(self, message: Any, *, text: bool | None = None) -> None:
        await super().send(message, text=text)
        self.messages_out += 1


@functools.cache
def with_metrics(base: type[Connection]) -> type[Connection]:
    """`base`, counting messages and closes into counts.COUNTS: for --metrics only.

    Per batch, never a call more per message (a wrapper around recv()/send(), or around the
    protocol's per-frame methods, costs that): what is sent is counted from the first byte of
    each frame as a batch is written (Connection._write); what is received, where websockets
    collects a read's events (count_received); the close code when the connection is lost."""
    count_received()

    class MeteredConnection(base):  # type: ignore[valid-type,misc]  # a base chosen at run time: mypy checks static ones
        __slots__ = ()
        counting = True

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if self.response is not None and self.response.status_code == 101:
                COUNTS.closes[close_code_label(self.close_code)] += 1

    return MeteredConnection


def close_code_label(code: int | None) -> str:
    """A close code as a metric label. The codes of RFC 6455 and IANA's registry (1000-1015)
    as they are; the application ranges, which any client may send, grouped: a client must
    not be able to make the labels, and the heartbeat carrying them, grow without bound."""
    if code is None:
        return "none"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


@functools.cache
def count_received() -> None:
    """Count the messages received, in ServerProtocol.events_received (called once per read).

    Patched on websockets' class, once, in a worker that counts (all its protocols are ours).
    Not by switching each connection's protocol to a subclass: an object whose class changes
    after it is made loses CPython's fast attribute access, which measured 7% of a worker's
    CPU for every attribute websockets reads on its protocol."""
    counts, events_received = COUNTS, ServerProtocol.events_received

    def counting_events_received(self: Protocol) -> list[Event]:
        events = events_received(self)
        ends = 0
        for event in events:  # frames; a Request once, at the handshake
            if type(event) is Frame and event.fin and event.opcode in DATA_OPCODES:
                ends += 1
        counts.received += ends
        return events

    ServerProtocol.events_received = counting_events_received  # type: ignore[method-assign]  # on purpose: see the docstring


# The first byte of a frame that ends a message: FIN, and text, binary or continuation.
_MESSAGE_ENDS = frozenset({0x80, 0x81, 0x82})


@functools.cache
def with_proxy_header(base: type[Connection]) -> type[Connection]:
    """`base`, reading a PROXY protocol header (wsfleet/proxy.py) before anything else: for
    --proxy-protocol only, so that other connections pay nothing per read."""

    class ProxiedConnection(base):  # type: ignore[valid-type,misc]  # a base chosen at run time: mypy checks static ones
        __slots__ = ("_proxy_buffer", "proxied_client")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._proxy_buffer: bytearray | None = bytearray()
            self.proxied_client: str | None = None

        def data_received(self, data: bytes) -> None:
            if self._proxy_buffer is None:  # the header is behind us
                super().data_received(data)
                return
            self._proxy_buffer += data
            try:
                parsed = proxy.parse(self._proxy_buffer)
            except proxy.ProxyError as exc:
                logging.getLogger("wsfleet.worker").info(
                    "closing a connection from %s: %s", self.remote_address, exc
                )
                self._proxy_buffer = None
                self.transport.abort()
                return
            if parsed is None:
                return  # more to come
            self.proxied_client, length = parsed
            rest, self._proxy_buffer = bytes(self._proxy_buffer[length:]), None
            if rest:
                super().data_received(rest)

    return ProxiedConnection
