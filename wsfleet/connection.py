"""The worker's WebSocket connection: websockets' ServerConnection, writing less often.

websockets writes every frame to the socket as soon as it is produced: one ``send()`` is one
``write()`` system call. A handler woken by a batch of incoming messages answers them all in
one pass of the event loop, so an echo under load makes several system calls per connection
per pass where one would do; those calls were a third of a worker's time (py-spy, 50
connections x 4 messages in flight). This class gathers what a connection sends during one
pass and writes it in one call at the start of the next.

What stays as in websockets:
- Ordering: everything a connection writes goes through ``send_data()``, here as there.
- Backpressure: at most ``write_limit`` bytes wait here; beyond that they go to the transport
  at once, whose buffer limits make ``send()`` wait as before.
- Everything outside the OPEN state (the handshake's response, closing frames, the end of the
  TCP stream) is written at once, after whatever is waiting, so closing behaves exactly as in
  websockets.
"""

from __future__ import annotations

from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State


class Connection(ServerConnection):
    """A ServerConnection that writes what one pass of the event loop sends in one call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: list[bytes] = []
        self.pending_size = 0

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        await super().handshake(*args, **kwargs)
        # The 101 response leaves in the OPEN state: write it before the handler starts, which
        # may keep the loop busy for a while.
        self.flush()

    def send_data(self) -> None:
        if self.protocol.state is not State.OPEN:
            self.flush()
            super().send_data()
            return
        for data in self.protocol.data_to_send():
            if not self.pending:
                self.loop.call_soon(self.flush)
            self.pending.append(data)
            self.pending_size += len(data)
        if self.pending_size > self.write_limit_high:
            self.flush()

    def flush(self) -> None:
        """Write what is waiting (nothing if the connection is gone: it would be lost anyway)."""
        if not self.pending:
            return
        pending, self.pending, self.pending_size = self.pending, [], 0
        if not self.transport.is_closing():
            self.transport.writelines(pending)
