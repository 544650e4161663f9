"""The master's records: a worker, a slot, a new master, their states, and the outcomes of
reloads and upgrades as data; and the two ports through which the fleet's decisions
(wsfleet/fleet.py) act on the world, :class:`Processes` and :class:`Upgrades`.

Kept apart from the decisions so that the process layer (wsfleet/processes.py), the upgrade
(wsfleet/upgrade.py) and the master's loop read and fill the same records without importing
the decisions, and a reader finds each fact's one owner here: a worker's state is its
``Worker.state``, a slot's follows from its workers (:attr:`Slot.state`).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import channel
from . import config as cfg

EXIT_APP = 4  # a forked worker's exit status when the app cannot be loaded (and start's)


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
    born: float
    state: WorkerState = WorkerState.STARTING
    since: float = 0.0  # when it entered its state
    ready_at: float | None = None  # when it became ready, if it did
    last_seen: float = 0.0  # its last message (heartbeats come from its event loop)
    connections: int = 0
    accepted: int = 0  # connections it accepted, as it last reported
    error: str | None = None  # why it could not start, as it said
    details: str = ""  # and the traceback of its app's import, if it raised
    counts_refused: bool = False  # its --metrics counts were malformed (said once)
    # Its drain's deadline: from the configuration it was forked with, the closes' duration
    # it reported (None: the whole drain window), and when it was told to hurry.
    config: cfg.Config | None = None
    paced: float | None = None
    hurried: float | None = None
    replacing: str = "reload"  # what a replacement was forked for: reload or memory
    memory: int | None = None  # its USS in bytes, as last read (--max-worker-memory; None: off)
    oversized: bool = False  # over --max-worker-memory from its first reading: never recycled
    # Its copies of its slot's sockets (and of those lent to it) may be open: until it says
    # it stopped accepting (held, draining), which closes them, or exits.
    listening: bool = True

    def said(self) -> str:
        """What it said about why it could not start, for a log line: ": REASON" or ""."""
        return f": {self.error}" if self.error else ""

    def traceback(self) -> str:
        """Its app's traceback, under a log line, if its import raised."""
        return f"\n{self.details}" if self.details else ""

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
    # Scaled away: since when (its socket closes once its queue is empty), and its last look
    retiring: float | None = None
    looked: float | None = None
    releasing: Worker | None = None  # retired: the borrower told to give it back, until it did

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
    """A new master from the installed code (wsfleet/upgrade.py), started by this one: the
    one record of that child process."""

    pid: int
    pipes: Any  # the Upgrades' handle for what it says and what it is told
    since: float  # when it entered its state
    state: UpgradeState = UpgradeState.STARTING


@dataclass
class RollingRestart:
    """A cursor over the slots: ``todo[0]`` is being restarted by ``step``, if started.
    ``reason`` reload (a HUP: the outcome and systemd hear of it), or memory: one slot whose
    worker passed --max-worker-memory, replaced the same way without a word to either."""

    todo: list[Slot]
    step: Worker | None = None
    reason: str = "reload"


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


@dataclass
class UpgradeOutcome:
    """How the last upgrade went, as data (the status's "upgrade"): ``kind`` none,
    in_progress, done (the new master serves), failed (this master serves on), refused or
    stopped; ``detail`` why it failed or was refused, or what stopped it; ``new_master``
    the new master's pid, once one was started (control.upgrade waits for the outcome)."""

    kind: str = "none"
    detail: str | None = None
    new_master: int | None = None


def with_details(error: Exception) -> str:
    """An error's line, and its traceback under it when it has one (an app that raised)."""
    details = getattr(error, "details", "")
    return f"{error}\n{details}" if details else str(error)


class Processes(Protocol):
    """What the fleet asks of its processes and sockets: wsfleet/processes.py does it, unit
    tests fake it."""

    def open_slot(self, index: int) -> list[Any]: ...  # new listening sockets; raises OSError
    def close_slot(self, slot: Slot) -> None: ...  # this master's copies: it leaves the group
    # Scaled away: its index may serve a new slot while its sockets wait to close.
    def set_aside(self, slot: Slot) -> None: ...
    def queued(self, slot: Slot) -> int: ...  # connections in its sockets' accept queues
    def close_shared(self) -> None: ...  # the fleet's Unix sockets (one for every worker)
    def fork(self, slot: Slot) -> tuple[int, Any]: ...  # (pid, channel); raises OSError
    def signal(self, pid: int, sig: signal.Signals) -> None: ...  # any child, a new master too
    def send(self, worker: Worker, message: channel.Message, fds: Sequence[int] = ()) -> bool: ...
    def all_ready(self) -> None: ...  # the fleet serves: say so (listening line, systemd)


class Upgrades(Protocol):
    """What the fleet asks to upgrade wsfleet itself: wsfleet/upgrade.py does it (the old
    master's end), unit tests fake it."""

    # A new master, handed these slots' sockets (and the rest): (pid, pipes); raises OSError.
    def start_master(self, slots: list[list[Any]]) -> tuple[int, Any]: ...
    def hand_over(self, upgrade: Upgrade) -> None: ...  # it serves: the pidfile, systemd are its


def describe_exit(code: int) -> str:
    """'exit status N' or 'signal NAME' (or 'signal N' for one Python has no name for)."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
