"""What the workers count with --metrics, and how the master adds it up.

- In a worker, :data:`COUNTS` counts handshakes by HTTP status, closes by close code, and
  messages in and out, for the whole process, only with --metrics (wsfleet/connection.py's
  ``with_metrics``): per read and per written batch, never with a call more per message, so
  that counting costs little. Each heartbeat carries the totals so far
  (:meth:`Counts.report`), and the last one is sent as the worker exits.
- In the master, :class:`Tally` keeps, per slot, the totals of workers that are gone plus the
  last report of each live one: the sums never go back when a worker dies or is replaced.
  The fleet (wsfleet/fleet.py) keeps it; wsfleet/metrics.py shows it to Prometheus.

Plain data and arithmetic, shared by both sides: a worker imports this, never the master's
modules. A worker killed with SIGKILL loses what it counted since its last heartbeat (at most
``heartbeat_interval``, 1 s by default): nothing can be sent from a killed process.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Counts:
    """One process's totals (a worker), or the sum of several (a slot in the master)."""

    handshakes: collections.Counter[str] = field(default_factory=collections.Counter)
    closes: collections.Counter[str] = field(default_factory=collections.Counter)
    received: int = 0
    sent: int = 0

    def report(self) -> dict[str, Any]:
        """What a heartbeat carries (channel.validate checks it in the master)."""
        return {
            "h": dict(self.handshakes),
            "c": dict(self.closes),
            "i": self.received,
            "o": self.sent,
        }

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> Counts:
        return cls(
            collections.Counter(report["h"]),
            collections.Counter(report["c"]),
            report["i"],
            report["o"],
        )

    def add(self, other: Counts) -> None:
        self.handshakes.update(other.handshakes)
        self.closes.update(other.closes)
        self.received += other.received
        self.sent += other.sent


COUNTS = Counts()  # this worker's


class Tally:
    """The master's totals: per slot, workers gone plus the live ones' last reports."""

    def __init__(self) -> None:
        self.gone: dict[int, Counts] = collections.defaultdict(Counts)  # slot -> sum
        self.live: dict[int, tuple[int, Counts]] = {}  # pid -> (slot, its last report)

    def report(self, pid: int, slot: int, report: dict[str, Any]) -> None:
        self.live[pid] = (slot, Counts.from_report(report))

    def exited(self, pid: int) -> None:
        if (entry := self.live.pop(pid, None)) is not None:
            slot, counts = entry
            self.gone[slot].add(counts)

    def per_slot(self) -> dict[int, Counts]:
        totals: dict[int, Counts] = collections.defaultdict(Counts)
        for slot, counts in self.gone.items():
            totals[slot].add(counts)
        for slot, counts in self.live.values():
            totals[slot].add(counts)
        return totals
