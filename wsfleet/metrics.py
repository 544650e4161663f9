"""Counting what the workers do, and showing it as Prometheus metrics (``--metrics``).

Two halves:

- In a worker, :data:`COUNTS` counts handshakes by HTTP status, closes by close code, and
  messages in and out, for the whole process, only with --metrics (wsfleet/connection.py's
  ``with_metrics``): per read and per written batch, never with a call more per message, so
  that counting costs little. Each heartbeat carries the
  totals so far (:meth:`Counts.report`), and the last one is sent as the worker exits.
- In the master, :class:`Tally` keeps, per slot, the totals of workers that are gone plus the
  last report of each live one: the sums never go back when a worker dies or is replaced.
  :class:`FleetCollector` turns the fleet's state into metric families for prometheus-client,
  which writes the exposition format.

A worker killed with SIGKILL loses what it counted since its last heartbeat (at most
``heartbeat_interval``, 1 s by default): nothing can be sent from a killed process.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .arbiter import Fleet

RESTART_REASONS = ("crash", "hung", "reload", "scale", "upgrade")


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


class FleetCollector:
    """A prometheus-client collector reading the fleet's state at each scrape."""

    def __init__(self, fleet: Fleet, tally: Tally) -> None:
        self.fleet, self.tally = fleet, tally

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .arbiter import WorkerState

        fleet = self.fleet
        workers = GaugeMetricFamily(
            "wsfleet_workers", "Worker processes by state.", labels=["state"]
        )
        states = collections.Counter(w.state for w in fleet.workers.values())
        for state in WorkerState:
            workers.add_metric([state.value], states[state])
        yield workers

        connections = GaugeMetricFamily(
            "wsfleet_connections",
            "Open connections per slot, as its workers last reported them.",
            labels=["slot"],
        )
        per_slot = collections.Counter({s.index: 0 for s in fleet.slots})
        for worker in fleet.workers.values():
            per_slot[worker.slot.index] += worker.connections
        for slot, count in sorted(per_slot.items()):
            connections.add_metric([str(slot)], count)
        yield connections

        totals = self.tally.per_slot()
        handshakes = CounterMetricFamily(
            "wsfleet_handshakes", "Opening handshakes by HTTP status.", labels=["slot", "status"]
        )
        closes = CounterMetricFamily(
            "wsfleet_closes", "Closed connections by close code.", labels=["slot", "code"]
        )
        received = CounterMetricFamily(
            "wsfleet_messages_received", "Messages received from clients.", labels=["slot"]
        )
        sent = CounterMetricFamily(
            "wsfleet_messages_sent", "Messages sent to clients.", labels=["slot"]
        )
        for slot, counts in sorted(totals.items()):
            for status, n in sorted(counts.handshakes.items()):
                handshakes.add_metric([str(slot), status], n)
            for code, n in sorted(counts.closes.items()):
                closes.add_metric([str(slot), code], n)
            received.add_metric([str(slot)], counts.received)
            sent.add_metric([str(slot)], counts.sent)
        yield from (handshakes, closes, received, sent)

        restarts = CounterMetricFamily(
            "wsfleet_worker_restarts",
            "Workers replaced or started and stopped, by reason.",
            labels=["reason"],
        )
        for reason in RESTART_REASONS:
            restarts.add_metric([reason], fleet.restart_reasons[reason])
        yield restarts

        yield GaugeMetricFamily(
            "wsfleet_drains_in_progress",
            "Workers closing their connections.",
            value=states[WorkerState.DRAINING],
        )


def exposition(collector: FleetCollector) -> tuple[bytes, str]:
    """The body and content type of a /metrics answer."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
