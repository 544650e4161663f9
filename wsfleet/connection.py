"""The worker's WebSocket connection: websockets' ServerConnection, writing less often.

websockets writes every frame to the socket as soon as it is produced: one ``send()`` is one
``write()`` system call. A handler woken by a batch of incoming messages answers them all in
one pass of the event loop, so an echo under load makes several system calls per connection
per pass where one would do; those calls took a third to two fifths of a worker's time (py-spy,
50 connections x 4 messages in flight). This class gathers what a connection sends during one
pass and writes it in one call at the start of the next (docs/performance.md: 1.3x messages
per second on both event loops).

What stays as in websockets:
- Ordering: everything a connection writes goes through ``send_data()``, here as there.
- Backpressure: what waits here and in the transport's buffer together stays within
  ``write_limit``, as the transport's buffer alone does in websockets: beyond it, frames go to
  the transport at once, whose buffer limits make ``send()`` wait as before.
- Everything outside the OPEN state (a refused handshake's response, closing frames, the end
  of the TCP stream) is written at once, after whatever waits, so closing behaves as in
  websockets; the 101 response is written before the handler starts.

What differs: a message leaves when the handler gives the event loop back, not inside
``send()``. A handler that blocks the loop after a send (which stalls every other connection
of the worker too) delays that message until it yields; one that closes or aborts the
transport itself right after a send loses that message unless it calls ``write_waiting()``
first (``close()`` on the connection needs no such help).
"""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State


class Connection(ServerConnection):
    """A ServerConnection that writes what one pass of the event loop sends in one call."""

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
        # The 101 response leaves in the OPEN state: write it before the handler starts, which
        # may keep the loop busy for a while.
        self.write_waiting()

    def send_data(self) -> None:
        if self.protocol.state is not State.OPEN:
            self.write_waiting()
            super().send_data()
            return
        for data in self.protocol.data_to_send():
            if not self._writes:
                self.loop.call_soon(self.write_waiting)
            self._writes.append(data)
            self._writes_size += len(data)
        # Counting the transport's buffer too keeps a connection's total at websockets' own
        # bound; with a backlog there, writing at once costs no system call anyway.
        if self._writes_size + self.transport.get_write_buffer_size() > self._writes_limit:
            self.write_waiting()

    def write_waiting(self) -> None:
        """Write what waits now (nothing if the transport is closing: it would be lost).

        Call it before closing or aborting the transport directly; close() needs no help.
        """
        if not self._writes:
            return
        writes, self._writes, self._writes_size = self._writes, [], 0
        if self.transport.is_closing():
            return
        try:
            self.transport.writelines(writes)
        except Exception as exc:
            # What websockets' send() does when writing fails, though send() has returned:
            # the connection ends, and recv() and the next send() raise ConnectionClosed.
            self.set_connection_exc(exc)
            self.transport.abort()
