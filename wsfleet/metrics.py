"""The fleet as Prometheus metrics (``--metrics``), served by the master's HTTP port.

:class:`FleetCollector` turns the fleet's state (wsfleet/fleet.py) and the workers' counts
(its :class:`~wsfleet.counts.Tally`, wsfleet/counts.py) into metric families for
prometheus-client, which writes the exposition format. Read at each scrape: nothing is
kept here. prometheus-client is imported only when a scrape comes (--metrics needs it).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

from .counts import Tally
from .fleet import RESTART_REASONS, Fleet
from .records import WorkerState


class FleetCollector:
    """A prometheus-client collector reading the fleet's state at each scrape."""

    def __init__(
        self,
        fleet: Fleet,
        tally: Tally,
        pubsub: Callable[[], dict[str, int]] | None = None,
        broker: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.fleet, self.tally = fleet, tally
        self.pubsub = pubsub  # the hub's last figures (wsfleet/hub.py)
        self.broker = broker  # the status's "broker" (None without --broker)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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

        if fleet.memory_bound():
            memory = GaugeMetricFamily(
                "wsfleet_worker_memory_bytes",
                "Each slot's worker's own memory (USS), as last read (--max-worker-memory).",
                labels=["slot"],
            )
            for serving in fleet.slots:
                own = serving.worker
                if own is not None and own.memory is not None:
                    memory.add_metric([str(serving.index)], own.memory)
            yield memory

        yield GaugeMetricFamily(
            "wsfleet_drains_in_progress",
            "Workers closing their connections.",
            value=states[WorkerState.DRAINING],
        )
        if self.pubsub is not None:
            figures = self.pubsub()
            for name, kind, text in _PUBSUB:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(f"wsfleet_pubsub_{name}", text, value=figures.get(name, 0))
        broker = self.broker() if self.broker is not None else None
        if broker is not None:
            yield GaugeMetricFamily(
                "wsfleet_broker_up",
                "1 while the hub reaches the broker (--broker), else 0: Redis unavailable, "
                "publishes fail after --broker-timeout.",
                value=int(broker["state"] == "connected"),
            )
            yield CounterMetricFamily(
                "wsfleet_broker_failed_publishes",
                "Publishes that raised BrokerUnavailable: refused by Redis (full, say), or "
                "not answered within --broker-timeout.",
                value=broker.get("failed", 0),
            )


# The hub's figures: (name, kind, help). Counters start anew when the hub is replaced after
# a crash (Prometheus sees a counter reset); an upgrade's new hub continues them.
_PUBSUB = (
    ("published", "counter", "Messages published (pub/sub)."),
    ("delivered", "counter", "Messages sent to subscribers, one per message per subscription."),
    (
        "dropped_subscribers",
        "counter",
        "Subscribers closed with 1013: a backlog over --max-backlog, or messages their "
        "worker missed.",
    ),
    ("topics", "gauge", "Topics with at least one subscription on this fleet."),
    ("subscriptions", "gauge", "Subscriptions, on every worker."),
    ("history", "gauge", "Messages held in the topics' history."),
)


def exposition(collector: FleetCollector) -> tuple[bytes, str]:
    """The body and content type of a /metrics answer."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST
