"""The master's decisions: which worker serves which slot, and what happens next.

:class:`Fleet` holds the slots and the workers, each in one named state, and reacts to events
(a worker's message, a child's exit, a signal's request, a deadline) by changing states and
asking the outside world to act: its :class:`Processes` (fork, signal, send, open and close
slots; wsfleet/processes.py) and its :class:`Upgrades` (start a new master, hand over to it;
wsfleet/upgrade.py); the records it keeps (a worker, a slot, their states, the outcomes) and
those two ports are in wsfleet/records.py. After every event :meth:`Fleet.reconcile`
recomputes what follows from the states (which slot's socket is lent to whom, whether the
fleet is ready), and :meth:`Fleet.deadlines` lists every timer there is; nothing else keeps
time. Time comes from the clock it is given; there is no file descriptor, system call or
process id here: the master (wsfleet/master.py) feeds it events and reads its state, and unit
tests drive it with fake processes and a fake clock (tests/test_fleet.py).

A worker's life: STARTING (forked) -> READY (it accepts) -> DRAINING (asked to stop; killed
if still there after :func:`config.drain_limit`) -> reaped. A rolling restart puts a replaced
worker in HELD first (it stops accepting and keeps its connections) until every slot has its
new worker, or the restart stops: then all HELD workers drain together, and a client closed
by the reload reconnects to a new worker, never to one the same reload closes again. A worker
that stops answering goes to STOPPING (SIGTERM), then KILLED (SIGKILL). A slot's state
follows from its workers: EMPTY (restart due at ``restart_at``), STARTING, SERVING, or
REPLACING during a rolling restart.

Outcomes are data (:class:`RestartOutcome`, :class:`UpgradeOutcome`: a kind and a detail),
which the status reports and commands read; the words are the log's and `wsfleet status`'s.
"""

from __future__ import annotations

import collections
import logging
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from . import channel, logs
from . import config as cfg
from .counts import Tally
from .records import (
    EXIT_APP,
    KEPT,
    LIVE,
    MasterState,
    Processes,
    RestartOutcome,
    RollingRestart,
    Slot,
    SlotState,
    Upgrade,
    UpgradeOutcome,
    Upgrades,
    UpgradeState,
    Worker,
    WorkerState,
    describe_exit,
)

log = logging.getLogger("wsfleet.master")

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
KILL_GRACE = 1.0  # between SIGTERM (or QUIT) and SIGKILL for a worker that must stop now
# A slot scaled away (TTOU) gets no new connection from then on (the master steers them away)
# but its worker accepts on: its socket closes once its accept queue is empty, RETIRE_LIMIT at
# most. Not before RETIRE_SETTLE: a handshake the kernel answered just before (the client's
# ACK on its way, a round trip) joins that queue after, and would be reset by the close.
RETIRE_SETTLE, RETIRE_POLL, RETIRE_LIMIT = 0.25, 0.01, 1.0
# Why workers were replaced, or started and stopped (the status's restarts_by_reason).
RESTART_REASONS = ("crash", "hung", "memory", "reload", "scale", "upgrade")


class BootError(Exception):
    """No worker could start (the app does not import, say): start gives up. The fleet
    raises it (:meth:`Fleet.cannot_start`); the master stops the workers that did start
    and exits with ``status``.

    ``details`` is the worker's traceback when its app raised at import, else ""."""

    def __init__(self, message: str, status: int, details: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.details = details


class Fleet:
    """The master's decisions: which worker serves which slot, and what happens next."""

    def __init__(
        self,
        config: cfg.Config,
        processes: Processes,
        upgrader: Upgrades,
        clock: Callable[[], float],
    ) -> None:
        self.config = config  # the configuration in force: replaced by a rolling restart
        self.processes = processes
        self.upgrader = upgrader
        self.clock = clock  # monotonic seconds (time.monotonic in the master)
        self.slots: list[Slot] = []
        self.retiring: list[Slot] = []  # scaled away, their workers accepting what is queued
        # Retired: their sockets, weight 0, close once no other process holds them (a socket
        # leaves the kernel's group, and renumbers it, only at its last descriptor's close).
        self.closing: list[Slot] = []
        self.workers: dict[int, Worker] = {}
        self.state = MasterState.BOOTING
        self.restart: RollingRestart | None = None
        self.restarts = 0  # rolling restarts asked for (SIGHUP), so a waiter knows its own
        self.restart_problem: str | None = None
        self.restart_outcome = RestartOutcome()
        # Workers replaced, or started and stopped, by reason (RESTART_REASONS).
        self.restart_reasons: collections.Counter[str] = collections.Counter()
        self.tally = Tally()  # the workers' counts (--metrics)
        self.arrived = 0  # connections the workers accepted, summed as they report them
        self.upgrade: Upgrade | None = None
        self.upgrades = 0  # upgrades asked for (SIGUSR2), so a waiter knows its own
        self.upgrade_outcome = UpgradeOutcome()
        self.recycle_after = 0.0  # no --max-worker-memory replacement before (one failed)

    # Workers' lives

    def start(self, sockets: Sequence[list[Any]], reason: str | None = None) -> None:
        """Boot: one slot per list of sockets, each with a worker (started by an upgrade of
        wsfleet, reason "upgrade": counted as restarts)."""
        self.slots = [Slot(index, list(socks)) for index, socks in enumerate(sockets)]
        for slot in self.slots:
            self.spawn(slot)
        if reason is not None:
            self.restart_reasons[reason] += len(self.slots)

    def spawn(self, slot: Slot, replacement: bool = False) -> Worker | None:
        """Fork a worker for the slot; a failed fork is retried like a crash at start."""
        now = self.clock()
        try:
            pid, handle = self.processes.fork(slot)
        except OSError as exc:
            slot.crashes += 1
            delay = max(backoff(slot.crashes), BACKOFF_FIRST)
            log.error(
                "cannot start a worker for slot %d: %s; retrying in %.1fs", slot.index, exc, delay
            )
            if not replacement:
                slot.restart_at = now + delay
            return None
        worker = Worker(
            pid,
            slot,
            handle,
            born=now,
            since=now,
            last_seen=now,
            config=self.config,
        )
        self.workers[pid] = worker
        if replacement:
            slot.replacement = worker
        else:
            slot.worker = worker
        log.info("started worker %d for slot %d", pid, slot.index)
        return worker

    def set_state(self, worker: Worker, state: WorkerState) -> None:
        log.debug(
            "worker %d (slot %d): %s -> %s",
            worker.pid,
            worker.slot.index,
            worker.state.value,
            state.value,
        )
        worker.state, worker.since = state, self.clock()

    def on_message(self, worker: Worker, message: channel.Message) -> None:
        """A validated message from a worker (channel.validate)."""
        worker.last_seen = self.clock()
        kind = message["t"]
        if kind == "hb":
            worker.connections = message["conns"]
            if "acc" in message:
                self.arrived += max(0, message["acc"] - worker.accepted)
                worker.accepted = message["acc"]
            if "n" in message:
                self.tally.report(worker.pid, worker.slot.index, message["n"])
            elif "bad_counts" in message and not worker.counts_refused:
                worker.counts_refused = True  # said once per worker, not every second
                log.warning(
                    "worker %d sent counts that do not follow the protocol (ignored): %s",
                    worker.pid,
                    message["bad_counts"],
                )
        elif kind == "error":
            worker.error = message["message"]
            worker.details = message.get("details", "")
        elif kind == "ready" and worker.state is WorkerState.STARTING:
            self.on_ready(worker)
        elif kind == "held":
            worker.listening = False
            if worker.state is WorkerState.HOLDING:
                self.set_state(worker, WorkerState.HELD)
        elif kind == "released":
            for slot in self.closing:
                if slot.releasing is worker and slot.index == message["slot"]:
                    slot.releasing = None
        elif kind == "draining":
            worker.listening = False
            if worker.state in LIVE:
                self.on_retiring(worker)
            if worker.state is WorkerState.DRAINING and "over" in message:
                worker.paced = float(message["over"])  # its closes end then: the deadline too

    def on_retiring(self, worker: Worker) -> None:
        """A worker drains that the master did not ask to (a SIGTERM from outside): it stops
        accepting, so its slot gets a new worker at once and its sockets are lent meanwhile."""
        log.warning(
            "worker %d (slot %d) is draining on its own%s",
            worker.pid,
            worker.slot.index,
            "" if worker.state in KEPT else ": replacing it",
        )
        if worker.state not in KEPT:
            self.restart_reasons["crash"] += 1  # it left unasked
        self.set_state(worker, WorkerState.DRAINING)
        slot = worker.slot
        if slot.replacement is worker:
            slot.replacement = None
        if slot.worker is worker and slot in self.slots and self.state is not MasterState.STOPPING:
            slot.worker = None
            slot.restart_at = self.clock()

    def on_ready(self, worker: Worker) -> None:
        self.set_state(worker, WorkerState.READY)
        worker.ready_at = worker.since
        slot = worker.slot
        log.info("worker %d (slot %d) is ready", worker.pid, slot.index)
        if slot.replacement is worker:
            # Rolling restart: the new worker accepts on the slot's sockets; the old one stops
            # accepting and keeps its connections until the restart ends (see reconcile).
            old, slot.worker, slot.replacement = slot.worker, worker, None
            self.restart_reasons[worker.replacing] += 1
            if old is not None and old.state is WorkerState.READY:
                # One held worker per slot: a HUP during a restart starts it again, and the
                # slot's earlier held worker closes its connections now, once.
                for held in self.workers.values():
                    if held.slot is slot and held.state in KEPT:
                        self.drain(held, 1012, "service restart")
                self.hold(old)
            elif old is not None and old.state is WorkerState.STARTING:
                self.drain(old, 1012, "service restart")
            # (A STOPPING or KILLED one keeps its kill deadline.)
        if self.restart is not None and self.restart.step is worker:
            self.restart.todo.pop(0)
            self.restart.step = None
            self.advance_restart()

    def on_exit(self, pid: int, code: int) -> None:
        """A child was reaped with this exit code (negative: killed by that signal): forget
        it, then decide what its going means, by what it was doing."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            if self.upgrade is not None and self.upgrade.pid == pid:
                self.on_new_master_exit(code)
            return
        served_its_slot = self.forget(worker)
        how = describe_exit(code)
        if self.restart is not None and self.restart.step is worker:
            self.restart_step_died(worker, how)
        if worker.state is WorkerState.DRAINING or self.state is MasterState.STOPPING:
            log.info("worker %d (slot %d) exited (%s)", pid, worker.slot.index, how)
        elif worker.state in KEPT:  # its slot has its new worker already
            log.error(
                "worker %d (slot %d), held by the rolling restart, died (%s)",
                pid,
                worker.slot.index,
                how,
            )
        elif self.state is MasterState.BOOTING and worker.ready_at is None:
            self.cannot_start(worker, code, how)
        elif served_its_slot and worker.slot in self.slots:  # (not a replacement, not scaled away)
            self.replace(worker, how)

    def forget(self, worker: Worker) -> bool:
        """The bookkeeping of a worker gone: its counts, whether it left unasked, its slot's
        run of crashes, the sockets lent to it. True if it was its slot's worker."""
        self.tally.exited(worker.pid)
        if worker.state in LIVE and self.state is not MasterState.STOPPING:
            self.restart_reasons["crash"] += 1  # it left unasked
        slot = worker.slot
        if not self.crashed_at_start(worker):
            slot.crashes = 0  # it served: whatever ends it, the next crash is a first one
        for other in self.slots:
            if other.lent_to is worker:
                other.lent_to = None
        if slot.replacement is worker:
            slot.replacement = None
        if slot.worker is not worker:
            return False
        slot.worker = None
        return True

    def crashed_at_start(self, worker: Worker) -> bool:
        """Never ready, or gone within --start-seconds of it: only a run of those backs off."""
        ready_at = worker.ready_at
        return ready_at is None or self.clock() - ready_at < self.config.start_seconds

    def restart_step_died(self, worker: Worker, how: str) -> None:
        """The rolling restart's new worker exited before it was ready: the restart stops
        there (the old worker keeps serving its slot; reconcile drains the held ones)."""
        slot = worker.slot
        if self.restart is not None and self.restart.reason == "memory":
            self.memory_step_failed(
                f"its new worker {worker.pid} exited before it was ready ({how})"
            )
            return
        log.error(
            "rolling restart stopped: the new worker %d for slot %d exited before it was "
            "ready (%s)%s; the old worker keeps serving%s",
            worker.pid,
            slot.index,
            how,
            worker.said(),
            worker.traceback(),
        )
        self.restart = None
        why = f"worker {worker.pid} for slot {slot.index} exited ({how}){worker.said()}"
        self.restart_ended("failed", why)

    def cannot_start(self, worker: Worker, code: int, how: str) -> NoReturn:
        """A worker exited before it was ready while the fleet boots: the fleet cannot start
        (the app does not import, say), and that decision is raised to the master, which
        stops the workers that did start and exits with the status: the app's (EXIT_APP)
        when the worker said its app failed, else 1."""
        status = EXIT_APP if code == EXIT_APP else 1
        message = f"worker {worker.pid} could not start ({how}){worker.said()}"
        raise BootError(message, status, worker.details)

    def replace(self, worker: Worker, how: str) -> None:
        """A slot's worker died: a new one starts at once, or after the backoff if this is
        a run of crashes at start (the first of a run is retried at once too)."""
        slot = worker.slot
        crashing = self.crashed_at_start(worker)
        if crashing:
            slot.crashes += 1
        delay = backoff(slot.crashes) if crashing else 0.0
        details = worker.traceback() if slot.crashes <= 1 else ""  # the first of the run shows it
        if delay:
            log.error(
                "worker %d (slot %d) died (%s) at start%s; %s in a row: restarting in %.1fs%s",
                worker.pid,
                slot.index,
                how,
                worker.said(),
                logs.plural(slot.crashes, "time"),
                delay,
                details,
            )
        else:
            log.error(
                "worker %d (slot %d) died (%s)%s: replacing it%s",
                worker.pid,
                slot.index,
                how,
                worker.said(),
                details,
            )
        slot.restart_at = self.clock() + delay

    def hold(self, worker: Worker) -> None:
        """Ask a replaced worker to stop accepting and keep its connections (HELD)."""
        self.set_state(worker, WorkerState.HOLDING)
        # A channel gone (the worker is exiting) or full: TERM drains it now with 1001, so
        # its clients may meet this reload twice; an edge that has not been seen.
        if not self.processes.send(worker, {"t": "hold"}):
            self.set_state(worker, WorkerState.DRAINING)
            self.processes.signal(worker.pid, signal.SIGTERM)  # its channel is gone: drain 1001

    def drain(self, worker: Worker, code: int, reason: str) -> None:
        """Ask a worker to stop accepting and close its connections with this code."""
        self.set_state(worker, WorkerState.DRAINING)
        if not self.processes.send(worker, {"t": "drain", "code": code, "reason": reason}):
            self.processes.signal(worker.pid, signal.SIGTERM)  # its channel is gone: drain 1001

    def stop_now(self, worker: Worker, sig: signal.Signals) -> None:
        self.set_state(worker, WorkerState.STOPPING)
        self.processes.signal(worker.pid, sig)

    # Deadlines: every timer of the master, in one place

    def deadlines(self) -> Iterator[tuple[float, Callable[[Any], object], Any]]:
        """(when, what to call, with what) for everything that waits on time."""
        if self.state is not MasterState.STOPPING:
            for slot in self.slots:
                if slot.worker is None:
                    yield slot.restart_at, self.spawn, slot
        for slot in self.retiring:
            assert slot.retiring is not None
            first = slot.retiring + RETIRE_SETTLE
            yield first if slot.looked is None else slot.looked + RETIRE_POLL, self.look, slot
        for worker in self.workers.values():
            if worker.state in LIVE:
                yield worker.last_seen + self.config.timeout, self.on_silent, worker
            elif worker.state is WorkerState.DRAINING:
                yield worker.drain_deadline(), self.on_drain_overdue, worker
            elif worker.state is WorkerState.STOPPING:
                yield worker.since + KILL_GRACE, self.kill, worker
        upgrade = self.upgrade
        if upgrade is not None and upgrade.state is UpgradeState.STARTING:
            yield upgrade.since + cfg.upgrade_limit(self.config), self.on_upgrade_overdue, upgrade
        elif upgrade is not None and upgrade.state is UpgradeState.FAILED:
            # It stops as any master does: its workers drain, then it exits.
            limit = cfg.drain_limit(self.config) + KILL_GRACE
            yield upgrade.since + limit, self.kill_new_master, upgrade

    def next_deadline(self) -> float | None:
        return min((when for when, _, _ in self.deadlines()), default=None)

    def on_time(self) -> None:
        """Do what is due. Each action moves its deadline (a state changes), so none repeats."""
        now = self.clock()
        for when, action, arg in list(self.deadlines()):
            if when <= now:
                action(arg)

    def on_silent(self, worker: Worker) -> None:
        silent = self.clock() - worker.last_seen
        self.restart_reasons["hung"] += 1
        if worker.state is WorkerState.STARTING:
            log.error(
                "worker %d (slot %d) was not ready after %.0fs: killing it",
                worker.pid,
                worker.slot.index,
                silent,
            )
        else:
            log.error(
                "worker %d (slot %d) did not answer for %.0fs: killing it",
                worker.pid,
                worker.slot.index,
                silent,
            )
        self.stop_now(worker, signal.SIGTERM)

    def on_drain_overdue(self, worker: Worker) -> None:
        log.error(
            "worker %d (slot %d) is still draining %.0fs after it began: killing it",
            worker.pid,
            worker.slot.index,
            self.clock() - worker.since,
        )
        self.kill(worker)

    def kill(self, worker: Worker) -> None:
        self.set_state(worker, WorkerState.KILLED)
        self.processes.signal(worker.pid, signal.SIGKILL)

    # What follows from the states, after every event

    def reconcile(self) -> None:
        if self.state is MasterState.BOOTING and all(
            s.state is SlotState.SERVING for s in self.slots
        ):
            self.state = MasterState.RUNNING
            workers = logs.plural(len(self.slots), "worker")
            log.info("%s ready", f"all {workers}" if len(self.slots) > 1 else workers)
            self.processes.all_ready()
        # A restart done, failed or given up: what it held closes now, once. Not before every
        # held worker has said it stopped accepting: a client closed by one must not
        # reconnect to another that still accepts (the last slot's is told at the same time).
        kept = [w for w in self.workers.values() if w.state in KEPT]
        if self.restart is None and all(w.state is WorkerState.HELD for w in kept):
            for worker in kept:
                self.drain(worker, 1012, "service restart")
        self.lend_sockets()
        for slot in list(self.retiring):  # nobody to empty its queue: nothing to wait for
            if not self.accepting(slot):
                self.retire(slot)
        for slot in list(self.closing):
            if not self.held_open(slot):
                self.closing.remove(slot)
                self.processes.close_slot(slot)
        self.recycle()

    def lend_sockets(self) -> None:
        """A slot without a ready worker of its own has its socket accepted on by a ready
        worker of another slot; it is given back once its own worker is ready."""
        for slot in self.slots:
            borrower = slot.lent_to
            if borrower is not None and borrower.state is not WorkerState.READY:
                slot.lent_to = borrower = None  # a drain stops accepting on lent sockets too
            own_ready = slot.worker is not None and slot.worker.state is WorkerState.READY
            if borrower is not None and own_ready:
                slot.lent_to = None
                self.processes.send(borrower, {"t": "release", "slot": slot.index})
            elif borrower is None and not own_ready and self.state is MasterState.RUNNING:
                self.lend(slot)

    def lend(self, slot: Slot) -> None:
        borrowers = [
            s.worker
            for s in self.slots
            if s is not slot and s.worker is not None and s.worker.state is WorkerState.READY
        ]
        if not borrowers or not slot.sockets:  # Unix sockets only: every worker has them
            return
        borrower = min(borrowers, key=lambda w: len(self.borrowed(w)))
        fds = [sock.fileno() for sock in slot.sockets]
        if self.processes.send(borrower, {"t": "adopt", "slot": slot.index}, fds):
            slot.lent_to = borrower
            log.info("slot %d has no worker: worker %d accepts for it", slot.index, borrower.pid)

    def borrowed(self, worker: Worker) -> list[int]:
        return [s.index for s in self.slots if s.lent_to is worker]

    # Rolling restart, scaling, shutdown

    def start_restart(self, config: cfg.Config, problem: str | None = None) -> None:
        """A rolling restart with this configuration (problem: why the file could not be
        re-read, in which case it is the old one; the outcome says so)."""
        self.restarts += 1
        self.restart_problem = problem
        if self.state is MasterState.STOPPING:
            self.restart_outcome = RestartOutcome("refused", "the master is stopping", self.clock())
            return
        self.config = config
        log.info("rolling restart of %s", logs.plural(len(self.slots), "worker"))
        self.restart_outcome = RestartOutcome("in_progress", None, self.clock())
        if self.restart is None:
            self.restart = RollingRestart(list(self.slots))
            self.advance_restart()
        else:
            # Again from the start, the slot in progress first: its new worker was forked
            # before this HUP (maybe for --max-worker-memory), with the configuration of
            # then, so that slot is replaced once more at its turn; else that worker would
            # run the old code when the reload says done (and reload --wait wait for it).
            self.restart.reason = "reload"
            self.restart.todo = self.restart.todo[:1] + list(self.slots)

    def advance_restart(self) -> None:
        """Start the next slot's new worker; on_ready drains the old one and comes back."""
        restart = self.restart
        assert restart is not None
        while restart.todo and restart.todo[0] not in self.slots:
            restart.todo.pop(0)  # scaled away meanwhile
        if not restart.todo:
            self.restart = None
            if restart.reason == "memory":
                return  # (its held worker drains in reconcile)
            log.info("rolling restart done")
            self.restart_ended("done", self.restart_problem)
            self.scale(self.config.workers)
            return
        slot = restart.todo[0]
        restart.step = self.spawn(slot, replacement=slot.worker is not None)
        if restart.step is not None:
            restart.step.replacing = restart.reason
        elif restart.reason == "memory":
            self.memory_step_failed("no worker could be started")
        else:
            log.error("rolling restart stopped: no worker could be started for slot %d", slot.index)
            self.restart = None
            self.restart_ended("failed", f"cannot start slot {slot.index}")

    def restart_ended(self, kind: str, detail: str | None) -> None:
        self.restart_outcome = RestartOutcome(kind, detail, self.restart_outcome.began)

    def reload_status(self) -> dict[str, Any]:
        """The outcome as data, with the old workers (forked before that reload was asked
        for) still running and their connections: "done" and none left is a reload over."""
        outcome = self.restart_outcome
        began = outcome.began
        old = [w for w in self.workers.values() if began is not None and w.born < began]
        return {
            "kind": outcome.kind,
            "detail": outcome.detail,
            "old_workers": len(old),
            "old_connections": sum(w.connections for w in old),
        }

    # Recycling workers that grow (--max-worker-memory): the master reads, the fleet decides

    def memory_bound(self) -> int:
        """--max-worker-memory in bytes; 0: off."""
        return self.config.max_worker_memory * 2**20

    def to_measure(self, due: bool) -> list[int]:
        """The workers whose memory the master reads now: when ``due`` (every
        config.MEMORY_INTERVAL), every one past its start; otherwise only the ready ones
        never read yet, so that a worker's first reading is the size it starts at. None
        with the bound off."""
        if not self.memory_bound():
            return []
        return [
            w.pid
            for w in self.workers.values()
            if (due and w.state is not WorkerState.STARTING)
            or (w.state is WorkerState.READY and w.memory is None)
        ]

    def on_memory(self, pid: int, uss: int) -> None:
        """A worker's USS in bytes, as the master read it (reconcile decides). A worker over
        the bound at its first reading would be replaced by one as large, and so on: it is
        never replaced for its memory, and the log says so once."""
        worker = self.workers.get(pid)
        if worker is None:
            return
        first, worker.memory = worker.memory is None, uss
        bound = self.memory_bound()
        if first and bound and uss > bound and worker.state is WorkerState.READY:
            worker.oversized = True
            log.warning(
                "worker %d (slot %d) uses %s (USS) from its start, over --max-worker-memory "
                "%d MiB: not replaced for its memory (a new worker would be as large); raise "
                "the bound",
                worker.pid,
                worker.slot.index,
                mebibytes(uss),
                self.config.max_worker_memory,
            )

    def recycle(self) -> None:
        """A ready worker over --max-worker-memory is replaced like one slot of a rolling
        restart (a RollingRestart of reason memory): its new worker first, then it is held
        and drains with 1012. One slot at a time (the largest first), and none while a
        reload, an upgrade or a stop runs, nor while a replaced worker is still held: it
        waits for them (the next reading finds it again)."""
        bound = self.memory_bound()
        if (
            not bound
            or self.state is not MasterState.RUNNING
            or self.restart is not None
            or self.upgrade is not None
            or self.clock() < self.recycle_after
            or any(w.state in KEPT for w in self.workers.values())
        ):
            return
        over = [
            worker
            for slot in self.slots
            if (worker := slot.worker) is not None
            and slot.replacement is None
            and worker.state is WorkerState.READY
            and not worker.oversized
            and (worker.memory or 0) > bound
        ]
        if not over:
            return
        worker = max(over, key=lambda w: w.memory or 0)
        log.warning(
            "worker %d (slot %d) uses %s (USS), over --max-worker-memory %d MiB: replacing "
            "it (a new worker first, then it closes its connections with 1012)",
            worker.pid,
            worker.slot.index,
            mebibytes(worker.memory or 0),
            self.config.max_worker_memory,
        )
        self.restart = RollingRestart([worker.slot], reason="memory")
        self.advance_restart()

    def memory_step_failed(self, why: str) -> None:
        """A memory replacement's new worker could not start: the old one serves on, and
        the next try waits for a reading after config.MEMORY_INTERVAL."""
        restart = self.restart
        assert restart is not None and restart.todo
        slot = restart.todo[0]
        log.error(
            "worker %s (slot %d), over --max-worker-memory, serves on: %s; trying again in %gs",
            slot.worker.pid if slot.worker is not None else "-",
            slot.index,
            why,
            cfg.MEMORY_INTERVAL,
        )
        self.restart = None
        self.recycle_after = self.clock() + cfg.MEMORY_INTERVAL

    def scale(self, count: int) -> None:
        count = max(1, count)
        if count == len(self.slots) or self.state is MasterState.STOPPING:
            return
        if self.upgrade is not None and self.upgrade.state is UpgradeState.STARTING:
            # The new master starts with the slots handed to it: none added or dropped now.
            log.warning(
                "not scaling to %s: an upgrade is in progress", logs.plural(count, "worker")
            )
            return
        log.info("scaling from %d to %s", len(self.slots), logs.plural(count, "worker"))
        while len(self.slots) < count:
            try:
                opened = self.processes.open_slot(len(self.slots))
            except OSError as exc:  # (a port bound by another user: SO_REUSEPORT refuses)
                log.error("cannot add a worker: %s", exc)
                break
            slot = Slot(len(self.slots), opened)
            self.slots.append(slot)
            self.restart_reasons["scale"] += 1
            self.spawn(slot)
        while len(self.slots) > count:
            slot = self.slots.pop()
            self.restart_reasons["scale"] += 1
            slot.retiring = self.clock()
            self.retiring.append(slot)
            self.processes.set_aside(slot)  # (its index may serve a new slot meanwhile)
            if slot.replacement is not None and slot.replacement.state is WorkerState.STARTING:
                self.drain(slot.replacement, 1001, "going away")
        restart = self.restart
        if restart is not None and restart.step is not None and restart.step.slot not in self.slots:
            restart.step = None
            self.advance_restart()

    def look(self, slot: Slot) -> None:
        """A slot scaled away: close it once its accept queue is empty (RETIRE_LIMIT at most)."""
        assert slot.retiring is not None
        now = self.clock()
        queued = self.processes.queued(slot)
        if queued and now < slot.retiring + RETIRE_LIMIT:
            slot.looked = now
            return
        if queued:
            log.warning(
                "slot %d closes with %s still queued after %.1fs (reset)",
                slot.index,
                logs.plural(queued, "connection"),
                RETIRE_LIMIT,
            )
        self.retire(slot)

    def retire(self, slot: Slot) -> None:
        """Close a slot scaled away: its worker drains (1001), a borrower gives it back, and
        its sockets close once they have stopped accepting (reconcile). Closed before, they
        would stay in the kernel's group as the workers' copies, taking connections by the
        hash that nobody might accept, and numbered where the weights no longer say."""
        self.retiring.remove(slot)
        worker = slot.worker
        if worker is not None and worker.state in (WorkerState.STARTING, WorkerState.READY):
            self.drain(worker, 1001, "going away")
        if slot.lent_to is not None:
            self.processes.send(slot.lent_to, {"t": "release", "slot": slot.index})
            slot.releasing, slot.lent_to = slot.lent_to, None
        self.closing.append(slot)

    def held_open(self, slot: Slot) -> bool:
        """Whether a worker may still hold a retired slot's sockets open."""
        borrower = slot.releasing
        if borrower is not None and borrower.listening and borrower.pid in self.workers:
            return True
        return any(w.slot is slot and w.listening for w in self.workers.values())

    def accepting(self, slot: Slot) -> bool:
        """Whether a worker accepts on the slot's sockets: its own, or a borrower."""
        workers = (slot.worker, slot.lent_to)
        return any(w is not None and w.state is WorkerState.READY for w in workers)

    def stop(self, graceful: bool) -> None:
        """Graceful: every worker drains with 1001 (SIGTERM). Else: QUIT now, then SIGKILL.
        A new master still starting (an upgrade) is stopped too, the same way: nothing is
        left behind."""
        first = self.state is not MasterState.STOPPING
        self.stop_serving("shutdown")
        for slot in list(self.retiring):
            self.retire(slot)
        upgrade = self.upgrade
        if upgrade is not None and upgrade.state in (UpgradeState.STARTING, UpgradeState.FAILED):
            if upgrade.state is UpgradeState.STARTING:
                self.upgrade_outcome = UpgradeOutcome("stopped", "shutdown", upgrade.pid)
            self.stop_new_master(signal.SIGTERM if graceful else signal.SIGQUIT)
        for worker in list(self.workers.values()):
            if graceful and worker.state in LIVE:
                self.set_state(worker, WorkerState.DRAINING)
                self.processes.signal(worker.pid, signal.SIGTERM)
            elif not graceful and worker.state is not WorkerState.KILLED:
                self.stop_now(worker, signal.SIGQUIT)
        if first:
            # Nothing may wait in an accept queue that no worker serves: once the workers'
            # copies close (they stop accepting at once), new connections are refused.
            self.close_listeners()

    def hurry(self) -> None:
        """A second TERM/INT while stopping: every worker closes its remaining connections
        at once (a close frame, 1001) and exits once they answer, or HURRY_CLOSE later, and
        is killed if still there after that (hurry_limit). A new master being stopped is
        told the same."""
        now = self.clock()
        upgrade = self.upgrade
        if upgrade is not None and upgrade.state is UpgradeState.FAILED:
            self.processes.signal(upgrade.pid, signal.SIGTERM)  # its second TERM
        for worker in list(self.workers.values()):
            if worker.state in (WorkerState.STOPPING, WorkerState.KILLED):
                continue
            if worker.state is not WorkerState.DRAINING:
                self.set_state(worker, WorkerState.DRAINING)
            if worker.hurried is None:  # a third TERM does not push its kill back
                worker.hurried = now
            if not self.processes.send(worker, {"t": "hurry"}):
                self.stop_now(worker, signal.SIGQUIT)  # no channel: drop its connections

    def stop_serving(self, why: str) -> None:
        """No new worker, no restart from now on."""
        self.state = MasterState.STOPPING
        if self.restart is not None:
            if self.restart.reason == "reload":
                self.restart_ended("stopped", why)
            self.restart = None

    def close_listeners(self) -> None:
        """This master's copies of the sockets (a new master's, after an upgrade, stay)."""
        for slot in self.slots:
            self.processes.close_slot(slot)
        for slot in self.closing:  # (its workers drain as all do: closed now as the others)
            self.processes.close_slot(slot)
        self.closing.clear()
        self.processes.close_shared()

    @property
    def finished(self) -> bool:
        """Stopping, with no worker left, nor a new master of its own to reap."""
        return (
            self.state is MasterState.STOPPING
            and not self.workers
            and (self.upgrade is None or self.handed_over)
        )

    @property
    def handed_over(self) -> bool:
        """An upgrade's new master serves: the sockets' files and the pidfile are its."""
        return self.upgrade is not None and self.upgrade.state is UpgradeState.HANDED_OVER

    # Upgrading wsfleet itself (wsfleet/upgrade.py does the I/O)

    def start_upgrade(self) -> None:
        """SIGUSR2: start a new master from the installed code, handing it the sockets. This
        master serves until the new one is ready (on_new_master_ready), and goes on serving
        if it fails, exits or is not ready within config.upgrade_limit."""
        self.upgrades += 1
        upgrade = self.upgrade
        if upgrade is not None and upgrade.state is UpgradeState.STARTING:
            log.warning("upgrade: new master %d is starting already", upgrade.pid)
            return  # whoever waits gets that one's outcome
        if self.state is not MasterState.RUNNING:
            outcome = UpgradeOutcome("refused", f"the master is {self.state.value}")
        elif upgrade is not None:
            detail = f"the failed new master {upgrade.pid} has not exited yet"
            outcome = UpgradeOutcome("refused", detail)
        else:
            try:
                pid, pipes = self.upgrader.start_master([slot.sockets for slot in self.slots])
            except OSError as exc:
                outcome = UpgradeOutcome("failed", f"cannot start a new master: {exc}")
            else:
                self.upgrade = Upgrade(pid, pipes, self.clock())
                self.upgrade_outcome = UpgradeOutcome("in_progress", None, pid)
                log.info("upgrade: new master %d starting", pid)
                return
        self.upgrade_outcome = outcome
        log.error("upgrade %s: %s", outcome.kind, outcome.detail)

    def on_new_master_ready(self) -> None:
        """The new master's workers all accept: it takes over (the pidfile, systemd's main
        pid), and this master's workers close their connections with 1012, as in a reload:
        all stop accepting first (HELD), so that a client closed by one does not reconnect
        to another old worker; then they drain together (reconcile) and this master exits."""
        upgrade = self.upgrade
        if upgrade is None or upgrade.state is not UpgradeState.STARTING:
            return
        upgrade.state, upgrade.since = UpgradeState.HANDED_OVER, self.clock()
        self.upgrade_outcome = UpgradeOutcome("done", None, upgrade.pid)
        log.info("upgrade: new master %d serves; this master's workers close", upgrade.pid)
        self.upgrader.hand_over(upgrade)
        self.stop_serving("an upgrade")
        for worker in list(self.workers.values()):
            if worker.state is WorkerState.READY:
                self.hold(worker)
            elif worker.state is WorkerState.STARTING:
                self.drain(worker, 1012, "service restart")
        self.close_listeners()

    def on_taken_over(self) -> None:
        """In an upgrade's new master: the old master handed over (or is gone). It started
        as many workers as the old master had; now, as many as its configuration says."""
        self.scale(self.config.workers)

    def on_new_master_failed(self, reason: str) -> None:
        """The new master said why it cannot start (it exits by itself)."""
        upgrade = self.upgrade
        if upgrade is not None and upgrade.state is UpgradeState.STARTING:
            self.upgrade_outcome = UpgradeOutcome("failed", reason, upgrade.pid)
            log.error("upgrade failed: new master %d: %s; serving on", upgrade.pid, reason)
            upgrade.state, upgrade.since = UpgradeState.FAILED, self.clock()

    def on_upgrade_overdue(self, upgrade: Upgrade) -> None:
        limit = cfg.upgrade_limit(self.config)
        detail = f"new master {upgrade.pid} was not ready after {limit:g}s"
        self.upgrade_outcome = UpgradeOutcome("failed", detail, upgrade.pid)
        log.error("upgrade failed: %s: stopping it; serving on", detail)
        self.stop_new_master()

    def stop_new_master(self, sig: signal.Signals = signal.SIGTERM) -> None:
        assert self.upgrade is not None
        self.upgrade.state, self.upgrade.since = UpgradeState.FAILED, self.clock()
        self.processes.signal(self.upgrade.pid, sig)

    def kill_new_master(self, upgrade: Upgrade) -> None:
        log.error("upgrade: new master %d did not exit: killing it", upgrade.pid)
        upgrade.state = UpgradeState.KILLED
        self.processes.signal(upgrade.pid, signal.SIGKILL)

    def on_new_master_exit(self, code: int) -> None:
        upgrade = self.upgrade
        assert upgrade is not None
        how = describe_exit(code)
        if upgrade.state is UpgradeState.HANDED_OVER:
            log.warning("new master %d exited (%s)", upgrade.pid, how)
            return
        if upgrade.state is UpgradeState.STARTING:
            detail = f"new master {upgrade.pid} exited ({how}) before it was ready"
            self.upgrade_outcome = UpgradeOutcome("failed", detail, upgrade.pid)
            log.error("upgrade failed: %s; serving on", detail)
        else:
            log.info("upgrade: the failed new master %d exited (%s)", upgrade.pid, how)
        self.upgrade = None

    def signal_workers(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            self.processes.signal(worker.pid, sig)

    # What the master asks of the fleet

    def worker(self, pid: int) -> Worker | None:
        return self.workers.get(pid)

    def pids(self) -> list[int]:
        """The workers' pids, which the master must reap."""
        return list(self.workers)

    def channels(self) -> list[Any]:
        """Every worker's channel (a new worker closes the others' copies)."""
        return [worker.channel for worker in self.workers.values()]

    def other_slots(self, slot: Slot | None) -> list[Slot]:
        return [
            other for other in (*self.slots, *self.retiring, *self.closing) if other is not slot
        ]

    # Status

    def status(self) -> dict[str, Any]:
        """The fleet's part of the status, as data (the master adds its pid, addresses,
        age, and the outcomes in words)."""
        now = self.clock()
        upgrade = self.upgrade_outcome
        return {
            "master": {
                "state": self.state.value,
                "workers": len(self.slots),
                "restarts": self.restarts,
                "restarts_by_reason": {r: self.restart_reasons[r] for r in RESTART_REASONS},
                "reload": self.reload_status(),
                "upgrades": self.upgrades,
                "upgrade": {
                    "kind": upgrade.kind,
                    "detail": upgrade.detail,
                    "new_master": upgrade.new_master,
                },
                "heartbeat_interval": cfg.heartbeat_interval(self.config),
                "max_worker_memory": self.config.max_worker_memory,
            },
            "empty_slots": [
                {
                    "slot": s.index,
                    "restart_in": round(max(0.0, s.restart_at - now), 1),
                    "crashes": s.crashes,
                }
                for s in self.slots
                if s.state is SlotState.EMPTY
            ],
            "workers": [
                {
                    "slot": w.slot.index,
                    "pid": w.pid,
                    "state": self.shown_state(w),
                    "age": round(now - w.born, 1),
                    "connections": w.connections,
                    "memory": w.memory,  # USS in bytes (--max-worker-memory; null: off)
                    "borrowed_slots": self.borrowed(w),
                }
                for w in sorted(self.workers.values(), key=lambda w: (w.slot.index, w.born))
            ],
        }

    def shown_state(self, worker: Worker) -> str:
        """Its state in the status: "leaving" for a ready worker of a slot scaled away (it
        accepts only what its socket had queued, then drains)."""
        if worker.state is WorkerState.READY and worker.slot in self.retiring:
            return "leaving"
        return worker.state.value


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def backoff(crashes: int) -> float:
    """No delay for a first crash at start; then exponential from BACKOFF_FIRST, capped, with
    jitter so that slots that crash together do not restart in lockstep."""
    if crashes <= 1:
        return 0.0
    delay = min(BACKOFF_FIRST * 2.0 ** (crashes - 2), BACKOFF_MAX)
    return delay * random.uniform(0.75, 1.25)
