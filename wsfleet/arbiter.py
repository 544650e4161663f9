"""The master: owns the listening sockets, forks the workers, and keeps them running.

Two parts, read top to bottom:

- :class:`Fleet` decides. It holds the slots and the workers, each in one named state, and
  reacts to events (a worker's message, a worker's exit, a signal's request, a deadline) by
  changing states and asking its :class:`Processes` to act: fork, signal, send. After every
  event :meth:`Fleet.reconcile` recomputes what follows from the states (which slot's socket
  is lent to whom, whether the fleet is ready), and :meth:`Fleet.deadlines` lists every timer
  there is; nothing else keeps time. Unit tests drive it with a fake :class:`Processes`.
- :class:`Arbiter` does the I/O: it opens the sockets, forks, reaps, reads the channels and the
  status socket, and turns signals (queued through ``signal.set_wakeup_fd``) into events. Each
  event is handled in a guarded step: an error is logged with its traceback and the master
  goes on.

A worker's life: STARTING (forked) -> READY (it accepts) -> DRAINING (asked to stop; killed
if still there after :func:`config.drain_limit`) -> reaped. A rolling restart puts a replaced
worker in HELD first (it stops accepting and keeps its connections) until every slot has its
new worker, or the restart stops: then all HELD workers drain together, and a client closed
by the reload reconnects to a new worker, never to one the same reload closes again. A worker
that stops answering goes to STOPPING (SIGTERM), then KILLED (SIGKILL). A slot's state
follows from its workers: EMPTY (restart due at ``restart_at``), STARTING, SERVING, or
REPLACING during a rolling restart.

Why the master owns the sockets: it opens one SO_REUSEPORT socket per worker slot (per TCP
address, with several --bind) and keeps it for its whole life. The kernel spreads connections
evenly over the slots, and a connection queued on a slot's socket while its worker restarts or
crashes waits for the next worker instead of being reset, as it would be if the socket closed
with its worker. While a slot has no ready worker, its sockets are lent to a ready worker over
the channel (SCM_RIGHTS), so its connections do not wait either. A Unix socket is one for the
fleet, accepted on by every worker: the kernel does not spread AF_UNIX connections over
sockets, so there is nothing per slot to keep or lend. The master never imports the app:
workers do, after fork.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import logging
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from setproctitle import setproctitle

from . import __version__, channel, control, logs, metrics, sockets, upgrade, web
from . import config as cfg

log = logging.getLogger("wsfleet.master")

HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
)
# What a new worker ignores until its event loop installs its own handlers: a log rotation's
# USR1 or a stray HUP must not kill it while it starts; the master's own signals stay ignored.
# (TERM and QUIT keep their default: a worker asked to stop before it serves may just die.)
IGNORED_WHILE_STARTING = (
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
KILL_GRACE = 1.0  # between SIGTERM (or QUIT) and SIGKILL for a worker that must stop now
EXIT_APP = 4


class WorkerState(enum.Enum):
    STARTING = "starting"  # forked; not accepting yet
    READY = "ready"  # accepting on its slot's socket (and on lent ones)
    HOLDING = "holding"  # replaced by a rolling restart: told to stop accepting (not said yet)
    HELD = "held"  # it said it stopped accepting; keeps its connections until the restart
    # ends (then DRAINING), so that no client is closed twice by one reload
    DRAINING = "draining"  # closing its connections; killed at its drain deadline
    STOPPING = "stopping"  # told to stop now (hung: TERM; QUIT); SIGKILL after KILL_GRACE
    KILLED = "killed"  # SIGKILL sent; waiting to be reaped


# Heartbeats expected from these; HOLDING and HELD are the replaced ones a reload keeps.
LIVE = (WorkerState.STARTING, WorkerState.READY, WorkerState.HOLDING, WorkerState.HELD)
KEPT = (WorkerState.HOLDING, WorkerState.HELD)


class SlotState(enum.Enum):
    EMPTY = "empty"  # no worker; one starts at restart_at
    STARTING = "starting"  # its worker is starting
    SERVING = "serving"  # its worker is ready
    REPLACING = "replacing"  # rolling restart: a new worker starts beside the serving one


@dataclass(eq=False)
class Worker:
    """The master's view of one worker process."""

    pid: int
    slot: Slot
    channel: Any  # the Processes' handle for talking to it
    born: float  # monotonic
    born_wall: float
    state: WorkerState = WorkerState.STARTING
    since: float = 0.0  # when it entered its state
    ready_at: float | None = None  # when it became ready, if it did
    last_seen: float = 0.0  # its last message (heartbeats come from its event loop)
    connections: int = 0
    error: str | None = None  # why it could not start, as it said
    details: str = ""  # and the traceback of its app's import, if it raised
    counts_refused: bool = False  # its --metrics counts were malformed (said once)
    # Its drain's deadline: from the configuration it was forked with, the closes' duration
    # it reported (None: the whole drain window), and when it was told to hurry.
    config: cfg.Config | None = None
    paced: float | None = None
    hurried: float | None = None

    def drain_deadline(self) -> float:
        """When a draining worker is killed (see config.drain_limit and hurry_limit)."""
        assert self.config is not None
        deadline = self.since + cfg.drain_limit(self.config, self.paced)
        if self.hurried is not None:
            deadline = min(deadline, self.hurried + cfg.hurry_limit())
        return deadline


@dataclass(eq=False)
class Slot:
    """A listening socket per TCP address, and the workers that serve them."""

    index: int
    sockets: list[Any]  # socket.socket each, or what a fake Processes gives
    worker: Worker | None = None
    replacement: Worker | None = None  # a rolling restart's new worker
    crashes: int = 0  # consecutive exits at start
    restart_at: float = 0.0  # when EMPTY: when its next worker starts
    lent_to: Worker | None = None  # the worker that accepts on these sockets meanwhile

    @property
    def state(self) -> SlotState:
        if self.worker is None:
            return SlotState.EMPTY
        if self.replacement is not None:
            return SlotState.REPLACING
        return SlotState.SERVING if self.worker.state is WorkerState.READY else SlotState.STARTING


class MasterState(enum.Enum):
    BOOTING = "starting"  # until every slot has had a ready worker
    RUNNING = "running"
    STOPPING = "stopping"


class UpgradeState(enum.Enum):
    STARTING = "starting"  # a new master starts beside this one, which serves meanwhile
    FAILED = "failed"  # it failed or was too slow: it stops (TERM); SIGKILL at its deadline
    KILLED = "killed"  # SIGKILL sent; waiting to reap it
    HANDED_OVER = "handed over"  # it serves: this master's workers close, then it exits


@dataclass
class Upgrade:
    """A new master from the installed code (wsfleet/upgrade.py), started by this one."""

    pid: int
    since: float  # when it entered its state
    state: UpgradeState = UpgradeState.STARTING


@dataclass
class RollingRestart:
    """A cursor over the slots: ``todo[0]`` is being restarted by ``step``, if started."""

    todo: list[Slot]
    step: Worker | None = None


@dataclass
class RestartOutcome:
    """How the last rolling restart went, as data (the status's "reload"): ``kind`` none,
    in_progress, done (every slot serves the new code), failed, refused or stopped;
    ``detail`` why it failed, was refused or stopped (by what), or, when done, why the
    configuration file could not be re-read (the old one was kept). ``began``: when it was
    asked for; the workers forked before it run the old code, and the status counts those
    still running (control.reload waits for them)."""

    kind: str = "none"
    detail: str | None = None
    began: float | None = None


class BootError(Exception):
    """No worker could start (the app does not import, say): start gives up.

    ``details`` is the worker's traceback when its app raised at import, else ""."""

    def __init__(self, message: str, status: int, details: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.details = details


def with_details(error: Exception) -> str:
    """An error's line, and its traceback under it when it has one (an app that raised)."""
    details = getattr(error, "details", "")
    return f"{error}\n{details}" if details else str(error)


class Processes(Protocol):
    """What the fleet asks of the outside world; the Arbiter does it, unit tests fake it."""

    def open_slot(self, index: int) -> list[Any]: ...  # new listening sockets; raises OSError
    def close_slot(self, slot: Slot) -> None: ...
    def close_shared(self) -> None: ...  # the fleet's Unix sockets (one for every worker)
    def fork(self, slot: Slot) -> tuple[int, Any]: ...  # (pid, channel); raises OSError
    def signal(self, pid: int, sig: signal.Signals) -> None: ...
    def send(self, worker: Worker, message: channel.Message, fds: Sequence[int] = ()) -> bool: ...
    def all_ready(self) -> None: ...  # the fleet serves: say so (listening line, systemd)
    def start_master(self) -> int: ...  # a new master, handed the sockets; raises OSError
    def hand_over(self, pid: int) -> None: ...  # it serves: the pidfile and systemd are its


class Fleet:
    """The master's decisions: which worker serves which slot, and what happens next."""

    def __init__(
        self, config: cfg.Config, processes: Processes, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.processes = processes
        self.clock = clock
        self.slots: list[Slot] = []
        self.workers: dict[int, Worker] = {}
        self.state = MasterState.BOOTING
        self.restart: RollingRestart | None = None
        self.restarts = 0  # rolling restarts asked for (SIGHUP), so a waiter knows its own
        self.restart_problem: str | None = None
        self.outcome = RestartOutcome()
        # Workers replaced, or started and stopped, by reason (metrics.RESTART_REASONS).
        self.restart_reasons: collections.Counter[str] = collections.Counter()
        self.tally = metrics.Tally()  # the workers' counts (--metrics)
        self.upgrade: Upgrade | None = None
        self.upgrades = 0  # upgrades asked for (SIGUSR2), so a waiter knows its own
        self.last_upgrade = "none yet"

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
            born_wall=time.time(),
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
        elif kind == "held" and worker.state is WorkerState.HOLDING:
            self.set_state(worker, WorkerState.HELD)
        elif kind == "draining":
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
            self.restart_reasons["reload"] += 1
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
        """A child was reaped with this exit code (negative: killed by that signal)."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            if self.upgrade is not None and self.upgrade.pid == pid:
                self.on_new_master_exit(code)
            return
        self.tally.exited(pid)
        slot, now = worker.slot, self.clock()
        if worker.state in LIVE and self.state is not MasterState.STOPPING:
            self.restart_reasons["crash"] += 1  # it left unasked
        how = describe_exit(code)
        reason = f": {worker.error}" if worker.error else ""
        details = f"\n{worker.details}" if worker.details else ""  # its traceback, in the log
        if worker.ready_at is not None and now - worker.ready_at >= self.config.start_seconds:
            slot.crashes = 0  # it served: whatever ends it, the next crash is a first one
        for other in self.slots:
            if other.lent_to is worker:
                other.lent_to = None
        if slot.replacement is worker:
            slot.replacement = None
        was_serving = slot.worker is worker
        if was_serving:
            slot.worker = None
        if self.restart is not None and self.restart.step is worker:
            log.error(
                "rolling restart stopped: the new worker %d for slot %d exited before it was "
                "ready (%s)%s; the old worker keeps serving%s",
                pid,
                slot.index,
                how,
                reason,
                details,
            )
            self.restart = None
            why = f"worker {pid} for slot {slot.index} exited ({how}){reason}"
            self.restart_ended("failed", why)
        if worker.state is WorkerState.DRAINING or self.state is MasterState.STOPPING:
            log.info("worker %d (slot %d) exited (%s)", pid, slot.index, how)
            return
        if worker.state in KEPT:  # its slot has its new worker already
            log.error(
                "worker %d (slot %d), held by the rolling restart, died (%s)", pid, slot.index, how
            )
            return
        if self.state is MasterState.BOOTING and worker.ready_at is None:
            status = EXIT_APP if code == EXIT_APP else 1
            message = f"worker {pid} could not start ({how}){reason}"
            raise BootError(message, status, worker.details)
        if not was_serving or slot not in self.slots:
            return  # a replacement, or a slot scaled away
        # Crashing at start: never ready, or dead within --start-seconds of it. Only a run of
        # those backs off; a worker that served longer is replaced at once.
        crashing = worker.ready_at is None or now - worker.ready_at < self.config.start_seconds
        if crashing:
            slot.crashes += 1
        delay = backoff(slot.crashes) if crashing else 0.0
        if slot.crashes > 1:
            details = ""  # the first of the run showed it
        if delay:
            log.error(
                "worker %d (slot %d) died (%s) at start%s; %s in a row: restarting in %.1fs%s",
                pid,
                slot.index,
                how,
                reason,
                logs.plural(slot.crashes, "time"),
                delay,
                details,
            )
        else:
            log.error(
                "worker %d (slot %d) died (%s)%s: replacing it%s",
                pid,
                slot.index,
                how,
                reason,
                details,
            )
        slot.restart_at = now + delay

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
            self.outcome = RestartOutcome("refused", "the master is stopping", self.clock())
            return
        self.config = config
        log.info("rolling restart of %s", logs.plural(len(self.slots), "worker"))
        self.outcome = RestartOutcome("in_progress", None, self.clock())
        if self.restart is None:
            self.restart = RollingRestart(list(self.slots))
            self.advance_restart()
        else:  # again from the start, the slot in progress first
            current = self.restart.todo[:1]
            self.restart.todo = current + [s for s in self.slots if s not in current]

    def advance_restart(self) -> None:
        """Start the next slot's new worker; on_ready drains the old one and comes back."""
        restart = self.restart
        assert restart is not None
        while restart.todo and restart.todo[0] not in self.slots:
            restart.todo.pop(0)  # scaled away meanwhile
        if not restart.todo:
            log.info("rolling restart done")
            self.restart = None
            self.restart_ended("done", self.restart_problem)
            self.scale(self.config.workers)
            return
        slot = restart.todo[0]
        restart.step = self.spawn(slot, replacement=slot.worker is not None)
        if restart.step is None:
            log.error("rolling restart stopped: no worker could be started for slot %d", slot.index)
            self.restart = None
            self.restart_ended("failed", f"cannot start slot {slot.index}")

    def restart_ended(self, kind: str, detail: str | None) -> None:
        self.outcome = RestartOutcome(kind, detail, self.outcome.began)

    @property
    def last_restart(self) -> str:
        """The outcome in words, as `wsfleet status` shows it."""
        return control.outcome_text({"kind": self.outcome.kind, "detail": self.outcome.detail})

    def reload_status(self) -> dict[str, Any]:
        """The outcome as data, with the old workers (forked before that reload was asked
        for) still running and their connections: "done" and none left is a reload over."""
        began = self.outcome.began
        old = [w for w in self.workers.values() if began is not None and w.born < began]
        return {
            "kind": self.outcome.kind,
            "detail": self.outcome.detail,
            "old_workers": len(old),
            "old_connections": sum(w.connections for w in old),
        }

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
            for worker in (slot.worker, slot.replacement):
                if worker is not None and worker.state in (WorkerState.STARTING, WorkerState.READY):
                    self.drain(worker, 1001, "going away")
            if slot.lent_to is not None:
                self.processes.send(slot.lent_to, {"t": "release", "slot": slot.index})
                slot.lent_to = None
            self.processes.close_slot(slot)
        restart = self.restart
        if restart is not None and restart.step is not None and restart.step.slot not in self.slots:
            restart.step = None
            self.advance_restart()

    def stop(self, graceful: bool) -> None:
        """Graceful: every worker drains with 1001 (SIGTERM). Else: QUIT now, then SIGKILL.
        A new master still starting (an upgrade) is stopped too, the same way: nothing is
        left behind."""
        first = self.state is not MasterState.STOPPING
        self.stop_serving("shutdown")
        upgrade = self.upgrade
        if upgrade is not None and upgrade.state in (UpgradeState.STARTING, UpgradeState.FAILED):
            if upgrade.state is UpgradeState.STARTING:
                self.last_upgrade = "stopped by shutdown"
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
            worker.hurried = now
            if not self.processes.send(worker, {"t": "hurry"}):
                self.stop_now(worker, signal.SIGQUIT)  # no channel: drop its connections

    def stop_serving(self, why: str) -> None:
        """No new worker, no restart from now on."""
        self.state = MasterState.STOPPING
        if self.restart is not None:
            self.restart = None
            self.restart_ended("stopped", why)

    def close_listeners(self) -> None:
        """This master's copies of the sockets (a new master's, after an upgrade, stay)."""
        for slot in self.slots:
            self.processes.close_slot(slot)
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
            self.last_upgrade = f"refused: the master is {self.state.value}"
        elif upgrade is not None:
            self.last_upgrade = f"refused: the failed new master {upgrade.pid} has not exited yet"
        else:
            try:
                pid = self.processes.start_master()
            except OSError as exc:
                self.last_upgrade = f"failed: cannot start a new master: {exc}"
            else:
                self.upgrade = Upgrade(pid, self.clock())
                self.last_upgrade = "in progress"
                log.info("upgrade: new master %d starting", pid)
                return
        log.error("upgrade %s", self.last_upgrade)

    def on_new_master_ready(self) -> None:
        """The new master's workers all accept: it takes over (the pidfile, systemd's main
        pid), and this master's workers close their connections with 1012, as in a reload:
        all stop accepting first (HELD), so that a client closed by one does not reconnect
        to another old worker; then they drain together (reconcile) and this master exits."""
        upgrade = self.upgrade
        if upgrade is None or upgrade.state is not UpgradeState.STARTING:
            return
        upgrade.state, upgrade.since = UpgradeState.HANDED_OVER, self.clock()
        self.last_upgrade = f"done: master {upgrade.pid} serves"
        log.info("upgrade: new master %d serves; this master's workers close", upgrade.pid)
        self.processes.hand_over(upgrade.pid)
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
            self.last_upgrade = f"failed: {reason}"
            log.error("upgrade failed: new master %d: %s; serving on", upgrade.pid, reason)
            upgrade.state, upgrade.since = UpgradeState.FAILED, self.clock()

    def on_upgrade_overdue(self, upgrade: Upgrade) -> None:
        limit = cfg.upgrade_limit(self.config)
        self.last_upgrade = f"failed: new master {upgrade.pid} was not ready after {limit:g}s"
        log.error("upgrade %s: stopping it; serving on", self.last_upgrade)
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
            self.last_upgrade = (
                f"failed: new master {upgrade.pid} exited ({how}) before it was ready"
            )
            log.error("upgrade %s; serving on", self.last_upgrade)
        else:
            log.info("upgrade: the failed new master %d exited (%s)", upgrade.pid, how)
        self.upgrade = None

    def signal_workers(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            self.processes.signal(worker.pid, sig)

    # Status

    def status(self) -> dict[str, Any]:
        now_wall = time.time()
        return {
            "master": {
                "pid": os.getpid(),
                "state": self.state.value,
                "addresses": [],
                "workers": len(self.slots),
                "restarts": self.restarts,
                "restarts_by_reason": {r: self.restart_reasons[r] for r in metrics.RESTART_REASONS},
                "last_restart": self.last_restart,  # in words; "reload" as data
                "reload": self.reload_status(),
                "upgrades": self.upgrades,
                "last_upgrade": self.last_upgrade,
                "heartbeat_interval": cfg.heartbeat_interval(self.config),
            },
            "empty_slots": [
                {
                    "slot": s.index,
                    "restart_in": round(max(0.0, s.restart_at - self.clock()), 1),
                    "crashes": s.crashes,
                }
                for s in self.slots
                if s.state is SlotState.EMPTY
            ],
            "workers": [
                {
                    "slot": w.slot.index,
                    "pid": w.pid,
                    "state": w.state.value,
                    "age": round(now_wall - w.born_wall, 1),
                    "connections": w.connections,
                    "borrowed_slots": self.borrowed(w),
                }
                for w in sorted(self.workers.values(), key=lambda w: (w.slot.index, w.born))
            ],
        }


def describe_exit(code: int) -> str:
    """'exit status N' or 'signal NAME' (or 'signal N' for one Python has no name for)."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def backoff(crashes: int) -> float:
    """No delay for a first crash at start; then exponential from BACKOFF_FIRST, capped, with
    jitter so that slots that crash together do not restart in lockstep."""
    if crashes <= 1:
        return 0.0
    delay = min(BACKOFF_FIRST * 2 ** (crashes - 2), BACKOFF_MAX)
    return delay * random.uniform(0.75, 1.25)


@dataclass
class NewMaster:
    """The old master's pipes with an upgrade's new master (wsfleet/upgrade.py)."""

    pid: int
    says: int | None  # read end: "listening on ..." once ready, or "failed N reason"
    handed: int | None  # write end: "ok" once this master hands over
    said: bytes = b""


class Arbiter:
    """The master process: the fleet's I/O, driven from one selector loop."""

    def __init__(
        self,
        config: cfg.Config,
        reload_config: Callable[[], cfg.Config] | None = None,
        handler: Any = None,
    ) -> None:
        self.config = config
        self.reload_config = reload_config
        self.handler = handler  # an app object given to wsfleet.run(); else workers import
        self.fleet = Fleet(config, self)
        self.selector = selectors.DefaultSelector()
        # Every address in its order, as bound (a port 0 became the kernel's choice) or as
        # inherited; those with a socket per slot; the sockets every worker accepts on.
        self.listening: list[cfg.Address] = []
        self.per_slot: list[cfg.Address] = []
        self.shared: list[sockets.SharedListener] = []
        # Loaded here, inherited by every worker forked after: a reload whose certificate
        # files do not load keeps serving the ones that did.
        self.tls = sockets.server_context(config)
        self.started = time.time()
        self.status_server: socket.socket | None = None
        self.web: web.WebServer | None = None  # --metrics
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=40)
        self.events_handler: logging.Handler | None = None
        # What systemd was last told (sd_notify), so that each change is said once.
        self.told: dict[str, object] = {"reloading": False, "stopping": False, "status": ""}
        self.watchdog = control.watchdog_interval()
        self.watchdog_due = time.monotonic()
        self.pidfile: control.Pidfile | None = None
        self.handoff: upgrade.Handoff | None = None  # this master is an upgrade's new one
        self.new_master: NewMaster | None = None  # an upgrade's new master, started by this one
        self.metrics_url: str | None = None
        self._wake_r, self._wake_w = os.pipe()

    # Start-up and the main loop

    def run(self) -> int:
        """Serve until stopped; return the exit status. Raises BootError if no worker starts,
        sockets.AddressInUse or control.ControlError if the master cannot start."""
        try:
            self.handoff = handoff = upgrade.take_over()
            if handoff is not None:  # the lock comes with the descriptor; the file, once handed
                control.set_ready_fd(handoff.ready_fd)
                if handoff.pidfile is not None and handoff.pidfile_fd is not None:
                    self.pidfile = control.Pidfile(handoff.pidfile, handoff.pidfile_fd)
            elif self.config.pidfile:
                self.pidfile = control.Pidfile(self.config.pidfile)
            slots = self.open_listeners(handoff)
            while len(slots) < self.config.workers and handoff is None:
                slots.append(self.open_slot(len(slots)))
            setproctitle(f"wsfleet: master [{', '.join(map(str, self.listening))}]")
            # Handlers before the first fork: a signal between fork and set-up would orphan.
            self.install_signals()
            self.status_server = control.listen_status(os.getpid())
            if self.status_server is not None:
                self.selector.register(self.status_server, selectors.EVENT_READ, "status")
            if handoff is not None and handoff.handed_fd is not None:
                self.selector.register(handoff.handed_fd, selectors.EVENT_READ, "old master")
            if handoff is not None and not self.config.metrics and handoff.metrics is not None:
                handoff.metrics.close()
                handoff.metrics = None
            if self.config.metrics and (handoff is None or handoff.metrics is None):
                self.open_web(self.bind_web(self.config.metrics))
            # (A handed-over port is served once the old master has handed over: take_over.)
            self.events_handler = _Events(self.events)
            log.addHandler(self.events_handler)
            log.info(
                "master %d (wsfleet %s) starting %s on %s (app %s)%s",
                os.getpid(),
                __version__,
                logs.plural(len(slots), "worker"),
                ", ".join(self.urls()),
                self.config.app,
                f", taking over from master {handoff.old_pid}" if handoff is not None else "",
            )
            preload(self.config)
            self.fleet.start(slots, reason="upgrade" if handoff is not None else None)
            self.fleet.reconcile()
            while not self.fleet.finished:
                self.loop_once()
        except BootError as exc:
            if self.config.log_file:  # the log is a file: it says why too (else: the caller)
                log.error("cannot start: %s", with_details(exc))
            self.stop_workers_and_wait()
            raise
        finally:
            self.cleanup()
        return 0

    def open_listeners(self, handoff: upgrade.Handoff | None) -> list[list[socket.socket]]:
        """The sockets handed over by an old master, else those systemd passed, else bind
        every address. Returns the slots' sockets: every slot's when inherited, the first
        slot's when bound here (open_slot opens the others)."""
        if handoff is not None:
            self.listening = [cfg.parse_address(a) for a in handoff.listening]
            self.per_slot = [cfg.parse_address(a) for a in handoff.per_slot]
            self.shared = handoff.shared
            return handoff.slots
        activated = sockets.listen_fds()
        if activated:
            return self.adopt(activated)
        return [self.bind_listeners()]

    def adopt(self, activated: list[socket.socket]) -> list[list[socket.socket]]:
        """Socket activation: as many sockets on one address as workers are one per slot
        (systemd's ReusePort=yes: the kernel spreads connections over them, as over the
        sockets wsfleet binds); otherwise every worker accepts on each one."""
        if self.config.bind:
            log.warning(
                "--bind ignored: serving the %s systemd passed",
                logs.plural(len(activated), "socket"),
            )
        self.listening = list(dict.fromkeys(map(sockets.address_of, activated)))
        if len(activated) == self.config.workers > 1 and len(self.listening) == 1:
            self.per_slot = self.listening[:]
            return [[sock] for sock in activated]
        self.shared = [sockets.SharedListener(sock) for sock in activated]
        return [[]]

    def bind_listeners(self) -> list[socket.socket]:
        """Bind every address: the first slot's TCP sockets, refused if anything listens
        there already, and the fleet's Unix sockets. Returns the first slot's sockets."""
        first: list[socket.socket] = []
        owner = None
        if self.config.user or self.config.group:
            from .worker import identity

            owner = identity(self.config)  # the Unix sockets belong to the workers' identity
        try:
            for address in cfg.addresses(self.config):
                if address.path is not None:
                    self.shared.append(
                        sockets.bind_unix(
                            address.path, self.config.backlog, self.config.umask, owner
                        )
                    )
                    self.listening.append(address)
                    continue
                sock = sockets.bind_exclusive(address, self.config.backlog)
                first.append(sock)
                self.listening.append(sockets.address_of(sock))
                self.per_slot.append(self.listening[-1])
        except BaseException:
            for sock in first:
                sock.close()
            raise
        return first

    def bind_web(self, address: str) -> socket.socket:
        return sockets.bind_plain(cfg.parse_address(address), 64)

    def open_web(self, sock: socket.socket) -> None:
        """--metrics: the HTTP port, served from this loop (wsfleet/web.py says why)."""
        collector = metrics.FleetCollector(self.fleet, self.fleet.tally)
        routes: dict[str, web.Route] = {
            "/metrics": lambda: metrics.exposition(collector),
            "/status.json": lambda: web.as_json(self.status()),
            "/": web.status_page,
        }
        self.web = web.WebServer(sock, routes, self.selector)
        self.metrics_url = f"http://{sockets.sock_address(sock)}/"
        log.info("metrics and status page on %s", self.metrics_url)

    def urls(self) -> list[str]:
        return [cfg.url(self.config, str(address)) for address in self.listening]

    def install_signals(self) -> None:
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _no_op)  # the wake-up fd carries the signal number
        self.selector.register(self._wake_r, selectors.EVENT_READ, "signals")

    def loop_once(self) -> None:
        deadlines = [self.fleet.next_deadline(), self.web and self.web.next_deadline()]
        if self.watchdog is not None:
            deadlines.append(self.watchdog_due)
        deadline = min((d for d in deadlines if d is not None), default=None)
        timeout = 1.0 if deadline is None else min(max(0.0, deadline - time.monotonic()), 1.0)
        for key, _ in self.selector.select(timeout):
            if isinstance(key.data, web.WebServer):
                self.guarded("the metrics port", functools.partial(key.data.on_ready, key.fileobj))
            elif key.data == "signals":
                self.guarded("signals", self.on_signals)
            elif key.data == "status":
                self.guarded("a status request", self.on_status_request)
            elif key.data == "new master":
                self.guarded("the new master's word", self.read_new_master)
            elif key.data == "old master":
                self.guarded("the old master's word", self.on_old_master_says)
            elif (worker := self.fleet.workers.get(key.data)) is not None:
                self.guarded(
                    f"worker {worker.pid}'s messages", lambda w=worker: self.on_messages(w)
                )
        if self.web is not None:
            self.guarded("the metrics port's deadlines", self.web.expire)
        self.guarded("deadlines", self.fleet.on_time)
        self.guarded("reconciling", self.fleet.reconcile)
        self.guarded("telling systemd", self.tell_systemd)

    def tell_systemd(self) -> None:
        """sd_notify what changed: RELOADING=1 when a rolling restart begins and READY=1 when
        it ends (Type=notify-reload), STOPPING=1 once, STATUS= when it changes, and WATCHDOG=1
        every half WATCHDOG_USEC while this loop runs (WatchdogSec=)."""
        if "NOTIFY_SOCKET" not in os.environ or self.fleet.handed_over:
            return  # (after an upgrade, systemd watches the new master)
        fleet, lines = self.fleet, []
        if self.watchdog is not None and time.monotonic() >= self.watchdog_due:
            lines.append("WATCHDOG=1")
            self.watchdog_due = time.monotonic() + self.watchdog
        stopping = fleet.state is MasterState.STOPPING
        if stopping and not self.told["stopping"]:
            lines.append("STOPPING=1")
        reloading = fleet.restart is not None and not stopping
        if reloading != self.told["reloading"] and fleet.state is not MasterState.BOOTING:
            if reloading:
                usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                lines += ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
            elif not stopping:
                lines.append("READY=1")
        ready = sum(w.state is WorkerState.READY for w in fleet.workers.values())
        status = (
            f"{ready}/{logs.plural(len(fleet.slots), 'worker')} ready, "
            f"{logs.plural(sum(w.connections for w in fleet.workers.values()), 'connection')}"
            + (", reloading" if reloading else "")
        )
        if status != self.told["status"]:
            lines.append(f"STATUS={status}")
        self.told.update(reloading=reloading, stopping=stopping, status=status)
        if lines:
            control.sd_notify("\n".join(lines))

    def guarded(self, what: str, step: Callable[[], None]) -> None:
        """Run one event's handling; an error is logged, and the master goes on."""
        try:
            step()
        except BootError:
            raise
        except Exception:
            log.exception("error while handling %s; the master goes on", what)

    # Events

    def on_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            self.guarded(signal.Signals(signum).name, lambda s=signum: self.on_signal(s))

    def on_signal(self, signum: int) -> None:
        sig = signal.Signals(signum)
        fleet = self.fleet
        if sig == signal.SIGCHLD:
            self.reap()
        elif sig in (signal.SIGTERM, signal.SIGINT):
            if fleet.state is MasterState.STOPPING:
                log.warning("received %s again: closing every connection now", sig.name)
                fleet.hurry()
            else:
                log.info("received %s: graceful shutdown", sig.name)
                fleet.stop(graceful=True)
        elif sig == signal.SIGQUIT:
            log.info("received SIGQUIT: immediate shutdown")
            fleet.stop(graceful=False)
        elif sig == signal.SIGHUP:
            log.info("received SIGHUP")
            fleet.start_restart(*self.reread_config())
        elif sig == signal.SIGTTIN:
            fleet.scale(len(fleet.slots) + 1)
        elif sig == signal.SIGTTOU:
            fleet.scale(len(fleet.slots) - 1)
        elif sig == signal.SIGUSR1:
            logs.reopen()
            fleet.signal_workers(signal.SIGUSR1)
        elif sig == signal.SIGUSR2:
            log.info("received SIGUSR2: upgrade")
            fleet.start_upgrade()

    def reread_config(self) -> tuple[cfg.Config, str | None]:
        """The configuration for a rolling restart, and why it is the old one, if it is."""
        if self.reload_config is None:
            return self.fleet.config, None
        try:
            new = self.reload_config()
        except cfg.ConfigError as exc:
            log.error("reload: configuration not reloaded: %s", exc)
            return self.fleet.config, str(exc)
        try:
            tls = sockets.server_context(new)  # rotated certificate files must load
        except ValueError as exc:
            log.error("reload: configuration not reloaded: %s", exc)
            return self.fleet.config, str(exc)
        self.tls = tls
        for name in cfg.RELOAD_IGNORES:
            if getattr(new, name) != getattr(self.fleet.config, name):
                log.warning("reload: a change of %s needs a full restart; ignored", name)
                new = cfg.dataclasses.replace(new, **{name: getattr(self.fleet.config, name)})
        return new, None

    def on_messages(self, worker: Worker) -> None:
        while True:
            try:
                message, fds = channel.receive(worker.channel)
            except BlockingIOError:
                return
            for fd in fds:
                os.close(fd)
            if message is None:  # the worker is exiting; SIGCHLD follows
                with contextlib.suppress(KeyError, ValueError):  # (reap() reads it last too)
                    self.selector.unregister(worker.channel)
                return
            try:
                self.fleet.on_message(worker, channel.validate(message))
            except channel.BadMessage as exc:
                log.warning("worker %d sent a malformed message (ignored): %s", worker.pid, exc)

    def on_status_request(self) -> None:
        assert self.status_server is not None
        try:
            conn, _ = self.status_server.accept()
        except BlockingIOError:
            return
        with conn:
            if not control.peer_allowed(conn):
                log.warning("status request from a process of another user refused")
                return
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.sendall(control.encode_status(self.status()))

    def reap(self) -> None:
        """Collect every child that exited, as soon as SIGCHLD says so."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.fleet.workers.get(pid)
            if self.new_master is not None and self.new_master.pid == pid:
                # What it said (why it failed) comes before its exit; a "ready" from a dead
                # master is not taken.
                self.guarded("the new master's word", lambda: self.read_new_master(exited=True))
            if worker is not None:
                # What it said last (its final counts, say) may still wait in the channel.
                self.guarded(f"worker {pid}'s messages", lambda w=worker: self.on_messages(w))
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(worker.channel)
                worker.channel.close()
            code = os.waitstatus_to_exitcode(status)
            self.guarded(f"worker {pid}'s exit", functools.partial(self.fleet.on_exit, pid, code))
            if self.new_master is not None and self.new_master.pid == pid:
                self.close_new_master()

    # The Processes the fleet uses

    def open_slot(self, index: int) -> list[socket.socket]:
        opened: list[socket.socket] = []
        try:
            for address in self.per_slot:
                opened.append(sockets.bind(address, self.config.backlog))
        except BaseException:
            for sock in opened:
                sock.close()
            raise
        return opened

    def close_slot(self, slot: Slot) -> None:
        for sock in slot.sockets:
            sock.close()

    def close_shared(self) -> None:
        for listener in self.shared:
            listener.sock.close()  # the file stays until the master exits

    def fork(self, slot: Slot) -> tuple[int, socket.socket]:
        master_end, worker_end = channel.pair()
        # No signal may be handled in the child by the master's handlers: block them across
        # fork; the child resets their dispositions before unblocking.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            master_end.close()
            worker_end.close()
            raise
        if pid == 0:  # the child never returns from here
            status = 1
            try:
                self.become_child(slot, master_end)
                status = self.run_worker(slot, worker_end)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        worker_end.close()
        self.selector.register(master_end, selectors.EVENT_READ, pid)
        return pid, master_end

    def signal(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def send(self, worker: Worker, message: channel.Message, fds: Sequence[int] = ()) -> bool:
        return channel.send(worker.channel, message, fds)

    def all_ready(self) -> None:
        for url in self.urls():
            print(control.ready_line(url), file=sys.stderr, flush=True)
        control.notify_ready(self.urls())  # (an upgrade's new master: to the old master)

    # Upgrading: the old master's side

    def start_master(self) -> int:
        """Start a new master from the installed code, handing it every socket, the pidfile
        and two pipes: one it says on when it is ready (or why it failed), one this master
        says on that it handed over (wsfleet/upgrade.py)."""
        says_r, says_w = os.pipe()
        handed_r, handed_w = os.pipe()
        pidfile = self.pidfile
        handoff = upgrade.Handoff(
            old_pid=os.getpid(),
            listening=[str(a) for a in self.listening],
            per_slot=[str(a) for a in self.per_slot],
            slots=[slot.sockets for slot in self.fleet.slots],
            shared=self.shared,
            metrics=self.web.sock if self.web is not None else None,
            pidfile=pidfile.path if pidfile is not None else None,
            pidfile_fd=pidfile.fd if pidfile is not None else None,
            ready_fd=says_w,
            handed_fd=handed_r,
        )
        try:
            pid = upgrade.start(handoff, HANDLED_SIGNALS)
        except BaseException:
            os.close(says_r)
            os.close(handed_w)
            raise
        finally:
            os.close(says_w)
            os.close(handed_r)
        os.set_blocking(says_r, False)
        self.new_master = NewMaster(pid, says_r, handed_w)
        self.selector.register(says_r, selectors.EVENT_READ, "new master")
        return pid

    def read_new_master(self, exited: bool = False) -> None:
        """Read what the new master says; at the end of it (it closes the pipe once ready,
        or when it fails) tell the fleet. Said nothing: its exit tells why. Called with
        exited when it was reaped: a "ready" it said before dying is not taken."""
        new = self.new_master
        if new is None or new.says is None:
            return
        while True:
            try:
                data = os.read(new.says, 4096)
            except BlockingIOError:
                return
            if not data:
                break
            new.said += data
        self.selector.unregister(new.says)
        os.close(new.says)
        new.says = None
        line = new.said.decode(errors="replace").partition("\n")[0]
        # Not reaped yet is not alive: it could have died right after saying it was ready.
        dead = exited or os.waitid(os.P_PID, new.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if control.LISTENING.match(line) and not dead:
            self.fleet.on_new_master_ready()
        elif failed := control.FAILED.match(line):
            self.fleet.on_new_master_failed(failed.group(2))

    def hand_over(self, pid: int) -> None:
        """The new master serves: write its pid in the pidfile (it holds the lock too, by
        the same open file) and let go of the file; tell the new master (which then counts
        the pidfile and the Unix sockets' files as its own, to remove at exit) and systemd
        (NotifyAccess=main listens to this master until told MAINPID=). The --metrics port
        stops taking requests here; those in progress are answered."""
        if self.pidfile is not None:
            self.pidfile.claim(pid)
            self.pidfile.release()
            self.pidfile = None
        new = self.new_master
        if new is not None and new.handed is not None:
            with contextlib.suppress(OSError):
                os.write(new.handed, b"ok\n")
            os.close(new.handed)
            new.handed = None
        control.sd_notify(f"MAINPID={pid}")
        if self.web is not None:
            self.web.stop_listening()

    def upgrade_fds(self) -> list[int]:
        """The descriptors of an upgrade in progress, which a forked worker must not keep
        (a pipe's end held by a worker would hide its closing)."""
        fds = []
        if self.new_master is not None:
            fds += [fd for fd in (self.new_master.says, self.new_master.handed) if fd is not None]
        if self.handoff is not None:
            fds += [self.handoff.handed_fd] if self.handoff.handed_fd is not None else []
            fds += [self.handoff.metrics.fileno()] if self.handoff.metrics is not None else []
        return fds

    def close_new_master(self) -> None:
        """The new master is gone (or this one exits): close what is left of the pipes."""
        new, self.new_master = self.new_master, None
        if new is not None:
            if new.says is not None:
                self.selector.unregister(new.says)
                os.close(new.says)
            if new.handed is not None:
                os.close(new.handed)

    # Upgrading: the new master's side

    def on_old_master_says(self) -> None:
        """The old master handed over ("ok"), or it closed the pipe without a word: it gave
        up on this master (which it is stopping), or it died (this master is the only one
        left: it takes over)."""
        handoff = self.handoff
        assert handoff is not None and handoff.handed_fd is not None
        try:
            data = os.read(handoff.handed_fd, 16)
        except BlockingIOError:
            return
        self.selector.unregister(handoff.handed_fd)
        os.close(handoff.handed_fd)
        handoff.handed_fd = None
        if data.startswith(b"ok") or not control.is_master(handoff.old_pid):
            self.take_over()

    def take_over(self) -> None:
        """This master is the fleet's now: the pidfile names it, the Unix sockets' files are
        its to remove at exit, it serves the --metrics port, and it runs as many workers as
        its configuration says (it started as many as the old master had)."""
        assert self.handoff is not None
        log.info("took over from master %d", self.handoff.old_pid)
        if self.pidfile is not None:
            self.pidfile.claim()
        upgrade.take_files(self.handoff)
        if self.handoff.metrics is not None:
            self.open_web(self.handoff.metrics)
            self.handoff.metrics = None
        self.fleet.on_taken_over()

    # Inside a new worker

    def become_child(self, slot: Slot, master_end: socket.socket) -> None:
        """In a new worker: drop the master's signal set-up and every descriptor it does not
        need, so that only the master holds channels (whose closing tells a worker the
        master died) and each worker holds only its own slot's sockets (and the shared)."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN if sig in IGNORED_WHILE_STARTING else signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the master decides
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        master_end.close()
        for worker in self.fleet.workers.values():
            worker.channel.close()
        for other in self.fleet.slots:
            if other is not slot:
                self.close_slot(other)
        if self.status_server is not None:
            self.status_server.close()
        if self.web is not None:
            self.web.close_in_child()
        if self.pidfile is not None:
            self.pidfile.close_in_child()
        for fd in self.upgrade_fds():
            os.close(fd)
        control.set_ready_fd(None)

    def run_worker(self, slot: Slot, worker_end: socket.socket) -> int:
        from . import worker

        setproctitle(f"wsfleet: worker {slot.index} [{', '.join(map(str, self.listening))}]")
        worker.drop_privileges(self.fleet.config)  # its socket is bound; the app comes next
        try:
            handler = self.handler or worker.load_app(self.fleet.config.app)
        except worker.AppError as exc:
            # The master logs it (or, at start, says it in start's message): once, however
            # many workers fail alike. Alone with no master to tell, say it here.
            if not channel.send(worker_end, channel.error(str(exc), exc.details)):
                logging.getLogger("wsfleet.worker").error("%s", with_details(exc))
            return EXIT_APP
        config = self.fleet.config
        listening = [*slot.sockets, *(listener.sock for listener in self.shared)]
        serving = worker.Worker(config, listening, handler, worker_end, self.tls)
        return worker.run(config, serving.run())

    # Shutting down

    def stop_workers_and_wait(self) -> None:
        """Start-up failed: the workers that did start drain, and are waited for."""
        self.fleet.stop(graceful=True)
        deadline = time.monotonic() + cfg.drain_limit(self.fleet.config)
        for pid in list(self.fleet.workers):
            if not control.wait_exit(pid, deadline - time.monotonic()):
                self.signal(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.fleet.workers.clear()

    def cleanup(self) -> None:
        """Leave: on an error path, workers still running see their channels close and drain
        with 1001 by themselves, as when the master is killed; nothing kills them here."""
        for slot in self.fleet.slots:
            self.close_slot(slot)
        for listener in self.shared:
            listener.close(remove=not self.fleet.handed_over)  # the new master's now
        upgrade_ = self.fleet.upgrade
        if upgrade_ is not None and upgrade_.state is UpgradeState.STARTING:
            self.signal(upgrade_.pid, signal.SIGTERM)  # an error path: leave no new master
        self.close_new_master()
        if self.status_server is not None:
            self.status_server.close()
        if self.web is not None:
            self.web.close()
        if self.events_handler is not None:
            log.removeHandler(self.events_handler)
        if self.pidfile is not None:
            self.pidfile.remove()
        signal.set_wakeup_fd(-1)
        log.info("master %d exiting", os.getpid())

    # Status

    def status(self) -> dict[str, Any]:
        status = self.fleet.status()
        status["master"]["age"] = round(time.time() - self.started, 1)
        status["master"]["version"] = __version__
        status["master"]["addresses"] = self.urls()
        log_file = self.config.log_file
        status["master"]["log_file"] = os.path.abspath(log_file) if log_file else None
        if self.metrics_url is not None:
            status["master"]["metrics"] = self.metrics_url
        status["events"] = list(self.events)
        return status


def preload(config: cfg.Config) -> None:
    """Import in the master what every worker imports anyway: websockets and the event loop,
    never the app. Forked workers then share those pages with the master instead of each
    loading its own copy (docs/restart.md measures it). A rolling restart re-imports the app
    only: a new version of websockets or uvloop needs a restart of the master."""
    from . import worker  # noqa: F401  (websockets' server, the connection class)

    if cfg.uses_uvloop(config):
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: F401


class _Events(logging.Handler):
    """The master's log lines, kept for the status page's "recent events"."""

    def __init__(self, events: collections.deque[dict[str, Any]]) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            self.events.append(
                {"at": record.created, "level": record.levelname.lower(), "message": message}
            )


def _no_op(signum: int, frame: object) -> None:
    """The wake-up fd carries the signal to the main loop; nothing happens here."""
