"""The master: owns the listening sockets, forks the workers, and keeps them running.

Read top to bottom: start-up, the main loop, then each event it handles (signals, worker
messages, worker exits) and the periodic checks (heartbeats, restarts due, the rolling
restart, the shutdown deadline).

Why the master owns the sockets: it opens one SO_REUSEPORT socket per worker slot and keeps
it for its whole life. The kernel spreads connections evenly over the slots, and a
connection queued on a slot's socket while its worker restarts or crashes waits for the next
worker instead of being reset, as it would be if the socket closed with its worker. While a
slot has no ready worker, its socket is lent to a ready worker over the channel (SCM_RIGHTS),
so its connections do not wait either.

Signals are queued through ``signal.set_wakeup_fd`` and handled in the main loop; the Python
handlers do nothing. The master never imports the app: workers do, after fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from setproctitle import setproctitle

from . import channel, control, logs, sockets
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
    signal.SIGCHLD,
)
HEALTHY_UPTIME = 10.0  # a worker up this long resets its slot's crash count
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
KILL_GRACE = 1.0  # between SIGTERM and SIGKILL for a hung worker, and after a second TERM
EXIT_APP = 4


@dataclass(eq=False)
class WorkerProc:
    """The master's view of one worker process."""

    pid: int
    slot: int
    channel: socket.socket
    born: float = field(default_factory=time.monotonic)
    born_wall: float = field(default_factory=time.time)
    state: str = "starting"  # starting -> ready -> draining
    last_seen: float = field(default_factory=time.monotonic)
    connections: int = 0
    borrowed: set[int] = field(default_factory=set)
    error: str | None = None
    asked_to_stop: bool = False
    hung: bool = False
    kill_at: float | None = None


@dataclass(eq=False)
class Slot:
    """A listening socket and the worker that serves it."""

    index: int
    sock: socket.socket
    worker: WorkerProc | None = None
    replacement: WorkerProc | None = None  # the new worker of a rolling restart
    crashes: int = 0  # consecutive deaths soon after start
    restart_at: float | None = None
    lent_to: WorkerProc | None = None


class BootError(Exception):
    """No worker could start (the app does not import, say): start gives up."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Arbiter:
    def __init__(
        self,
        config: cfg.Config,
        reload_config: Callable[[], cfg.Config] | None = None,
        handler: Any = None,
    ) -> None:
        self.config = config
        self.reload_config = reload_config
        self.handler = handler  # an app object given to wsfleet.run(); else workers import
        self.slots: list[Slot] = []
        self.workers: dict[int, WorkerProc] = {}
        self.selector = selectors.DefaultSelector()
        self.signal_queue: list[int] = []
        self.address = ""
        self.started = time.time()
        self.booting = True
        self.stopping = False
        self.stop_deadline: float | None = None
        self.exit_status = 0
        self.reload_queue: list[int] = []  # slots still to restart, the current one first
        self.reload_step: WorkerProc | None = None  # the new worker of the current slot
        self.reload_deadline: float | None = None
        self.status_server: socket.socket | None = None
        self.pidfile_written = False
        self._wake_r, self._wake_w = os.pipe()

    # Start-up and the main loop

    def run(self) -> int:
        """Serve until stopped; return the exit status. Raises BootError if no worker starts,
        sockets.AddressInUse or control.ControlError if the master cannot start."""
        try:
            if self.config.pidfile:
                control.write_pidfile(self.config.pidfile)
                self.pidfile_written = True
            self.open_sockets()
            setproctitle(f"wsfleet: master [{self.address}]")
            # Handlers before the first fork: a signal between fork and set-up would orphan.
            self.install_signals()
            self.status_server = control.listen_status(os.getpid())
            self.selector.register(self.status_server, selectors.EVENT_READ, self.on_status_request)
            log.info(
                "master %d starting %d workers on ws://%s (app %s)",
                os.getpid(),
                self.config.workers,
                self.address,
                self.config.app,
            )
            for slot in self.slots:
                self.spawn(slot)
            while self.workers or not self.stopping:
                self.loop_once()
        finally:
            self.cleanup()
        return self.exit_status

    def open_sockets(self) -> None:
        """One SO_REUSEPORT socket per slot; with port 0 the first picks the port."""
        first = sockets.bind(self.config.host, self.config.port, self.config.backlog)
        self.slots.append(Slot(0, first))
        self.address = sockets.sock_address(first)
        for index in range(1, self.config.workers):
            self.add_slot(index)

    def add_slot(self, index: int) -> Slot:
        port = self.slots[0].sock.getsockname()[1]
        slot = Slot(index, sockets.bind(self.config.host, port, self.config.backlog))
        self.slots.append(slot)
        return slot

    def install_signals(self) -> None:
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _no_op)  # the wake-up fd carries the signal number
        self.selector.register(self._wake_r, selectors.EVENT_READ, self.on_wakeup)

    def loop_once(self) -> None:
        timeout = max(0.0, min(self.next_deadline() - time.monotonic(), 1.0))
        for key, _ in self.selector.select(timeout):
            key.data(key.fileobj)
        while self.signal_queue:
            self.handle_signal(self.signal_queue.pop(0))
        self.tick()

    def next_deadline(self) -> float:
        now = time.monotonic()
        deadlines = [now + 1.0]
        for slot in self.slots:
            if slot.restart_at is not None:
                deadlines.append(slot.restart_at)
        for worker in self.workers.values():
            if worker.kill_at is not None:
                deadlines.append(worker.kill_at)
            if worker.state != "draining":
                deadlines.append(worker.last_seen + self.config.timeout)
        for deadline in (self.stop_deadline, self.reload_deadline):
            if deadline is not None:
                deadlines.append(deadline)
        return min(deadlines)

    # Events

    def on_wakeup(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        self.signal_queue.extend(data)

    def handle_signal(self, signum: int) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGCHLD:
            self.reap()
        elif sig in (signal.SIGTERM, signal.SIGINT):
            if self.stopping:
                log.warning("received %s again: stopping now", sig.name)
                self.stop_now()
            else:
                log.info("received %s: graceful shutdown", sig.name)
                self.stop_gracefully()
        elif sig == signal.SIGQUIT:
            log.info("received SIGQUIT: immediate shutdown")
            self.stop_now()
        elif sig == signal.SIGHUP:
            self.start_reload()
        elif sig == signal.SIGTTIN:
            self.scale(len(self.slots) + 1)
        elif sig == signal.SIGTTOU:
            self.scale(len(self.slots) - 1)
        elif sig == signal.SIGUSR1:
            logs.reopen()
            self.signal_workers(signal.SIGUSR1)

    def on_message(self, worker: WorkerProc) -> None:
        while True:
            try:
                message, fds = channel.receive(worker.channel)
            except BlockingIOError:
                return
            for fd in fds:
                os.close(fd)
            if message is None:  # the worker is exiting; SIGCHLD follows
                self.selector.unregister(worker.channel)
                return
            worker.last_seen = time.monotonic()
            kind = message.get("t")
            if kind == "ready":
                self.on_ready(worker)
            elif kind == "hb":
                worker.connections = int(message.get("conns", 0))
            elif kind == "error":
                worker.error = str(message.get("message"))

    def on_ready(self, worker: WorkerProc) -> None:
        if worker.state != "starting":
            return
        worker.state = "ready"
        slot = self.slots[worker.slot] if worker.slot < len(self.slots) else None
        log.info("worker %d (slot %d) is ready", worker.pid, worker.slot)
        if slot is not None and slot.replacement is worker:
            # Rolling restart: the new worker accepts on the slot's socket; now the old
            # one may drain.
            old, slot.worker, slot.replacement = slot.worker, worker, None
            if old is not None:
                self.drain(old, 1012, "service restart")
        if worker is self.reload_step:
            self.reload_step = None
            self.reload_queue.pop(0)
            self.reload_deadline = None
            self.advance_reload()
        if slot is not None and slot.worker is worker:
            self.reclaim(slot)
        self.lend_idle_sockets()
        if self.booting and all(s.worker and s.worker.state == "ready" for s in self.slots):
            self.booting = False
            log.info("all %d workers ready", len(self.slots))
            print(f"listening on ws://{self.address}", file=sys.stderr, flush=True)
            control.notify_ready(self.address)

    def on_status_request(self, server: socket.socket) -> None:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return
        with conn:
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
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.on_exit(worker, os.waitstatus_to_exitcode(status))

    def on_exit(self, worker: WorkerProc, code: int) -> None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.selector.unregister(worker.channel)
        worker.channel.close()
        for index in worker.borrowed:
            if index < len(self.slots) and self.slots[index].lent_to is worker:
                self.slots[index].lent_to = None
        how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        uptime = time.monotonic() - worker.born
        slot = self.slots[worker.slot] if worker.slot < len(self.slots) else None

        if self.stopping or (worker.asked_to_stop and not worker.hung):
            log.info("worker %d (slot %d) exited (%s)", worker.pid, worker.slot, how)
            return
        reason = f": {worker.error}" if worker.error else ""
        if self.booting and worker.state == "starting":
            status = EXIT_APP if code == EXIT_APP else 1
            raise BootError(f"worker {worker.pid} could not start ({how}){reason}", status)
        if worker is self.reload_step:
            log.error(
                "rolling restart stopped: the new worker %d for slot %d exited before it was "
                "ready (%s)%s; the old worker keeps serving",
                worker.pid,
                worker.slot,
                how,
                reason,
            )
            self.abort_reload()
        if slot is not None and slot.replacement is worker:
            slot.replacement = None
            return
        if slot is None or slot.worker is not worker:
            return
        slot.worker = None
        if worker.hung:
            slot.crashes = 0
            delay = 0.0
        else:
            slot.crashes = 1 if uptime >= HEALTHY_UPTIME else slot.crashes + 1
            delay = backoff(slot.crashes)
        if delay:
            log.error(
                "worker %d (slot %d) died (%s) %.1fs after start%s; it died %d times in a row "
                "right after start: restarting in %.1fs",
                worker.pid,
                worker.slot,
                how,
                uptime,
                reason,
                slot.crashes,
                delay,
            )
        else:
            log.error(
                "worker %d (slot %d) died (%s)%s: replacing it",
                worker.pid,
                worker.slot,
                how,
                reason,
            )
        slot.restart_at = time.monotonic() + delay
        self.lend_idle_sockets()

    # Periodic checks

    def tick(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                slot.restart_at = None
                self.spawn(slot)
        for worker in list(self.workers.values()):
            if worker.kill_at is not None and now >= worker.kill_at:
                worker.kill_at = None
                self.kill(worker, signal.SIGKILL)
            elif (
                worker.state != "draining"
                and not worker.hung
                and now - worker.last_seen > self.config.timeout
            ):
                log.error(
                    "worker %d (slot %d) did not answer for %.0fs: killing it",
                    worker.pid,
                    worker.slot,
                    now - worker.last_seen,
                )
                worker.hung = worker.asked_to_stop = True
                self.kill(worker, signal.SIGTERM)
                worker.kill_at = now + KILL_GRACE
        if self.stop_deadline is not None and now >= self.stop_deadline:
            self.stop_deadline = None
            if self.workers:
                log.warning("shutdown timeout: killing %d workers still running", len(self.workers))
            self.signal_workers(signal.SIGKILL)
        if self.reload_deadline is not None and now >= self.reload_deadline:
            step = self.reload_step
            if step is not None:
                log.error(
                    "rolling restart stopped: the new worker %d for slot %d was not ready "
                    "after %.0fs; the old worker keeps serving",
                    step.pid,
                    step.slot,
                    self.config.timeout,
                )
                self.kill(step, signal.SIGKILL)  # its exit is handled like any other
            self.abort_reload()

    # Workers

    def spawn(self, slot: Slot, replacement: bool = False) -> WorkerProc:
        master_end, worker_end = channel.pair()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            status = 1
            try:
                self.become_child(slot, master_end)
                status = self.run_worker(slot, worker_end)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        worker_end.close()
        worker = WorkerProc(pid, slot.index, master_end)
        self.workers[pid] = worker
        self.selector.register(master_end, selectors.EVENT_READ, lambda _: self.on_message(worker))
        if replacement:
            slot.replacement = worker
        else:
            slot.worker = worker
        log.info("started worker %d for slot %d", pid, slot.index)
        return worker

    def become_child(self, slot: Slot, master_end: socket.socket) -> None:
        """In a new worker: drop the master's signal set-up and every descriptor it does not
        need, so that only the master holds channels (whose closing tells a worker the
        master died) and each worker holds only its own slot's socket."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        master_end.close()
        for worker in self.workers.values():
            worker.channel.close()
        for other in self.slots:
            if other is not slot:
                other.sock.close()
        if self.status_server is not None:
            self.status_server.close()
        control.set_ready_fd(None)

    def run_worker(self, slot: Slot, worker_end: socket.socket) -> int:
        from . import worker

        setproctitle(f"wsfleet: worker {slot.index} [{self.address}]")
        try:
            handler = self.handler or worker.load_app(self.config.app)
        except worker.AppError as exc:
            logging.getLogger("wsfleet.worker").error("%s", exc)
            channel.send(worker_end, {"t": "error", "message": str(exc)})
            return EXIT_APP
        return worker.run(
            self.config, worker.Worker(self.config, slot.sock, handler, worker_end).run()
        )

    def drain(self, worker: WorkerProc, code: int, reason: str) -> None:
        worker.asked_to_stop = True
        worker.state = "draining"
        self.release_borrowed(worker)
        if not channel.send(worker.channel, {"t": "drain", "code": code, "reason": reason}):
            self.kill(worker, signal.SIGTERM)

    def kill(self, worker: WorkerProc, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    def signal_workers(self, sig: signal.Signals) -> None:
        for worker in list(self.workers.values()):
            self.kill(worker, sig)

    # Lending the socket of a slot that has no ready worker

    def lend_idle_sockets(self) -> None:
        if self.stopping or self.booting:
            return
        for slot in self.slots:
            if slot.lent_to is not None or (slot.worker and slot.worker.state == "ready"):
                continue
            if slot.replacement is not None:
                continue
            borrowers = [
                w
                for w in self.workers.values()
                if w.state == "ready" and not w.asked_to_stop and w.slot != slot.index
            ]
            if not borrowers:
                return
            borrower = min(borrowers, key=lambda w: len(w.borrowed))
            if channel.send(
                borrower.channel, {"t": "adopt", "slot": slot.index}, [slot.sock.fileno()]
            ):
                slot.lent_to = borrower
                borrower.borrowed.add(slot.index)
                log.info(
                    "slot %d has no worker: worker %d accepts for it", slot.index, borrower.pid
                )

    def reclaim(self, slot: Slot) -> None:
        """The slot has its own ready worker again: the borrower gives its socket back."""
        borrower, slot.lent_to = slot.lent_to, None
        if borrower is not None:
            borrower.borrowed.discard(slot.index)
            channel.send(borrower.channel, {"t": "release", "slot": slot.index})

    def release_borrowed(self, worker: WorkerProc) -> None:
        """A worker that drains stops accepting on lent sockets too: lend them elsewhere."""
        for index in worker.borrowed:
            if index < len(self.slots) and self.slots[index].lent_to is worker:
                self.slots[index].lent_to = None
        worker.borrowed.clear()
        self.lend_idle_sockets()

    # Rolling restart, scaling, shutdown

    def start_reload(self) -> None:
        if self.stopping:
            return
        if self.reload_config is not None:
            try:
                new = self.reload_config()
            except cfg.ConfigError as exc:
                log.error("reload: configuration not reloaded: %s", exc)
                new = self.config
            for name in ("host", "port", "backlog"):
                if getattr(new, name) != getattr(self.config, name):
                    log.warning("reload: a change of %s needs a full restart; ignored", name)
                    new = cfg.dataclasses.replace(new, **{name: getattr(self.config, name)})
            self.config = new
        log.info("received SIGHUP: rolling restart of %d workers", len(self.slots))
        in_progress = bool(self.reload_queue)
        current = self.reload_queue[:1]
        self.reload_queue = current + [s.index for s in self.slots if s.index not in current]
        if not in_progress:
            self.advance_reload()

    def advance_reload(self) -> None:
        """Start the new worker of the next slot; on_ready drains the old one."""
        while self.reload_queue and self.reload_queue[0] >= len(self.slots):
            self.reload_queue.pop(0)  # scaled down meanwhile
        if not self.reload_queue:
            log.info("rolling restart done")
            self.scale(self.config.workers)
            return
        slot = self.slots[self.reload_queue[0]]
        slot.restart_at = None  # a slot in backoff gets its new worker now
        self.reload_step = self.spawn(slot, replacement=slot.worker is not None)
        self.reload_deadline = time.monotonic() + self.config.timeout

    def abort_reload(self) -> None:
        self.reload_queue.clear()
        self.reload_step = None
        self.reload_deadline = None

    def scale(self, count: int) -> None:
        count = max(1, count)
        if count == len(self.slots) or self.stopping:
            return
        log.info("scaling from %d to %d workers", len(self.slots), count)
        while len(self.slots) < count:
            self.spawn(self.add_slot(len(self.slots)))
        while len(self.slots) > count:
            slot = self.slots.pop()
            for worker in (slot.worker, slot.replacement):
                if worker is not None:
                    self.drain(worker, 1001, "going away")
            if slot.lent_to is not None:
                self.reclaim(slot)
            slot.sock.close()

    def stop_gracefully(self) -> None:
        self.stopping = True
        self.abort_reload()
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout + KILL_GRACE
        for worker in self.workers.values():
            worker.asked_to_stop = True
            worker.state = "draining"
        self.signal_workers(signal.SIGTERM)

    def stop_now(self) -> None:
        self.stopping = True
        self.abort_reload()
        self.stop_deadline = time.monotonic() + KILL_GRACE
        self.signal_workers(signal.SIGQUIT)

    def cleanup(self) -> None:
        if self.workers:  # only on an error path: never leave orphans
            self.signal_workers(signal.SIGKILL)
            for pid in list(self.workers):
                with contextlib.suppress(OSError, KeyError, ValueError):
                    os.waitpid(pid, 0)
            self.workers.clear()
        for slot in self.slots:
            slot.sock.close()
        if self.status_server is not None:
            self.status_server.close()
        if self.pidfile_written and self.config.pidfile:
            control.remove_pidfile(self.config.pidfile)
        signal.set_wakeup_fd(-1)
        log.info("master %d exiting", os.getpid())

    # Status

    def status(self) -> dict[str, Any]:
        now_wall = time.time()
        state = "stopping" if self.stopping else ("starting" if self.booting else "running")
        return {
            "master": {
                "pid": os.getpid(),
                "state": state,
                "age": round(now_wall - self.started, 1),
                "address": f"ws://{self.address}",
                "workers": len(self.slots),
            },
            "workers": [
                {
                    "slot": w.slot,
                    "pid": w.pid,
                    "state": w.state,
                    "age": round(now_wall - w.born_wall, 1),
                    "connections": w.connections,
                    "borrowed_slots": sorted(w.borrowed),
                }
                for w in sorted(self.workers.values(), key=lambda w: (w.slot, w.born))
            ],
        }


def backoff(crashes: int) -> float:
    """No delay for a first crash; then exponential, capped, with jitter so that slots that
    crash together do not restart in lockstep."""
    if crashes <= 1:
        return 0.0
    delay = min(BACKOFF_FIRST * 2 ** (crashes - 2), BACKOFF_MAX)
    return delay * random.uniform(0.75, 1.25)


def _no_op(signum: int, frame: object) -> None:
    """The wake-up fd carries the signal to the main loop; nothing happens here."""
