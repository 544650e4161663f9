"""Closing a worker's connections: paced by rate, bounded by a window, or all at once.

A drain (stop, reload, scale-down, upgrade) sends each connection a close frame. All at once,
10,000 clients reconnect in the same instant and overflow the new workers' accept queues
(docs/restart.md measures it); spread over a fixed window, four idle clients wait seconds for
nothing. So the closes go out at most ``--drain-rate`` a second, never over more than
``--drain-window`` (:func:`wsfleet.config.drain_duration`): a few close at once, thousands
are spread. When the drain must end now (the master died, a second TERM), :meth:`PacedClose.hurry`
sends every remaining close at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Collection
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

log = logging.getLogger("wsfleet.worker")


def send_close_now(websocket: ServerConnection, code: int, reason: str) -> bool:
    """Start the closing handshake at once, through the Sans-I/O protocol; False if the
    connection is left to websockets' close() (it is mid-way through a fragmented message,
    which close() fails properly).

    websockets' close() sends its frame from a task of its own and then guards the answer
    with a close_timeout: a task, a timer and a shield per connection. With 10,000
    connections that made the last client wait 2.2 s on asyncio (1.6 s on uvloop) for the
    end of its connection; written here in one pass, 1.0 s on both. websockets still closes
    each TCP connection when the client's answer arrives; a client that never answers is
    dropped at the graceful timeout, which bounds the whole drain.
    """
    if getattr(websocket, "send_in_progress", 1) is None:
        websocket.protocol.send_close(code, reason)
        websocket.send_data()
        return True
    return False


class PacedClose:
    """Close connections in random order, evenly over ``duration`` seconds (the first at
    once), from one timer re-armed for the next due close: no task per connection.
    ``done`` resolves after the last close is sent."""

    def __init__(
        self,
        connections: Collection[ServerConnection],
        duration: float,
        code: int,
        reason: str,
        spawn: Callable[[Any], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.order = list(connections)
        random.shuffle(self.order)
        self.live = connections  # a connection whose handler ended has left it
        self.duration, self.code, self.reason = duration, code, reason
        self.spawn = spawn  # runs websockets' close() for what cannot be closed in one pass
        self.start, self.sent = self.loop.time(), 0
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.timer: asyncio.TimerHandle | None = None
        self._close_due()

    def hurry(self, code: int, reason: str) -> None:
        """Send every remaining close now, with this code."""
        self.code, self.reason = code, reason
        self.duration = 0.0
        if self.timer is not None:
            self.timer.cancel()
        self._close_due()

    def _close_due(self) -> None:
        count = len(self.order)
        if self.duration <= 0:
            due = count
        else:
            elapsed = self.loop.time() - self.start
            # At least one per firing: uvloop's millisecond clock can fire a timer a little
            # before its time, and a firing that closed nothing would re-arm for the same
            # instant, again and again until the clock ticks.
            due = max(min(count, int(elapsed * count / self.duration) + 1), self.sent + 1)
        for websocket in self.order[self.sent : due]:
            try:
                self._close(websocket)
            except Exception:  # one connection's error must not stop the others' closes
                log.exception("error while closing a connection during a drain")
        self.sent = due
        if self.sent < count and self.live:
            when = self.start + self.duration * self.sent / count
            self.timer = self.loop.call_at(when, self._close_due)
        elif not self.done.done():
            self.timer = None
            self.done.set_result(None)

    def _close(self, websocket: ServerConnection) -> None:
        if websocket not in self.live or websocket.protocol.state is not State.OPEN:
            return  # gone, or closing already (by the client, or by its max age)
        if not send_close_now(websocket, self.code, self.reason):
            self.spawn(websocket.close(self.code, self.reason))
