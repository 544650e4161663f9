"""The master's decisions (fleet.Fleet) against a fake process layer and a fake clock: each
test runs in milliseconds. The same behaviours keep end-to-end tests with real processes in
test_master.py and test_headline.py."""

from __future__ import annotations

import errno
import json
import logging
import signal
from typing import Any

import pytest

from wsfleet import channel, control
from wsfleet import config as cfg
from wsfleet.fleet import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    KILL_GRACE,
    RETIRE_LIMIT,
    RETIRE_SETTLE,
    BootError,
    Fleet,
)
from wsfleet.master import Master
from wsfleet.records import (
    MasterState,
    SlotState,
    Upgrade,
    UpgradeOutcome,
    UpgradeState,
    Worker,
    WorkerState,
)


class FakeSocket:
    def __init__(self, index: int, address: int = 0) -> None:
        self.index = index
        self.address = address  # which --bind address

    def fileno(self) -> int:
        return 100 + self.index + 10 * self.address


class FakeProcesses:
    """Records what the fleet asks for (its Processes and Upgrades); forks fail while
    fail_forks > 0."""

    def __init__(self) -> None:
        self.pid = 1000
        self.forked: list[tuple[int, int]] = []  # (pid, slot index)
        self.signals: list[tuple[int, signal.Signals]] = []
        self.sent: list[tuple[int, dict[str, Any], list[int]]] = []
        self.closed: list[int] = []
        self.aside: list[int] = []  # slots retired, their sockets not closed yet
        self.ready_calls = 0
        self.fail_forks = 0
        self.masters: list[int] = []  # new masters started (upgrades)
        self.handed_to: list[int] = []
        self.queues: dict[int, int] = {}  # connections queued on a slot's sockets

    def start_master(self, slots: list[list[Any]]) -> tuple[int, object]:
        self.pid += 1
        self.masters.append(self.pid)
        return self.pid, object()

    def hand_over(self, upgrade: Upgrade) -> None:
        self.handed_to.append(upgrade.pid)

    def open_slot(self, index: int) -> list[FakeSocket]:
        return [FakeSocket(index)]

    def close_slot(self, slot: Any) -> None:
        self.closed.append(slot.index)

    def set_aside(self, slot: Any) -> None:
        self.aside.append(slot.index)

    def queued(self, slot: Any) -> int:
        return self.queues.get(slot.index, 0)

    def close_shared(self) -> None:
        self.closed.append(-1)

    def fork(self, slot: Any) -> tuple[int, object]:
        if self.fail_forks:
            self.fail_forks -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.pid += 1
        self.forked.append((self.pid, slot.index))
        return self.pid, object()

    def signal(self, pid: int, sig: signal.Signals) -> None:
        self.signals.append((pid, sig))

    def send(self, worker: Worker, message: dict[str, Any], fds: Any = ()) -> bool:
        self.sent.append((worker.pid, message, list(fds)))
        return True

    def all_ready(self) -> None:
        self.ready_calls += 1

    def sent_to(self, worker: Worker) -> list[dict[str, Any]]:
        return [message for pid, message, _ in self.sent if pid == worker.pid]


class Harness:
    """A fleet, its fake processes and clock, and the events the master would feed it."""

    def __init__(
        self, workers: int = 2, tcp_addresses: int = 1, slots: int | None = None, **options: Any
    ) -> None:
        self.now = 1000.0
        self.procs = FakeProcesses()
        self.config = cfg.Config(workers=workers, **options)
        self.fleet = Fleet(self.config, self.procs, self.procs, clock=lambda: self.now)
        self.confirm_holds = True
        sockets = [
            [FakeSocket(i, a) for a in range(tcp_addresses)] for i in range(slots or workers)
        ]
        self.fleet.start(sockets, reason=None if slots is None else "upgrade")
        self.fleet.reconcile()

    def worker(self, slot: int) -> Worker:
        worker = self.fleet.slots[slot].worker
        assert worker is not None
        return worker

    def newest(self, slot: int) -> Worker:
        return max(
            (w for w in self.fleet.workers.values() if w.slot.index == slot), key=lambda w: w.pid
        )

    def ready(self, *workers: Worker) -> None:
        for worker in workers:
            self.fleet.on_message(worker, {"t": "ready"})
        self.settle()

    def boot(self) -> None:
        self.ready(*[s.worker for s in self.fleet.slots if s.worker is not None])
        assert self.fleet.state is MasterState.RUNNING

    def exit(self, worker: Worker, code: int = -9) -> None:
        self.fleet.on_exit(worker.pid, code)
        self.settle()

    def settle(self) -> None:
        self.confirm()
        self.fleet.on_time()
        self.fleet.reconcile()
        if self.confirm():
            self.fleet.reconcile()
        deadline = self.fleet.next_deadline()
        assert deadline is None or deadline > self.now  # nothing left due: no busy loop

    def confirm(self) -> bool:
        """What workers say once they have stopped accepting (unless confirm_holds is off);
        whether any said something."""
        said = 0
        if self.confirm_holds:
            for worker in list(self.fleet.workers.values()):
                if worker.state is WorkerState.HOLDING:
                    self.fleet.on_message(worker, {"t": "held"})
                    said += 1
                elif worker.state is WorkerState.DRAINING and worker.listening:
                    self.fleet.on_message(worker, {"t": "draining"})
                    said += 1
            for slot in self.fleet.closing:
                if slot.releasing is not None:
                    self.fleet.on_message(slot.releasing, {"t": "released", "slot": slot.index})
                    said += 1
        return bool(said)

    def advance(self, seconds: float, silent: tuple[Worker, ...] = ()) -> None:
        """Let time pass in small steps, every live worker sending heartbeats but these."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + 0.1)
            for worker in list(self.fleet.workers.values()):
                if worker not in silent and worker.state is not WorkerState.KILLED:
                    self.fleet.on_message(worker, {"t": "hb", "conns": 0})
            self.settle()

    def delay_until_restart(self, slot: int) -> float:
        assert self.fleet.slots[slot].state is SlotState.EMPTY
        return self.fleet.slots[slot].restart_at - self.now


def test_boot_announces_once_every_worker_is_ready() -> None:
    h = Harness(3)
    assert h.fleet.state is MasterState.BOOTING and len(h.procs.forked) == 3
    h.ready(h.worker(0), h.worker(1))
    assert h.procs.ready_calls == 0
    h.ready(h.worker(2))
    assert h.procs.ready_calls == 1 and h.fleet.state is MasterState.RUNNING


@pytest.mark.parametrize(("code", "status"), [(4, 4), (1, 1), (-9, 1)])
def test_a_worker_that_cannot_start_at_boot_fails_the_start(code: int, status: int) -> None:
    h = Harness(2)
    h.ready(h.worker(0))
    h.fleet.workers[h.worker(1).pid].error = "cannot import --app app:handler"
    with pytest.raises(BootError, match="cannot import") as failed:
        h.exit(h.worker(1), code)
    assert failed.value.status == status


def test_a_worker_that_served_is_replaced_at_once_however_often_it_dies() -> None:
    """The chaos case: kill -9 of a worker that served 5 s, every 2 s: no backoff, ever."""
    h = Harness(4)
    h.boot()
    h.advance(5)
    for kill in range(30):
        victim = h.worker(kill % 4)
        forks = len(h.procs.forked)
        h.exit(victim)
        assert len(h.procs.forked) == forks + 1  # the replacement is forked in the same step
        h.ready(h.worker(kill % 4))
        h.advance(2)
    assert all(slot.crashes == 0 for slot in h.fleet.slots)


def test_consecutive_crashes_at_start_back_off_exponentially_up_to_the_cap() -> None:
    h = Harness(2)
    h.boot()
    h.exit(h.worker(1), 1)  # died within --start-seconds of becoming ready
    assert h.fleet.slots[1].state is SlotState.STARTING  # the first one: at once
    delays = []
    for _ in range(9):
        h.exit(h.worker(1), 1)  # never ready
        delays.append(h.delay_until_restart(1))
        h.advance(delays[-1])
        assert h.fleet.slots[1].state is SlotState.STARTING
    for i, delay in enumerate(delays[:6]):
        expected = BACKOFF_FIRST * 2**i
        assert 0.75 * expected - 0.11 <= delay <= 1.25 * expected, delays
    assert max(delays) <= 1.25 * BACKOFF_MAX
    assert delays[-1] >= 0.75 * BACKOFF_MAX - 0.11
    # The healthy slot kept serving all along, and got the crashing slot's socket meanwhile.
    assert h.worker(0).state is WorkerState.READY


def test_start_seconds_sets_what_counts_as_a_crash_at_start() -> None:
    h = Harness(1, start_seconds=3)
    h.boot()
    h.advance(2.5)
    h.exit(h.worker(0))  # 2.5 s after ready: a crash at start (count 1: at once)
    h.ready(h.worker(0))
    h.advance(2.5)
    h.exit(h.worker(0))  # the second in a row: backoff
    assert h.delay_until_restart(0) >= 0.75 * BACKOFF_FIRST - 0.11
    h.advance(h.delay_until_restart(0))
    h.ready(h.worker(0))
    h.advance(3.5)
    h.exit(h.worker(0))  # served longer than --start-seconds: at once, count reset
    assert h.fleet.slots[0].state is SlotState.STARTING and h.fleet.slots[0].crashes == 0


def test_a_failed_fork_is_retried_with_the_backoff_and_the_master_goes_on() -> None:
    h = Harness(2)
    h.boot()
    h.advance(5)
    h.procs.fail_forks = 2
    h.exit(h.worker(1))  # it served: replaced at once, but fork fails
    first = h.delay_until_restart(1)
    assert BACKOFF_FIRST <= first <= BACKOFF_FIRST * 1.25
    h.advance(first)  # fails again: longer
    second = h.delay_until_restart(1)
    assert second >= BACKOFF_FIRST
    h.advance(second)
    assert h.fleet.slots[1].state is SlotState.STARTING  # the third fork worked
    h.ready(h.worker(1))
    assert h.fleet.slots[1].crashes == 2  # the failed forks; reset once a worker has served


def test_a_failed_fork_at_boot_is_retried_too() -> None:
    h = Harness.__new__(Harness)
    h.now, h.procs = 1000.0, FakeProcesses()
    h.procs.fail_forks = 1
    h.config = cfg.Config(workers=2)
    h.fleet = Fleet(h.config, h.procs, h.procs, clock=lambda: h.now)
    h.confirm_holds = True
    h.fleet.start([[FakeSocket(0)], [FakeSocket(1)]])
    h.settle()
    assert h.fleet.slots[0].state is SlotState.EMPTY
    h.ready(h.worker(1))
    h.advance(h.delay_until_restart(0))
    h.ready(h.worker(0))
    assert h.procs.ready_calls == 1


def test_a_slot_without_a_ready_worker_lends_its_socket_and_takes_it_back() -> None:
    h = Harness(3)
    h.boot()
    h.exit(h.worker(2), 1)
    h.exit(h.worker(2), 1)  # now in backoff
    lent = [(pid, m, fds) for pid, m, fds in h.procs.sent if m["t"] == "adopt"]
    assert len(lent) == 1  # once, not once per crash
    borrower_pid, message, fds = lent[0]
    assert message == {"t": "adopt", "slot": 2} and fds == [102]
    borrower = h.fleet.workers[borrower_pid]
    assert borrower.slot.index in (0, 1) and h.fleet.borrowed(borrower) == [2]
    h.advance(h.delay_until_restart(2))
    h.ready(h.worker(2))
    assert h.procs.sent_to(borrower)[-1] == {"t": "release", "slot": 2}
    assert h.fleet.slots[2].lent_to is None


def test_a_borrower_that_drains_is_replaced_by_another() -> None:
    h = Harness(3)
    h.boot()
    h.exit(h.worker(2), 1)
    h.exit(h.worker(2), 1)
    first = h.fleet.slots[2].lent_to
    assert first is not None
    h.fleet.scale(2)  # removes slot 2 itself: the loan ends with a release
    h.advance(RETIRE_SETTLE)  # (once its queue is empty: the borrower accepts meanwhile)
    assert h.procs.sent_to(first)[-1] == {"t": "release", "slot": 2}
    h.fleet.scale(3)  # slot 2 again, starting: lent again
    h.settle()
    h.exit(h.worker(1), 1)
    h.exit(h.worker(1), 1)  # slot 1 in backoff too: slot 0's worker holds both
    assert {s.index for s in h.fleet.slots if s.lent_to is h.worker(0)} >= {1}


def test_a_slot_scaled_away_closes_once_its_queue_is_empty() -> None:
    """TTOU: the slot gets no new connection (the master steers them away) while its worker
    accepts what its queue holds; then the worker drains and the socket closes."""
    h = Harness(3)
    h.boot()
    leaving = h.worker(2)
    h.procs.queues[2] = 5
    h.fleet.scale(2)
    h.settle()
    assert [s.index for s in h.fleet.retiring] == [2] and len(h.fleet.slots) == 2
    assert leaving.state is WorkerState.READY and 2 not in h.procs.closed
    shown = {w["pid"]: w["state"] for w in h.fleet.status()["workers"]}
    assert shown[leaving.pid] == "leaving" and shown[h.worker(1).pid] == "ready"
    h.advance(RETIRE_SETTLE + 0.1)  # queued still: it accepts on
    assert h.procs.sent_to(leaving) == [] and 2 not in h.procs.closed
    h.procs.queues[2] = 0
    h.confirm_holds = False
    h.advance(0.1)
    assert h.procs.sent_to(leaving) == [{"t": "drain", "code": 1001, "reason": "going away"}]
    assert h.fleet.retiring == [] and h.procs.aside == [2]
    # Its worker's copy is open until it says it stopped accepting: the master's stays (the
    # socket keeps its place in the kernel's group, weight 0), and a new worker closes it.
    h.advance(1)
    assert h.procs.closed == [] and [s.index for s in h.fleet.closing] == [2]
    assert h.fleet.other_slots(h.fleet.slots[0]) == [h.fleet.slots[1], h.fleet.closing[0]]
    h.fleet.on_message(leaving, {"t": "draining", "over": 0.0})
    h.settle()
    assert h.procs.closed == [2] and h.fleet.closing == []
    assert h.fleet.other_slots(h.fleet.slots[0]) == [h.fleet.slots[1]]


def test_a_slot_scaled_away_and_lent_closes_once_its_borrower_gave_it_back() -> None:
    h = Harness(3)
    h.boot()
    h.exit(h.worker(2), 1)
    h.exit(h.worker(2), 1)  # in backoff: lent
    borrower = h.fleet.slots[2].lent_to
    assert borrower is not None
    h.confirm_holds = False
    h.fleet.scale(2)
    h.advance(RETIRE_SETTLE + 0.1)
    assert h.procs.sent_to(borrower)[-1] == {"t": "release", "slot": 2}
    assert [s.index for s in h.fleet.closing] == [2] and h.procs.closed == []
    h.fleet.on_message(borrower, {"t": "released", "slot": 2})
    h.settle()
    assert h.procs.closed == [2] and h.fleet.closing == []


def test_a_slot_added_while_one_leaves_takes_its_index_beside_it() -> None:
    """TTOU, then TTIN before the leaving slot has closed: a new slot 2 starts at once, and
    the leaving one closes as it would have."""
    h = Harness(3)
    h.boot()
    leaving = h.worker(2)
    h.procs.queues[2] = 1
    h.fleet.scale(2)
    h.fleet.scale(3)
    h.settle()
    assert h.procs.aside == [2] and len(h.fleet.slots) == 3 and h.fleet.retiring[0].index == 2
    new = h.worker(2)
    assert new is not leaving and h.fleet.retiring[0].worker is leaving
    h.ready(new)
    h.procs.queues[2] = 0
    h.advance(RETIRE_SETTLE + 0.1)
    assert h.procs.closed == [2] and h.fleet.retiring == h.fleet.closing == []
    assert leaving.state is WorkerState.DRAINING and new.state is WorkerState.READY
    assert h.fleet.other_slots(h.fleet.slots[0]) == h.fleet.slots[1:]


def test_a_slot_scaled_away_never_empty_closes_at_the_limit(caplog) -> None:
    h = Harness(2)
    h.boot()
    h.procs.queues[1] = 7
    h.fleet.scale(1)
    h.advance(RETIRE_LIMIT - 0.05)
    assert 1 not in h.procs.closed
    h.advance(0.1)
    assert h.procs.closed == [1] and h.worker(0).state is WorkerState.READY
    assert "slot 1 closes with 7 connections still queued after 1.0s (reset)" in caplog.text


def test_a_slot_scaled_away_that_nobody_accepts_on_closes_at_once() -> None:
    """Its worker starting (and no borrower), or dead: nothing would empty its queue."""
    h = Harness(3)
    h.ready(h.worker(0), h.worker(1))  # slot 2's worker still starting
    h.fleet.scale(2)
    h.settle()
    assert h.procs.closed == [2] and h.fleet.retiring == []
    h.fleet.scale(3)
    h.boot()
    leaving = h.worker(2)
    h.procs.queues[2] = 1
    h.fleet.scale(2)
    h.settle()
    forks = len(h.procs.forked)
    h.exit(leaving)
    assert h.procs.closed == [2, 2] and len(h.procs.forked) == forks  # not replaced


def test_a_stop_closes_the_slots_scaled_away_at_once() -> None:
    h = Harness(2)
    h.boot()
    h.procs.queues[1] = 3
    h.fleet.scale(1)
    h.settle()
    h.fleet.stop(graceful=True)
    assert 1 in h.procs.closed and h.fleet.retiring == []
    assert all(w.state is WorkerState.DRAINING for w in h.fleet.workers.values())


def test_rolling_restart_replaces_one_slot_at_a_time() -> None:
    h = Harness(3)
    h.boot()
    old = [h.worker(i) for i in range(3)]
    h.fleet.start_restart(h.config)
    for i in range(3):
        new = h.fleet.slots[i].replacement
        assert new is not None
        assert sum(s.state is SlotState.REPLACING for s in h.fleet.slots) == 1
        h.ready(new)
        assert h.fleet.slots[i].worker is new
        # Replaced: it stops accepting and keeps its connections while the restart goes on.
        if i < 2:
            assert old[i].state is WorkerState.HELD
            assert h.procs.sent_to(old[i]) == [{"t": "hold"}]
    assert h.fleet.restart is None and h.fleet.restart_outcome.kind == "done"
    # Every slot has its new worker: the old ones close their connections now, all together.
    for worker in old:
        assert worker.state is WorkerState.DRAINING
        assert h.procs.sent_to(worker) == [
            {"t": "hold"},
            {"t": "drain", "code": 1012, "reason": "service restart"},
        ]


def test_a_rolling_restart_that_stops_drains_what_it_held_and_every_slot_serves() -> None:
    """Slot 0 replaced, slot 1's new worker fails: the held worker of slot 0 drains (its slot
    has its new worker), slot 1's old worker keeps serving, and nothing stays held."""
    h = Harness(3)
    h.boot()
    old = [h.worker(i) for i in range(3)]
    h.fleet.start_restart(h.config)
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    assert old[0].state is WorkerState.HELD
    h.exit(h.fleet.slots[1].replacement, 4)  # type: ignore[arg-type]
    assert h.fleet.restart_outcome.kind == "failed"
    assert old[0].state is WorkerState.DRAINING
    assert old[1].state is WorkerState.READY and old[2].state is WorkerState.READY
    assert all(s.state is SlotState.SERVING for s in h.fleet.slots)
    assert not [w for w in h.fleet.workers.values() if w.state is WorkerState.HELD]
    h.exit(old[0], 0)
    assert len(h.fleet.workers) == 3


def test_a_held_worker_is_watched_and_stopped_like_a_serving_one() -> None:
    """Held workers still send heartbeats: one that hangs is killed (its slot has its new
    worker: nothing is replaced); a graceful stop drains them with 1001."""
    h = Harness(3, timeout=4)
    h.boot()
    old = [h.worker(i) for i in range(3)]
    h.fleet.start_restart(h.config)
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    h.ready(h.fleet.slots[1].replacement)  # type: ignore[arg-type]
    assert old[0].state is WorkerState.HELD and old[1].state is WorkerState.HELD
    h.advance(4.05, silent=(old[0], h.fleet.slots[2].replacement))  # type: ignore[arg-type]
    assert (old[0].pid, signal.SIGTERM) in h.procs.signals
    forks = len(h.procs.forked)
    h.exit(old[0], -9)
    assert len(h.procs.forked) == forks  # no replacement: slot 0 is served by its new worker
    h.fleet.stop(graceful=True)
    h.settle()
    assert old[1].state is WorkerState.DRAINING and (old[1].pid, signal.SIGTERM) in h.procs.signals


def test_a_new_worker_that_fails_stops_the_rolling_restart() -> None:
    h = Harness(2)
    h.boot()
    old = h.worker(0)
    h.fleet.start_restart(h.config)
    new = h.fleet.slots[0].replacement
    assert new is not None
    h.exit(new, 4)
    assert h.fleet.restart is None and h.fleet.restart_outcome.kind == "failed"
    assert h.worker(0) is old and old.state is WorkerState.READY  # keeps serving
    assert len(h.procs.forked) == 3  # nothing else was started


def test_a_new_worker_not_ready_within_timeout_is_killed_and_the_restart_stops() -> None:
    h = Harness(2, timeout=5)
    h.boot()
    h.fleet.start_restart(h.config)
    new = h.fleet.slots[0].replacement
    assert new is not None
    h.advance(5.1, silent=(new,))
    assert (new.pid, signal.SIGTERM) in h.procs.signals and new.state is WorkerState.STOPPING
    h.advance(KILL_GRACE, silent=(new,))
    assert (new.pid, signal.SIGKILL) in h.procs.signals
    h.exit(new)
    assert h.fleet.restart is None and h.fleet.restart_outcome.kind == "failed"


def test_scaling_during_a_rolling_restart() -> None:
    h = Harness(3)
    h.boot()
    h.fleet.start_restart(h.config)
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    assert h.fleet.slots[1].replacement is not None
    h.fleet.scale(4)  # TTIN: the new slot starts with new code, not part of the cursor
    h.settle()
    h.ready(h.worker(3))
    h.fleet.scale(3)  # TTOU: slot 3 goes again
    h.fleet.scale(2)  # and slot 2, still to do
    h.settle()
    h.ready(h.fleet.slots[1].replacement)  # type: ignore[arg-type]
    # Done, and back to the configured count (as a HUP re-reads the configuration).
    assert h.fleet.restart is None and h.fleet.restart_outcome.kind == "done"
    assert len(h.fleet.slots) == 3 and h.fleet.slots[2].state is SlotState.STARTING


def test_removing_the_slot_being_restarted_moves_the_cursor_on() -> None:
    h = Harness(2)
    h.boot()
    h.fleet.start_restart(h.config)
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    step = h.fleet.slots[1].replacement
    assert step is not None
    h.fleet.scale(1)
    h.settle()
    assert step.state is WorkerState.DRAINING
    assert h.fleet.restart is None  # slot 1 was the last: done, then scaled back to 2
    assert len(h.fleet.slots) == 2


@pytest.mark.parametrize("why", ["reload", "scale-down", "stop"])
def test_a_draining_worker_is_killed_at_its_drain_limit(why: str) -> None:
    h = Harness(2, graceful_timeout=3)
    h.boot()
    if why == "reload":
        old = h.worker(0)
        h.fleet.start_restart(h.config)
        h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
        h.ready(h.fleet.slots[1].replacement)  # type: ignore[arg-type]
    elif why == "scale-down":
        old = h.worker(1)
        h.fleet.scale(1)
        h.advance(RETIRE_SETTLE)  # (its queue is empty: it drains)
    else:
        old = h.worker(0)
        h.fleet.stop(graceful=True)
    h.settle()
    assert old.state is WorkerState.DRAINING
    limit = cfg.drain_limit(h.config)
    assert limit == h.config.drain_window + 3 + h.config.close_timeout + 1
    h.advance(limit - 0.2, silent=(old,))
    assert (old.pid, signal.SIGKILL) not in h.procs.signals
    h.advance(0.3, silent=(old,))
    assert (old.pid, signal.SIGKILL) in h.procs.signals and old.state is WorkerState.KILLED


def test_a_hung_worker_gets_term_then_kill_then_an_immediate_replacement() -> None:
    h = Harness(2, timeout=4)
    h.boot()
    h.advance(5)
    hung = h.worker(0)
    h.advance(4.05, silent=(hung,))
    assert h.procs.signals[-1] == (hung.pid, signal.SIGTERM)
    h.advance(KILL_GRACE, silent=(hung,))
    assert h.procs.signals[-1] == (hung.pid, signal.SIGKILL)
    h.advance(3, silent=(hung,))  # not reaped yet: nothing more, and no busy loop (settle)
    assert h.procs.signals[-1] == (hung.pid, signal.SIGKILL)
    h.exit(hung)
    assert h.fleet.slots[0].state is SlotState.STARTING


def test_graceful_stop_drains_everyone_closes_the_sockets_and_restarts_nothing() -> None:
    h = Harness(3)
    h.boot()
    h.exit(h.worker(2), 1)
    h.exit(h.worker(2), 1)  # slot 2 waits in backoff
    h.fleet.stop(graceful=True)
    h.settle()
    assert sorted(h.procs.closed) == [-1, 0, 1, 2]  # every slot's sockets and the shared ones
    terms = {pid for pid, sig in h.procs.signals if sig == signal.SIGTERM}
    assert terms == set(h.fleet.workers)
    h.advance(BACKOFF_MAX)
    assert len(h.procs.forked) == 4  # 3, and slot 2's first replacement: none since
    h.fleet.stop(graceful=False)  # QUIT: now
    h.settle()
    quits = {pid for pid, sig in h.procs.signals if sig == signal.SIGQUIT}
    assert quits == set(h.fleet.workers)
    h.advance(KILL_GRACE + 0.1)
    kills = {pid for pid, sig in h.procs.signals if sig == signal.SIGKILL}
    assert kills == set(h.fleet.workers)


def test_a_second_term_hurries_every_worker_and_kills_at_the_short_bound() -> None:
    """The first TERM drains (paced); the second tells every worker to close the rest now,
    and one still there hurry_limit later is killed, whatever its drain limit was."""
    h = Harness(2, graceful_timeout=60)
    h.boot()
    h.fleet.stop(graceful=True)
    h.settle()
    h.advance(2)
    h.fleet.hurry()
    h.settle()
    assert all(h.procs.sent_to(w)[-1] == {"t": "hurry"} for w in h.fleet.workers.values())
    assert not any(sig == signal.SIGKILL for _, sig in h.procs.signals)
    h.advance(1)
    h.fleet.hurry()  # a third TERM: the kill is not pushed back
    h.advance(cfg.hurry_limit() - 1 + 0.1)
    kills = {pid for pid, sig in h.procs.signals if sig == signal.SIGKILL}
    assert kills == set(h.fleet.workers)


def test_the_drain_deadline_counts_the_closes_duration_the_worker_reports() -> None:
    """A worker that sends its closes over 0.5 s (few connections) is killed 0.5 s +
    graceful timeout + close timeout + 1 s after its drain began, not after the whole drain
    window; one that reports nothing keeps the window; a longer report cannot extend it."""
    h = Harness(3, graceful_timeout=3)
    h.boot()
    h.fleet.stop(graceful=True)
    h.settle()
    few, silent, long = (h.worker(i) for i in range(3))
    h.fleet.on_message(few, channel.validate({"t": "draining", "over": 0.5}))
    h.fleet.on_message(long, channel.validate({"t": "draining", "over": 1e6}))
    short = 0.5 + 3 + h.config.close_timeout + 1
    h.advance(short - 0.1, silent=(silent,))
    assert not any(sig == signal.SIGKILL for _, sig in h.procs.signals)
    h.advance(0.2, silent=(silent,))
    assert [pid for pid, sig in h.procs.signals if sig == signal.SIGKILL] == [few.pid]
    h.advance(cfg.drain_limit(h.config) - short, silent=(silent,))
    kills = {pid for pid, sig in h.procs.signals if sig == signal.SIGKILL}
    assert kills == {few.pid, silent.pid, long.pid}


@pytest.mark.parametrize("over", [-1, "1", True, float("nan")])
def test_a_bad_drain_duration_is_refused(over: object) -> None:
    with pytest.raises(channel.BadMessage):
        channel.validate({"t": "draining", "over": over})


def test_heartbeats_update_connections_and_liveness() -> None:
    h = Harness(1, timeout=2)
    h.boot()
    worker = h.worker(0)
    for _ in range(10):
        h.now += 1.5
        h.fleet.on_message(worker, {"t": "hb", "conns": 7})
        h.settle()
    assert worker.state is WorkerState.READY and worker.connections == 7


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b'{"t":"hb","conns":null}',
        b'{"t":"hb","conns":-1}',
        b'{"t":"hb","conns":true}',
        b'{"t":"hb","conns":1,"acc":-1}',
        b'{"t":"hb","conns":1,"acc":"7"}',
        b'{"t":"nope"}',
        b'{"t":"error"}',
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff",
    ],
)
def test_malformed_worker_messages_are_refused(data: bytes) -> None:
    master, worker = channel.pair()
    with master, worker:
        worker.send(data)
        message, fds = channel.receive(master)
        assert fds == []
        with pytest.raises(channel.BadMessage):
            channel.validate(message)


def test_valid_worker_messages_pass() -> None:
    for message in (
        {"t": "ready"},
        {"t": "hb", "conns": 3},
        {"t": "hb", "conns": 3, "acc": 12},
        {"t": "error", "message": "x"},
    ):
        assert channel.validate(json.loads(json.dumps(message))) == message


def test_the_fleet_sums_the_connections_its_workers_accepted() -> None:
    """What the master's arrival rate comes from: each report's "acc" is a worker's total; a
    new worker starts from 0 and a gone one's do not go back."""
    h = Harness(2)
    h.boot()
    h.fleet.on_message(h.worker(0), {"t": "hb", "conns": 5, "acc": 5})
    h.fleet.on_message(h.worker(1), {"t": "hb", "conns": 2, "acc": 3})
    h.fleet.on_message(h.worker(0), {"t": "hb", "conns": 6, "acc": 9})
    assert h.fleet.arrived == 12
    h.exit(h.worker(0))
    h.ready(h.worker(0))
    h.fleet.on_message(h.worker(0), {"t": "hb", "conns": 1, "acc": 1})
    assert h.fleet.arrived == 13


def test_a_long_traceback_is_cut_from_the_top_to_fit_one_message() -> None:
    frames = [
        f'  File "/app/m{i}.py", line {i}, in <module>\n    import m{i + 1}' for i in range(900)
    ]
    details = "\n".join(
        ["Traceback (most recent call last):", *frames, "NameError: name 'é' is not defined"]
    )
    message = channel.error("cannot import --app m0:handler: NameError", details)
    master, worker = channel.pair()
    with master, worker:
        assert channel.send(worker, message)
        received, _ = channel.receive(master)
    assert channel.validate(received) == message
    cut = message["details"].splitlines()
    assert cut[0] == "[earlier lines cut]" and cut[-1] == "NameError: name 'é' is not defined"
    assert 100 < len(cut) < len(details.splitlines())
    # A sender that says something else than text: the line is kept, the rest is not.
    bad = channel.validate({"t": "error", "message": "x", "details": [1]})
    assert bad == {"t": "error", "message": "x", "details": ""}


def test_an_error_in_one_step_is_logged_and_the_master_goes_on(caplog) -> None:
    master = Master(cfg.Config(workers=1))

    def broken() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="wsfleet.master"):
        master.guarded("a test step", broken)
    assert caplog.records[-1].exc_info is not None  # with its traceback
    with pytest.raises(BootError):
        master.guarded("boot", lambda: (_ for _ in ()).throw(BootError("no", 4)))


def test_a_worker_killed_by_a_signal_python_cannot_name_is_replaced() -> None:
    h = Harness(2)
    h.boot()
    h.advance(5)
    h.exit(h.worker(1), -35)  # SIGRTMIN+1: no name in signal.Signals
    assert h.fleet.slots[1].state is SlotState.STARTING


def test_a_worker_that_drains_on_its_own_is_replaced_and_its_socket_lent() -> None:
    """A SIGTERM from outside: the worker says it drains; the master must not count on it."""
    h = Harness(2)
    h.boot()
    h.advance(5)
    retiring = h.worker(1)
    h.fleet.on_message(retiring, {"t": "draining"})
    h.settle()
    assert retiring.state is WorkerState.DRAINING
    assert h.fleet.slots[1].state is SlotState.STARTING  # its replacement, at once
    assert h.fleet.slots[1].lent_to is h.worker(0)  # and slot 0's worker accepts meanwhile
    h.exit(retiring, 0)
    h.ready(h.worker(1))
    assert h.fleet.slots[1].lent_to is None and h.fleet.slots[1].crashes == 0


def test_a_rolling_restart_does_not_end_the_loan_of_a_slot_still_starting() -> None:
    h = Harness(2)
    h.boot()
    h.advance(5)
    h.exit(h.worker(0))  # replaced at once; its socket is lent while the new one starts
    assert h.fleet.slots[0].lent_to is h.worker(1)
    h.fleet.start_restart(h.config)  # slot 0 gets a replacement beside its starting worker
    h.settle()
    assert h.fleet.slots[0].state is SlotState.REPLACING
    assert h.fleet.slots[0].lent_to is h.worker(1)  # nobody else accepts for it yet


def test_a_draining_worker_keeps_the_drain_limit_it_was_started_with() -> None:
    """A reload that shortens --graceful-timeout does not cut the old workers' drains."""
    h = Harness(1, graceful_timeout=60)
    h.boot()
    old = h.worker(0)
    h.fleet.start_restart(cfg.Config(workers=1, graceful_timeout=5))
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    assert old.state is WorkerState.DRAINING
    h.advance(h.config.drain_window + 5 + h.config.close_timeout + 2, silent=(old,))
    assert (old.pid, signal.SIGKILL) not in h.procs.signals
    h.advance(cfg.drain_limit(h.config), silent=(old,))
    assert (old.pid, signal.SIGKILL) in h.procs.signals


def test_a_worker_that_served_resets_the_crash_count_however_it_ends() -> None:
    h = Harness(1)
    h.boot()
    for _ in range(4):  # a crash loop...
        h.exit(h.worker(0), 1)
        if h.fleet.slots[0].state is SlotState.EMPTY:
            h.advance(h.delay_until_restart(0))
    h.ready(h.worker(0))
    h.advance(5)  # ...then a worker that serves, and is retired by a reload
    h.fleet.start_restart(h.config)
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    old = next(w for w in h.fleet.workers.values() if w.state is WorkerState.DRAINING)
    h.exit(old, 0)
    h.exit(h.worker(0), 1)  # the next crash at start is a first one: replaced at once
    assert h.fleet.slots[0].state is SlotState.STARTING


def test_every_address_of_an_empty_slot_is_lent_and_with_only_unix_sockets_nothing() -> None:
    """Two TCP addresses: an empty slot lends both of its sockets in one message. Unix
    sockets only (shared by every worker, so no slot has sockets of its own): nothing."""
    h = Harness(2, tcp_addresses=2)
    h.boot()
    h.exit(h.worker(1), 1)
    [fds] = [fds for _, m, fds in h.procs.sent if m["t"] == "adopt"]
    assert fds == [101, 111]
    h = Harness(2, tcp_addresses=0)
    h.boot()
    h.exit(h.worker(1), 1)
    assert not [m for _, m, _ in h.procs.sent if m["t"] == "adopt"]
    assert h.fleet.slots[1].lent_to is None and h.fleet.slots[1].worker is not None


def test_a_hup_during_a_rolling_restart_holds_at_most_one_worker_per_slot() -> None:
    """A second HUP starts the restart again: a slot replaced twice drains its first held
    worker when it holds the second, so the held workers never outnumber the slots."""
    h = Harness(2)
    h.boot()
    first = [h.worker(0), h.worker(1)]
    h.fleet.start_restart(h.config)
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    for _ in range(3):  # a HUP in the middle of each restart: the cursor starts again
        h.fleet.start_restart(h.config)
        h.ready(next(s.replacement for s in h.fleet.slots if s.replacement is not None))
        held = [w for w in h.fleet.workers.values() if w.state is WorkerState.HELD]
        assert len({w.slot.index for w in held}) == len(held) <= 2
    assert first[0].state is WorkerState.DRAINING
    assert h.procs.sent_to(first[0])[-1] == {
        "t": "drain",
        "code": 1012,
        "reason": "service restart",
    }


def test_a_hung_worker_replaced_by_a_restart_keeps_its_kill_deadline() -> None:
    h = Harness(2, timeout=4)
    h.boot()
    hung = h.worker(0)
    h.fleet.start_restart(h.config)
    h.advance(4.05, silent=(hung,))  # no heartbeat: TERM, SIGKILL due after KILL_GRACE
    assert hung.state is WorkerState.STOPPING
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    assert hung.state is WorkerState.STOPPING  # not given a drain's allowance
    h.advance(KILL_GRACE, silent=(hung,))
    assert hung.state is WorkerState.KILLED


def test_the_held_workers_drain_only_once_every_one_has_stopped_accepting() -> None:
    """The last slot's old worker is told to hold as the restart ends: nobody drains until it
    says it stopped accepting, or a client closed by another old worker could reconnect to
    it and be closed a second time."""
    h = Harness(2)
    h.boot()
    old = [h.worker(0), h.worker(1)]
    h.confirm_holds = False
    h.fleet.start_restart(h.config)
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    h.fleet.on_message(old[0], {"t": "held"})
    h.ready(h.fleet.slots[1].replacement)  # type: ignore[arg-type]
    assert h.fleet.restart_outcome.kind == "done"
    assert [w.state for w in old] == [WorkerState.HELD, WorkerState.HOLDING]
    h.fleet.on_message(old[1], {"t": "held"})
    h.settle()
    assert [w.state for w in old] == [WorkerState.DRAINING, WorkerState.DRAINING]


@pytest.mark.parametrize(
    "counts",
    [
        {"h": {}, "c": {str(code): 1 for code in range(3000, 3101)}, "i": 0, "o": 0},  # 101 keys
        {"h": {}, "c": {}, "i": 10**400, "o": 0},  # would overflow a float at a scrape
        {"h": {}, "c": {}, "i": 0},
        [1, 2],
    ],
)
def test_malformed_counts_are_dropped_but_the_heartbeat_counts(counts: object, caplog) -> None:
    """A worker's counts that break the protocol must not get it killed as silent: the
    heartbeat is taken, the counts are not, and that is said once."""
    h = Harness(1, timeout=4)
    h.boot()
    worker = h.worker(0)
    for _ in range(3):
        h.now += 2
        h.fleet.on_message(worker, channel.validate({"t": "hb", "conns": 5, "n": counts}))
        h.settle()
    assert worker.state is WorkerState.READY and worker.connections == 5
    assert h.fleet.tally.per_slot() == {}
    assert caplog.text.count("counts that do not follow the protocol") == 1


def test_close_codes_become_a_bounded_set_of_labels() -> None:
    from wsfleet.connection import close_code_label

    assert [close_code_label(c) for c in (1000, 1006, 1012, 1015, None)] == [
        "1000",
        "1006",
        "1012",
        "1015",
        "none",
    ]
    assert {close_code_label(c) for c in range(3000, 5000)} == {"3xxx", "4xxx"}
    assert close_code_label(2000) == close_code_label(1016) == "other"


# Upgrading wsfleet itself: a new master started beside this one (wsfleet/upgrade.py)


def upgrading(workers: int = 2) -> tuple[Harness, int]:
    h = Harness(workers)
    h.boot()
    h.fleet.start_upgrade()
    h.settle()
    (new_master,) = h.procs.masters
    assert h.fleet.upgrade_outcome == UpgradeOutcome("in_progress", None, new_master)
    return h, new_master


@pytest.mark.parametrize(
    ("outcome", "words"),
    [
        (UpgradeOutcome(), "none yet"),
        (UpgradeOutcome("in_progress", None, 7), "in progress"),
        (UpgradeOutcome("done", None, 7), "done: master 7 serves"),
        (UpgradeOutcome("failed", "new master 7 exited (exit status 1)", 7), "failed: new "),
        (UpgradeOutcome("refused", "the master is starting"), "refused: the master is starting"),
        (UpgradeOutcome("stopped", "shutdown", 7), "stopped by shutdown"),
    ],
)
def test_an_upgrades_outcome_is_data_and_its_words_are_the_status_text(
    outcome: UpgradeOutcome, words: str
) -> None:
    """The status carries the outcome as data ("upgrade", which `wsfleet upgrade` reads);
    `wsfleet status` and the status page show it in these words ("last_upgrade")."""
    h = Harness(1)
    h.fleet.upgrade_outcome = outcome
    data = h.fleet.status()["master"]["upgrade"]
    assert data == {
        "kind": outcome.kind,
        "detail": outcome.detail,
        "new_master": outcome.new_master,
    }
    assert control.upgrade_text(data).startswith(words)
    assert json.loads(json.dumps(data)) == data


def test_an_upgrade_hands_over_once_the_new_master_is_ready() -> None:
    h, new_master = upgrading()
    old = [h.worker(0), h.worker(1)]
    h.advance(5.0)  # the new master starts: this one serves as before
    assert all(w.state is WorkerState.READY for w in old) and h.procs.closed == []
    h.fleet.on_new_master_ready()
    h.settle()
    assert h.procs.handed_to == [new_master]
    assert h.fleet.upgrade_outcome == UpgradeOutcome("done", None, new_master)
    # As in a reload: every old worker stops accepting, then all close with 1012 together.
    for worker in old:
        assert h.procs.sent_to(worker) == [
            {"t": "hold"},
            {"t": "drain", "code": 1012, "reason": "service restart"},
        ]
    assert sorted(h.procs.closed) == [-1, 0, 1]  # this master's copies of the sockets
    assert h.fleet.state is MasterState.STOPPING and not h.fleet.finished
    for worker in old:
        h.exit(worker, 0)
    assert h.fleet.finished  # the new master runs on: it is not waited for
    assert len(h.procs.forked) == 2 and (new_master, signal.SIGTERM) not in h.procs.signals
    assert h.fleet.restart_reasons["crash"] == 0


def test_old_workers_hold_before_any_closes_during_a_hand_over() -> None:
    h, _ = upgrading()
    h.confirm_holds = False
    h.fleet.on_new_master_ready()
    h.settle()
    first, second = h.worker(0), h.worker(1)
    h.fleet.on_message(first, {"t": "held"})
    h.settle()
    assert all(m["t"] != "drain" for m in h.procs.sent_to(first))  # the other still accepts
    h.fleet.on_message(second, {"t": "held"})
    h.settle()
    assert first.state is second.state is WorkerState.DRAINING


@pytest.mark.parametrize("how", ["says why", "exits", "is too slow"])
def test_a_new_master_that_fails_leaves_this_one_serving(how: str) -> None:
    h, new_master = upgrading()
    old = set(h.fleet.workers.values())
    if how == "says why":
        h.fleet.on_new_master_failed("cannot start: worker 7 could not start (exit status 4)")
        h.settle()
        reason = "cannot start: worker 7 could not start (exit status 4)"
        assert h.fleet.upgrade_outcome == UpgradeOutcome("failed", reason, new_master)
        h.fleet.on_exit(new_master, 4)
    elif how == "exits":
        h.fleet.on_exit(new_master, 1)
        reason = f"new master {new_master} exited (exit status 1) before it was ready"
        assert h.fleet.upgrade_outcome == UpgradeOutcome("failed", reason, new_master)
    else:
        limit = cfg.upgrade_limit(h.config)
        h.advance(limit - 0.2)
        assert h.procs.signals == []
        h.advance(0.3)
        assert h.procs.signals == [(new_master, signal.SIGTERM)]
        reason = f"new master {new_master} was not ready after {limit:g}s"
        assert h.fleet.upgrade_outcome == UpgradeOutcome("failed", reason, new_master)
        h.advance(cfg.drain_limit(h.config) + KILL_GRACE)  # it does not exit
        assert h.procs.signals[-1] == (new_master, signal.SIGKILL)
        assert h.fleet.upgrade is not None and h.fleet.upgrade.state is UpgradeState.KILLED
        h.fleet.on_exit(new_master, -9)
    h.settle()
    assert h.fleet.upgrade is None and h.fleet.state is MasterState.RUNNING
    assert set(h.fleet.workers.values()) == old
    assert all(w.state is WorkerState.READY for w in old) and h.procs.closed == []
    assert h.procs.handed_to == []
    h.fleet.start_upgrade()  # the next attempt goes ahead
    assert len(h.procs.masters) == 2 and h.fleet.upgrade_outcome.kind == "in_progress"


def test_upgrades_are_refused_while_another_runs_or_the_master_stops() -> None:
    h, new_master = upgrading()
    h.fleet.start_upgrade()  # the same one goes on: its outcome answers both
    assert h.procs.masters == [new_master] and h.fleet.upgrades == 2
    h.fleet.on_new_master_failed("no")
    h.fleet.start_upgrade()  # not before the failed one is reaped
    assert h.procs.masters == [new_master]
    reason = f"the failed new master {new_master} has not exited yet"
    assert h.fleet.upgrade_outcome == UpgradeOutcome("refused", reason)
    booting = Harness(1)
    booting.fleet.start_upgrade()
    assert booting.procs.masters == []
    assert booting.fleet.upgrade_outcome == UpgradeOutcome("refused", "the master is starting")


def test_a_shutdown_during_an_upgrade_stops_the_new_master_too() -> None:
    h, new_master = upgrading()
    h.fleet.stop(graceful=True)
    h.settle()
    assert (new_master, signal.SIGTERM) in h.procs.signals
    assert h.fleet.upgrade_outcome == UpgradeOutcome("stopped", "shutdown", new_master)
    for worker in list(h.fleet.workers.values()):
        h.exit(worker, 0)
    assert not h.fleet.finished  # its own child is reaped before it exits: no orphan
    h.fleet.on_exit(new_master, 0)
    assert h.fleet.finished


def test_an_upgrade_during_a_reload_closes_each_client_once() -> None:
    h, _ = upgrading(3)
    h.fleet.start_restart(h.config)
    h.settle()
    h.ready(h.newest(0))  # slot 0 has its new worker; its old one is held
    held = [w for w in h.fleet.workers.values() if w.state is WorkerState.HELD]
    assert len(held) == 1
    h.fleet.on_new_master_ready()
    h.settle()
    assert h.fleet.restart is None
    outcome = h.fleet.restart_outcome
    assert (outcome.kind, outcome.detail) == ("stopped", "an upgrade")
    for worker in h.fleet.workers.values():
        drains = [m for m in h.procs.sent_to(worker) if m["t"] == "drain"]
        assert drains == [{"t": "drain", "code": 1012, "reason": "service restart"}]


def test_a_new_master_counts_its_workers_as_upgrades_then_scales_once_it_took_over() -> None:
    h = Harness(2, slots=3)  # the old master had 3 (TTIN); the configuration says 2
    assert h.fleet.restart_reasons["upgrade"] == 3
    h.boot()
    assert len(h.fleet.slots) == 3  # the old master's workers still accept on slot 2 too
    h.fleet.on_taken_over()
    h.advance(RETIRE_SETTLE)
    assert len(h.fleet.slots) == 2
    (removed,) = [w for w in h.fleet.workers.values() if w.slot.index == 2]
    assert h.procs.sent_to(removed) == [{"t": "drain", "code": 1001, "reason": "going away"}]


def test_no_scaling_while_a_new_master_starts_on_the_handed_slots() -> None:
    h, _ = upgrading()
    h.fleet.scale(3)
    h.fleet.scale(1)
    h.settle()
    assert len(h.fleet.slots) == 2 and len(h.procs.forked) == 2
    h.fleet.on_new_master_failed("no")
    h.fleet.scale(3)  # once it failed, the fleet is this master's again
    assert len(h.fleet.slots) == 3


def test_an_immediate_shutdown_quits_a_starting_new_master() -> None:
    h, new_master = upgrading()
    h.fleet.stop(graceful=False)
    assert (new_master, signal.SIGQUIT) in h.procs.signals
    assert h.fleet.upgrade is not None and h.fleet.upgrade.state is UpgradeState.FAILED


def test_a_repeated_condition_is_reported_at_most_once_per_interval() -> None:
    """The worker's report of failed accepts and failed TLS handshakes: the first at once,
    then one per interval with the count since the last report."""
    from wsfleet.worker import Occurrences

    seen = Occurrences(interval=5.0)
    assert seen.report_due(100.0) == 1
    assert [seen.report_due(t) for t in (100.1, 102.0, 104.9)] == [0, 0, 0]
    assert seen.report_due(105.0) == 4
    assert seen.report_due(109.0) == 0
    assert seen.report_due(200.0) == 2


def test_counted_nouns() -> None:
    from wsfleet.logs import plural

    assert [plural(n, "worker") for n in (0, 1, 2)] == ["0 workers", "1 worker", "2 workers"]
    assert plural(1, "process", "processes") == "1 process"
    assert plural(3, "process", "processes") == "3 processes"


# --max-worker-memory: the master reads each worker's USS, the fleet decides

MIB = 2**20


def read_memory(h: Harness, sizes: dict[int, int], due: bool = True) -> None:
    """The master's memory step: what the fleet asks to read, read (MiB by slot, for the
    slot's newest worker; 30 for any other), then reconcile."""
    newest = {slot: h.newest(slot).pid for slot in sizes}
    for pid in h.fleet.to_measure(due):
        worker = h.fleet.workers[pid]
        size = sizes.get(worker.slot.index, 30) if pid == newest.get(worker.slot.index) else 30
        h.fleet.on_memory(pid, size * MIB)
    h.settle()


def test_a_worker_over_max_worker_memory_is_replaced_like_one_slot_of_a_reload(caplog) -> None:
    h = Harness(3, max_worker_memory=100)
    h.boot()
    read_memory(h, {0: 30, 1: 30, 2: 30})
    grown, others = h.worker(1), [h.worker(0), h.worker(2)]
    forks = len(h.procs.forked)
    with caplog.at_level(logging.WARNING, "wsfleet.master"):
        read_memory(h, {1: 150})
    said = f"worker {grown.pid} (slot 1) uses 150.0 MiB (USS), over --max-worker-memory 100 MiB"
    assert said in caplog.text
    # A new worker for its slot first; the old one serves meanwhile.
    assert len(h.procs.forked) == forks + 1 and h.procs.forked[-1][1] == 1
    new = h.fleet.slots[1].replacement
    assert new is not None and grown.state is WorkerState.READY
    read_memory(h, {1: 150})  # still over: nothing more (the replacement is under way)
    assert len(h.procs.forked) == forks + 1
    h.ready(new)
    # Held, then drained with 1012, as a reload does; the other slots untouched.
    assert h.procs.sent_to(grown) == [
        {"t": "hold"},
        {"t": "drain", "code": 1012, "reason": "service restart"},
    ]
    assert h.worker(1) is new and h.fleet.restart is None
    assert [h.worker(0), h.worker(2)] == others
    assert all(h.procs.sent_to(w) == [] and w.state is WorkerState.READY for w in others)
    # Counted as memory, not as a reload: the reload's outcome and status are untouched.
    assert h.fleet.restart_reasons["memory"] == 1 and h.fleet.restart_reasons["reload"] == 0
    status = h.fleet.status()["master"]
    assert status["restarts_by_reason"]["memory"] == 1 and status["restarts"] == 0
    assert status["reload"] == {
        "kind": "none",
        "detail": None,
        "old_workers": 0,
        "old_connections": 0,
    }
    # The old one, still over the bound while it drains, and the new one: no loop.
    read_memory(h, {1: 30})
    h.fleet.on_memory(grown.pid, 150 * MIB)
    h.settle()
    h.advance(30)
    assert len(h.procs.forked) == forks + 1 and h.fleet.restart is None


def test_memory_is_read_only_with_the_bound_and_a_new_worker_at_once_when_ready() -> None:
    off = Harness(2)
    off.boot()
    assert off.fleet.to_measure(due=True) == []
    assert [w["memory"] for w in off.fleet.status()["workers"]] == [None, None]
    h = Harness(2, max_worker_memory=100)
    assert h.fleet.to_measure(due=True) == []  # starting: not yet
    h.ready(h.worker(0))
    assert h.fleet.to_measure(due=False) == [h.worker(0).pid]  # its first reading, at once
    h.fleet.on_memory(h.worker(0).pid, 20 * MIB)
    assert h.fleet.to_measure(due=False) == []
    h.ready(h.worker(1))
    assert h.fleet.to_measure(due=True) == [h.worker(0).pid, h.worker(1).pid]
    h.fleet.on_memory(h.worker(1).pid, 25 * MIB)
    assert [w["memory"] for w in h.fleet.status()["workers"]] == [20 * MIB, 25 * MIB]
    assert h.fleet.status()["master"]["max_worker_memory"] == 100


def test_memory_replacements_go_one_slot_at_a_time_the_largest_first() -> None:
    h = Harness(3, max_worker_memory=100)
    h.boot()
    read_memory(h, {0: 30, 1: 30, 2: 30})
    first, second = h.worker(2), h.worker(0)
    read_memory(h, {0: 120, 2: 200})
    assert h.fleet.slots[2].replacement is not None and h.fleet.slots[0].replacement is None
    h.confirm_holds = False
    h.ready(h.fleet.slots[2].replacement)  # type: ignore[arg-type]
    assert first.state is WorkerState.HOLDING
    read_memory(h, {0: 120})
    assert h.fleet.slots[0].replacement is None  # not while the replaced one is not drained
    h.confirm_holds = True
    read_memory(h, {0: 120})
    assert first.state is WorkerState.DRAINING
    assert h.fleet.slots[0].replacement is not None  # the next one now
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    assert second.state is WorkerState.DRAINING and h.fleet.restart_reasons["memory"] == 2


def test_a_memory_replacement_waits_for_a_reload_an_upgrade_and_never_runs_stopping() -> None:
    h = Harness(2, max_worker_memory=100)
    h.boot()
    read_memory(h, {0: 30, 1: 30})
    h.fleet.start_restart(h.config)
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    read_memory(h, {0: 30})
    read_memory(h, {0: 150})  # slot 0's new worker grows during the reload: it waits
    assert h.fleet.restart is not None and h.fleet.restart.reason == "reload"
    assert h.fleet.slots[0].replacement is None
    h.ready(h.fleet.slots[1].replacement)  # type: ignore[arg-type]
    assert h.fleet.restart_outcome.kind == "done"
    # The reload is done and its old workers drain: now slot 0's grown worker goes.
    grown = h.worker(0)
    read_memory(h, {0: 150, 1: 30})
    assert h.fleet.restart is not None and h.fleet.restart.reason == "memory"
    h.ready(h.fleet.slots[0].replacement)  # type: ignore[arg-type]
    assert grown.state is WorkerState.DRAINING
    assert h.fleet.restart_outcome.kind == "done"  # (the reload's, unchanged)
    assert h.fleet.restart_reasons["reload"] == 2 and h.fleet.restart_reasons["memory"] == 1
    # An upgrade under way: nothing; then a stop: nothing either.
    h.fleet.start_upgrade()
    read_memory(h, {1: 150})
    assert h.fleet.restart is None
    h.fleet.on_new_master_failed("no")
    read_memory(h, {1: 150})
    assert h.fleet.restart is None  # (the failed new master is not reaped yet)
    h.fleet.stop(graceful=True)
    read_memory(h, {1: 150})
    assert h.fleet.restart is None and h.fleet.restart_reasons["memory"] == 1


def test_a_worker_over_the_bound_from_its_start_is_not_replaced_in_a_loop(caplog) -> None:
    h = Harness(2, max_worker_memory=10)
    with caplog.at_level(logging.WARNING, "wsfleet.master"):
        h.boot()
        read_memory(h, {0: 30, 1: 5})
    assert "uses 30.0 MiB (USS) from its start, over --max-worker-memory 10 MiB" in caplog.text
    for _ in range(5):
        h.advance(5)
        read_memory(h, {0: 30, 1: 5})
    assert len(h.procs.forked) == 2 and h.fleet.restart_reasons["memory"] == 0
    assert caplog.text.count("from its start") == 1


def test_a_memory_replacement_that_cannot_start_leaves_the_worker_serving() -> None:
    h = Harness(2, max_worker_memory=100)
    h.boot()
    read_memory(h, {0: 30, 1: 30})
    grown = h.worker(0)
    read_memory(h, {0: 150})
    h.exit(h.fleet.slots[0].replacement, 4)  # type: ignore[arg-type]
    assert h.worker(0) is grown and grown.state is WorkerState.READY
    assert h.fleet.restart is None and h.fleet.restart_outcome.kind == "none"
    forks = len(h.procs.forked)
    read_memory(h, {0: 150})  # not again before config.MEMORY_INTERVAL
    h.procs.fail_forks = 1
    h.advance(cfg.MEMORY_INTERVAL)
    read_memory(h, {0: 150})  # a fork that fails: the same
    assert len(h.procs.forked) == forks and h.fleet.restart is None
    h.advance(cfg.MEMORY_INTERVAL)
    read_memory(h, {0: 150})
    assert h.fleet.slots[0].replacement is not None
    h.ready(h.fleet.slots[0].replacement)
    assert grown.state is WorkerState.DRAINING and h.fleet.restart_reasons["memory"] == 1
    assert h.fleet.restart_outcome.kind == "none"


def test_a_hup_during_a_memory_replacement_makes_it_a_reload_that_leaves_no_old_worker() -> None:
    """The memory replacement's new worker was forked before the HUP: the reload replaces
    its slot once more, so that `wsfleet reload --wait` sees no old worker left."""
    h = Harness(2, max_worker_memory=100)
    h.boot()
    read_memory(h, {0: 30, 1: 30})
    grown = h.worker(0)
    read_memory(h, {0: 150})
    h.now += 1
    h.fleet.start_restart(h.config)
    assert h.fleet.restart is not None and h.fleet.restart.reason == "reload"
    assert h.fleet.restart_outcome.kind == "in_progress"
    for _ in range(4):
        step = next((s.replacement for s in h.fleet.slots if s.replacement is not None), None)
        if step is None:
            break
        h.ready(step)
    assert h.fleet.restart is None and h.fleet.restart_outcome.kind == "done"
    assert grown.state is WorkerState.DRAINING
    for worker in [w for w in h.fleet.workers.values() if w.state is WorkerState.DRAINING]:
        h.exit(worker, 0)
    assert h.fleet.reload_status()["old_workers"] == 0
    assert h.fleet.restart_reasons["memory"] == 1 and h.fleet.restart_reasons["reload"] == 2


def test_a_hup_during_a_reload_leaves_no_worker_forked_before_it() -> None:
    """The slot in progress at the second HUP got a worker forked before it (with the first
    HUP's configuration): it is replaced once more, or reload --wait would wait forever."""
    h = Harness(2)
    h.boot()
    h.fleet.start_restart(h.config)
    h.now += 1
    h.fleet.start_restart(h.config)
    for _ in range(4):
        step = next((s.replacement for s in h.fleet.slots if s.replacement is not None), None)
        if step is None:
            break
        h.ready(step)
    for worker in [w for w in h.fleet.workers.values() if w.state is WorkerState.DRAINING]:
        h.exit(worker, 0)
    assert h.fleet.restart_outcome.kind == "done"
    assert h.fleet.reload_status()["old_workers"] == 0


def test_wsfleet_status_shows_each_workers_memory_only_with_the_bound() -> None:
    def text(h: Harness) -> str:
        status = h.fleet.status()
        status["master"].update(pid=7, age=3.0, addresses=["ws://127.0.0.1:8765"])
        return control.format_status(status)

    off = Harness(1)
    off.boot()
    assert "MEMORY" not in text(off) and "USS" not in text(off)
    h = Harness(2, max_worker_memory=300)
    h.boot()
    h.fleet.on_memory(h.worker(0).pid, 45 * MIB)
    lines = text(h).splitlines()
    assert lines[1].split()[-1] == "MEMORY"
    assert lines[3].split()[-2:] == ["45", "MiB"] and lines[4].split()[-1] == "-"
    assert "memory: each worker's own (USS), read every 5s; over 300 MiB a worker is replaced" in (
        lines
    )


def test_a_slot_scaled_away_during_its_memory_replacement_ends_it() -> None:
    h = Harness(2, max_worker_memory=100)
    h.boot()
    read_memory(h, {0: 30, 1: 30})
    grown = h.worker(1)
    read_memory(h, {1: 150})
    step = h.fleet.slots[1].replacement
    assert step is not None
    h.fleet.scale(1)  # TTOU
    h.settle()
    assert h.fleet.restart is None and len(h.fleet.slots) == 1  # (not scaled back: no reload)
    assert step.state is WorkerState.DRAINING
    h.advance(RETIRE_SETTLE)  # (its queue empty: the grown worker goes with its slot)
    assert grown.state is WorkerState.DRAINING
    assert h.procs.sent_to(grown)[-1] == {"t": "drain", "code": 1001, "reason": "going away"}
    assert h.fleet.restart_outcome.kind == "none" and h.fleet.restart_reasons["memory"] == 0
