"""The master process: one loop that feeds the fleet its events.

The rooms, each in its own module:

- wsfleet/fleet.py decides (states, deadlines, backoff, restarts, upgrades): every decision;
- wsfleet/processes.py does what it decides with processes and sockets (fork, the forked
  child's start-up, signals, messages, slots' sockets);
- wsfleet/upgrade.py is an upgrade's protocol, both ends (the old master's, the new one's);
- this module is the loop: one selector for every descriptor the master reads (the wake-up
  pipe of its signals, the workers' channels, the status socket, the --metrics port, an
  upgrade's pipes), each registered with its handler (the --admin port it binds and keeps,
  but its hub serves); signals queued through ``signal.set_wakeup_fd``; systemd told what
  changed. Each event is handled in a guarded step: an error is logged with its traceback
  and the master goes on.

After the events of a wake-up, the fleet does what is due (:meth:`Fleet.on_time`) and
recomputes what follows (:meth:`Fleet.reconcile`). The configuration in force is the fleet's
(``fleet.config``, replaced by a rolling restart); this module keeps none of its own.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from setproctitle import setproctitle

from . import (
    __version__,
    channel,
    control,
    hub,
    logs,
    memory,
    metrics,
    notify,
    sockets,
    steering,
    upgrade,
    web,
)
from . import config as cfg
from .fleet import BootError, Fleet
from .privileges import peer_allowed
from .processes import HANDLED_SIGNALS, HubChild, Listeners, ProcessLayer
from .records import MasterState, UpgradeState, WorkerState, with_details

log = logging.getLogger("wsfleet.master")
HUB_STOP = hub.ADMIN_FINISH + hub.CLOSE_LIMIT + 0.5  # seconds the hub has to exit, then SIGKILL
HUB_RETRY = 1.0  # a hub that dies within this of its start twice running waits this long


class Handler(Protocol):
    """What a selector entry carries: what to do when its descriptor is ready, and what it
    is, for the log if that fails (a :class:`Watch`, or the --metrics port's server)."""

    what: str

    def on_ready(self, fileobj: Any) -> None: ...


@dataclass(frozen=True)
class Watch:
    """A selector entry of the master's own: ``step`` runs when the descriptor is ready."""

    what: str
    step: Callable[[], None]

    def on_ready(self, fileobj: Any) -> None:
        self.step()


class Master:
    """The master process: the fleet's events, read in one selector loop."""

    def __init__(
        self,
        config: cfg.Config,
        reload_config: Callable[[], cfg.Config] | None = None,
        handler: Any = None,
    ) -> None:
        self.reload_config = reload_config
        self.selector = selectors.DefaultSelector()
        self.listeners = Listeners()
        tls = sockets.server_context(config)
        self.processes = ProcessLayer(
            self.listeners, handler, tls, self.watch_channel, self.leave_master
        )
        self.old_end = upgrade.OldEnd(self)  # starts an upgrade's new master, hands over
        self.fleet = Fleet(config, self.processes, self.old_end, time.monotonic)
        self.processes.fleet = self.fleet
        self.new_end: upgrade.NewEnd | None = None  # this master is an upgrade's new one
        self.started = time.time()
        # Where this process logs: set up before it starts (a reload does not move it).
        self.log_file = config.log_file
        self.pidfile: control.Pidfile | None = None
        self.status_server: socket.socket | None = None
        self.web: web.WebServer | None = None  # --metrics
        self.metrics_url: str | None = None
        self.admin_url: str | None = None  # --admin (its hub serves it)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=40)
        self.events_handler: logging.Handler | None = None
        # What systemd was last told (sd_notify), so that each change is said once.
        self.told: dict[str, object] = {"reloading": False, "stopping": False, "status": ""}
        self.watchdog = notify.watchdog_interval()
        self.watchdog_due = time.monotonic()
        self._wake_r, self._wake_w = os.pipe()
        self.hub_due: float | None = None  # when to replace a hub that died as it started
        self.hub_release: float | None = None  # handed over: when its hub is stopped at last
        self.steer_due = 0.0  # (monotonic) when new connections may be weighted again
        self.memory_due = 0.0  # (monotonic) when the workers' memory is read again
        self.steered: set[int] | None = None  # the slots last given new connections (None: all)
        self.steer_waits = False  # new weights wait for steer_due
        # (when, the fleet's accepted connections then): the arrival rate over ARRIVAL_WINDOW
        self.arrivals: collections.deque[tuple[float, int]] = collections.deque(maxlen=1000)

    # Start-up and the main loop

    def run(self) -> int:
        """Serve until stopped; return the exit status. Raises BootError if no worker starts,
        sockets.AddressInUse or control.ControlError if the master cannot start."""
        try:
            slots = self.start_up()
            self.fleet.start(slots, reason="upgrade" if self.new_end is not None else None)
            # After the slots exist (the hub closes them all); workers reach it by name
            # whenever it accepts, its socket queues them meanwhile.
            self.fork_hub()
            self.fleet.reconcile()
            while not self.fleet.finished or self.hub_hands_over():
                self.loop_once()
        except BootError as exc:
            if self.log_file:  # the log is a file: it says why too (else: the caller)
                log.error("cannot start: %s", with_details(exc))
            self.stop_workers_and_wait()
            raise
        finally:
            self.cleanup()
        return 0

    def start_up(self) -> list[list[socket.socket]]:
        """Everything before the first fork: the pidfile, the sockets (handed over by an old
        master, else passed by systemd, else bound), the signals, the status socket and the
        --metrics port. Returns every slot's sockets."""
        config = self.fleet.config
        handoff = upgrade.inherited()
        if handoff is not None:  # the lock comes with the descriptor; the file, once handed
            self.new_end = upgrade.NewEnd(self, handoff)
            notify.set_ready_fd(handoff.ready_fd)
            if handoff.pidfile is not None and handoff.pidfile_fd is not None:
                self.pidfile = control.Pidfile(handoff.pidfile, handoff.pidfile_fd)
            self.listeners.inherit(handoff.listening, handoff.per_slot, handoff.shared)
            slots = handoff.slots
            self.inherit_steering(handoff, slots)
        else:
            if config.pidfile:
                self.pidfile = control.Pidfile(config.pidfile)
            slots = self.listeners.open(config)
            if slots[0] and self.listeners.activated:
                if config.balance == "least-connections":
                    log.warning(
                        "--balance least-connections: the order of sockets systemd passed is "
                        "unknown; the kernel's hash places connections"
                    )
            elif slots[0]:  # (both modes: a slot scaled away gets no new connection)
                self.processes.steerer = steering.Steerer(len(slots[0]))
                self.processes.steerer.join(0)
            while len(slots) < config.workers:
                slots.append(self.processes.open_slot(len(slots)))
        setproctitle(f"wsfleet: master [{self.listeners.title()}]")
        # Handlers before the first fork: a signal between fork and set-up would orphan.
        self.install_signals()
        self.status_server = control.listen_status(os.getpid())
        if self.status_server is not None:
            self.watch(self.status_server, "a status request", self.on_status_request)
        if self.new_end is not None and self.new_end.handoff.handed_fd is not None:
            handed = self.new_end.handoff.handed_fd
            self.watch(handed, "the old master's word", self.new_end.on_old_master_says)
        self.open_metrics_port(handoff)
        self.start_hub(handoff)
        self.events_handler = _Events(self.events)
        log.addHandler(self.events_handler)
        log.info(
            "master %d (wsfleet %s) starting %s on %s (app %s)%s",
            os.getpid(),
            __version__,
            logs.plural(len(slots), "worker"),
            ", ".join(self.urls()),
            config.app,
            f", taking over from master {handoff.old_pid}" if handoff is not None else "",
        )
        preload(config)
        return slots

    # The hub (wsfleet/hub.py): forked before the workers, replaced at once when it dies

    def start_hub(self, handoff: upgrade.Handoff | None) -> None:
        """The hub's socket (an old master's, on upgrade: its hub then hands the topics
        over once this master serves) and the --admin port it serves; the process is forked
        once the slots exist."""
        admin_token = cfg.admin_token(self.fleet.config)  # (before binding: it may fail)
        if handoff is not None and handoff.hub is not None:
            child = HubChild(handoff.hub, handoff.hub_token, wait_for_takeover=True)
        else:
            token = secrets.token_hex(16)
            child = HubChild(hub.listen(hub.address(os.getpid(), token)), token)
        self.processes.hub = child
        child.admin = self.open_admin_port(handoff)
        child.admin_token = admin_token or ""

    def open_admin_port(self, handoff: upgrade.Handoff | None) -> socket.socket | None:
        """--admin: bound here, or handed over by an old master (whose hub serves it until it
        hands its topics over to this master's hub); an upgrade's new master without --admin
        closes it."""
        config = self.fleet.config
        handed = handoff.admin if handoff is not None else None
        if handoff is not None:
            handoff.admin = None  # (the hub's record holds it from here)
        if not config.admin:
            if handed is not None:
                handed.close()
            return None
        sock = handed or sockets.bind_plain(cfg.parse_address(config.admin), 128)
        self.admin_url = f"http://{sockets.sock_address(sock)}/"
        log.info("admin API (POST /publish/TOPIC) on %s, served by the hub", self.admin_url)
        return sock

    def fork_hub(self) -> None:
        child = self.processes.hub
        assert child is not None
        self.processes.fork_hub(child)
        assert child.channel is not None
        self.watch(child.channel, "the hub's figures", self.on_hub_messages)

    def on_hub_messages(self) -> None:
        child = self.processes.hub
        if child is None or child.channel is None:
            return
        while True:
            try:
                message, fds = channel.receive(child.channel)
            except BlockingIOError:
                return
            for fd in fds:
                os.close(fd)
            if message is None:  # exiting: SIGCHLD follows
                self.unwatch(child.channel)
                child.channel.close()
                child.channel = None
                return
            if message.get("t") == "stats":
                child.stats = {
                    k: v for k, v in message.items() if k in hub.FIGURES and isinstance(v, int)
                }
                broker = message.get("broker")
                child.broker = broker if isinstance(broker, dict) else None

    def on_hub_exit(self, code: int) -> None:
        child = self.processes.hub
        assert child is not None
        self.on_hub_messages()  # (its last figures)
        if child.channel is not None:
            self.unwatch(child.channel)
            child.channel.close()
            child.channel = None
        child.pid = 0
        if code == 0 or self.fleet.handed_over:
            # Stopped, or handed over to an upgrade's new hub (it exits 0 then, maybe before
            # this master knows the upgrade succeeded): not replaced.
            return
        child.wait_for_takeover = False
        child.restarts += 1
        # Replaced at once; one that keeps dying as it starts, every HUB_RETRY seconds.
        quick = time.monotonic() - child.started < HUB_RETRY
        child.quick_exits = child.quick_exits + 1 if quick else 0
        log.error(
            "the hub (pub/sub) exited with %s: %s; its topics start anew, with new epochs",
            f"status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}",
            f"replaced in {HUB_RETRY:g}s (it died at start)"
            if child.quick_exits > 1
            else "replaced at once",
        )
        if child.quick_exits > 1:
            self.hub_due = time.monotonic() + HUB_RETRY
        else:
            self.fork_hub()

    def on_hub_due(self) -> None:
        if self.hub_due is not None and time.monotonic() >= self.hub_due:
            self.hub_due = None
            if self.fleet.state is not MasterState.STOPPING and not self.fleet.handed_over:
                self.fork_hub()

    def take_over_hub(self) -> None:
        """An upgrade's new master serves: its hub takes the old hub's topics over."""
        child = self.processes.hub
        if child is not None and child.channel is not None and child.wait_for_takeover:
            channel.send(child.channel, {"t": "takeover"})
            child.wait_for_takeover = False

    def hub_hands_over(self) -> bool:
        """Whether this master, handed over to an upgrade's new one, waits for its hub: the
        hub hands its topics over to the new hub when that one asks (once the new master
        serves, which may come after this master's last worker exited) and then exits by
        itself; stopped before, it would take the history with it. hub.TAKEOVER_LIMIT at most
        (the new hub starts anew then too)."""
        child = self.processes.hub
        if not self.fleet.handed_over or child is None or not child.pid:
            return False
        now = time.monotonic()
        if self.hub_release is None:
            self.hub_release = now + hub.TAKEOVER_LIMIT
        return now < self.hub_release

    def stop_hub(self) -> None:
        child = self.processes.hub
        if child is None or not child.pid:
            return
        self.processes.signal(child.pid, signal.SIGTERM)
        for _ in self.processes.wait([child.pid], HUB_STOP):
            pass
        child.pid = 0

    def open_metrics_port(self, handoff: upgrade.Handoff | None) -> None:
        """--metrics: bound here, or handed over by an old master (served once it has handed
        over: NewEnd.take_over); an upgrade's new master without --metrics closes it."""
        config = self.fleet.config
        if handoff is not None and not config.metrics and handoff.metrics is not None:
            handoff.metrics.close()
            handoff.metrics = None
        if config.metrics and (handoff is None or handoff.metrics is None):
            self.open_web(sockets.bind_plain(cfg.parse_address(config.metrics), 64))

    def open_web(self, sock: socket.socket) -> None:
        """--metrics: the HTTP port, served from this loop (wsfleet/web.py says why)."""
        collector = metrics.FleetCollector(
            self.fleet,
            self.fleet.tally,
            lambda: self.status()["pubsub"],
            lambda: self.status()["broker"],
        )
        routes: dict[str, web.Route] = {
            "/metrics": lambda: metrics.exposition(collector),
            "/status.json": lambda: web.as_json(self.status()),
            "/": web.status_page,
        }
        self.web = web.WebServer(sock, routes, self.selector)
        self.metrics_url = f"http://{sockets.sock_address(sock)}/"
        log.info("metrics and status page on %s", self.metrics_url)

    def urls(self) -> list[str]:
        return self.listeners.urls(self.fleet.config)

    def install_signals(self) -> None:
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _no_op)  # the wake-up fd carries the signal number
        self.watch(self._wake_r, "signals", self.on_signals)

    def watch(self, fileobj: Any, what: str, step: Callable[[], None]) -> None:
        """Run step (guarded) whenever fileobj is readable."""
        self.selector.register(fileobj, selectors.EVENT_READ, Watch(what, step))

    def unwatch(self, fileobj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fileobj)

    def watch_channel(self, sock: socket.socket, pid: int) -> None:
        """A new worker's channel: its messages go to the fleet."""
        self.watch(sock, f"worker {pid}'s messages", functools.partial(self.on_messages, pid))

    def loop_once(self) -> None:
        web_deadline = self.web.next_deadline() if self.web is not None else None
        deadlines = [self.fleet.next_deadline(), web_deadline, self.hub_due, self.hub_release]
        if self.steer_waits:  # (weights follow the workers within STEER_GAP of a report)
            deadlines.append(self.steer_due)
        if self.watchdog is not None:
            deadlines.append(self.watchdog_due)
        deadline = min((d for d in deadlines if d is not None), default=None)
        timeout = 1.0 if deadline is None else min(max(0.0, deadline - time.monotonic()), 1.0)
        for key, _ in self.selector.select(timeout):
            handler: Handler = key.data
            self.guarded(handler.what, functools.partial(handler.on_ready, key.fileobj))
        if self.web is not None:
            self.guarded("the metrics port's deadlines", self.web.expire)
        self.guarded("deadlines", self.fleet.on_time)
        self.guarded("the hub's replacement", self.on_hub_due)
        self.guarded("memory readings", self.measure_memory)
        self.guarded("reconciling", self.fleet.reconcile)
        self.guarded("steering", self.steer)
        self.guarded("telling systemd", self.tell_systemd)

    def inherit_steering(self, handoff: upgrade.Handoff, slots: list[list[socket.socket]]) -> None:
        """An upgrade: steer the groups as the old master numbered them; otherwise (--balance
        hash, or an old master that did not say) take off any program it attached, which
        would steer by weights nobody updates."""
        config = self.fleet.config
        if handoff.groups is not None:  # (with --balance hash, its first steer detaches)
            self.processes.steerer = steering.Steerer.from_orders(handoff.groups)
            return
        if config.balance == "least-connections":
            log.warning(
                "--balance least-connections: the old master did not say how the kernel "
                "numbers the slots' sockets; the kernel's hash places connections until the "
                "next start"
            )
        for sock in slots[0] if slots else []:
            with contextlib.suppress(OSError):  # (ENOENT: no program)
                steering.detach(sock)

    def weights(self) -> dict[int, int] | None:
        """New connections' weights by slot (None: the kernel's hash). A slot scaled away gets
        none; with least-connections, neither does one whose worker is not ready or whose
        heartbeat is late (its socket's queue would wait for nobody)."""
        fleet = self.fleet
        if fleet.config.balance == "hash":
            return (
                {slot.index: 1 for slot in fleet.slots} if fleet.retiring or fleet.closing else None
            )
        now = time.monotonic()
        late = 2 * cfg.heartbeat_interval(fleet.config)
        counts: list[int | None] = []
        for slot in fleet.slots:
            worker = slot.worker
            ready = worker is not None and worker.state is WorkerState.READY
            fresh = worker is not None and now - worker.last_seen <= late
            counts.append(worker.connections if worker is not None and ready and fresh else None)
        arriving = self.arrival_rate(now) * cfg.STEER_HORIZON
        weighted = steering.least_connections(counts, arriving)
        return dict(zip((s.index for s in fleet.slots), weighted, strict=True))

    def arrival_rate(self, now: float) -> float:
        """New connections a second, as the workers' reports show them, over the last
        ARRIVAL_WINDOW (0 until a tenth of a second is seen)."""
        samples, arrived = self.arrivals, self.fleet.arrived
        samples.append((now, arrived))
        while len(samples) > 2 and now - samples[1][0] >= cfg.ARRIVAL_WINDOW:
            samples.popleft()
        then, before = samples[0]
        return (arrived - before) / (now - then) if now - then >= cfg.STEER_INTERVAL else 0.0

    def steer(self) -> None:
        """Weigh new connections again when the weights changed: at once when a slot gains or
        loses its share (a worker ready, late, scaled away), else at most every STEER_GAP
        (the loop wakes for it; each worker reports at most every STEER_INTERVAL)."""
        steerer = self.processes.steerer
        if steerer is None or steerer.refused is not None:
            return
        weights = self.weights()
        if weights == steerer.weights and not steerer.inherited:
            self.steer_waits = False
            return
        steered = None if weights is None else {slot for slot, w in weights.items() if w}
        now = time.monotonic()
        if steered == self.steered and now < self.steer_due:
            self.steer_waits = True
            return
        self.steer_due, self.steered = now + cfg.STEER_GAP, steered
        self.steer_waits = False
        sockets = {slot.index: slot.sockets for slot in self.fleet.slots}  # (one is enough)
        if not steerer.steer(weights, sockets):
            log.warning(
                "--balance: the kernel refused the steering program (%s); its hash places "
                "connections",
                steerer.refused,
            )

    def measure_memory(self) -> None:
        """--max-worker-memory: the workers' USS from /proc for the fleet to judge, every
        config.MEMORY_INTERVAL (a read costs 0.1 ms for an idle worker, 1.5 ms for one
        with 10,000 connections: docs/operations.md), and a new worker's as soon as it is
        ready. Nothing is read with the bound off. (The loop wakes at least every second:
        a reading is at most that late.)"""
        now = time.monotonic()
        due = now >= self.memory_due
        if due:
            self.memory_due = now + cfg.MEMORY_INTERVAL
        for pid in self.fleet.to_measure(due):
            try:
                uss = memory.uss(pid)
            except (OSError, ValueError):  # (exited meanwhile: SIGCHLD follows)
                continue
            self.fleet.on_memory(pid, uss)

    def guarded(self, what: str, step: Callable[[], None]) -> None:
        """Run one event's handling; an error is logged, and the master goes on. (BootError
        is the fleet's decision that it cannot start: run() acts on it.)"""
        try:
            step()
        except BootError:
            raise
        except Exception:
            log.exception("error while handling %s; the master goes on", what)

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
        restart = fleet.restart  # (a --max-worker-memory replacement is no reload)
        reloading = restart is not None and restart.reason == "reload" and not stopping
        if reloading != self.told["reloading"] and fleet.state is not MasterState.BOOTING:
            if reloading:
                usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                lines += ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
            elif not stopping:
                lines.append("READY=1")
        workers = fleet.workers.values()
        ready = sum(w.state is WorkerState.READY for w in workers)
        status = (
            f"{ready}/{logs.plural(len(fleet.slots), 'worker')} ready, "
            f"{logs.plural(sum(w.connections for w in workers), 'connection')}"
            + (", reloading" if reloading else "")
        )
        if status != self.told["status"]:
            lines.append(f"STATUS={status}")
        self.told.update(reloading=reloading, stopping=stopping, status=status)
        if lines:
            notify.sd_notify("\n".join(lines))

    # Events

    def on_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            self.guarded(signal.Signals(signum).name, functools.partial(self.on_signal, signum))

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
        """The configuration for a rolling restart, and why it is the old one, if it is. The
        workers forked from now on get the TLS context it loads."""
        current = self.fleet.config
        if self.reload_config is None:
            return current, None
        try:
            new = self.reload_config()
        except cfg.ConfigError as exc:
            log.error("reload: configuration not reloaded: %s", exc)
            return current, str(exc)
        try:
            tls = sockets.server_context(new)  # rotated certificate files must load
        except ValueError as exc:
            log.error("reload: configuration not reloaded: %s", exc)
            return current, str(exc)
        self.processes.tls = tls
        for name in cfg.RELOAD_IGNORES:
            if getattr(new, name) != getattr(current, name):
                log.warning("reload: a change of %s needs a full restart; ignored", name)
                new = dataclasses.replace(new, **{name: getattr(current, name)})
        return new, None

    def on_messages(self, pid: int) -> None:
        """What worker pid said, to the fleet (validated; malformed messages are logged)."""
        worker = self.fleet.worker(pid)
        if worker is None:
            return
        while True:
            try:
                message, fds = channel.receive(worker.channel)
            except BlockingIOError:
                return
            for fd in fds:
                os.close(fd)
            if message is None:  # the worker is exiting; SIGCHLD follows
                self.unwatch(worker.channel)  # (reap() reads it last too)
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
            if not peer_allowed(conn):
                log.warning("status request from a process of another user refused")
                return
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.sendall(control.encode_status(self.status()))

    def reap(self) -> None:
        """Collect every child that exited, as soon as SIGCHLD says so: what it said last
        first, then its exit, to the fleet."""
        for pid, code in self.processes.exited():
            if self.processes.hub is not None and pid == self.processes.hub.pid:
                self.guarded("the hub's exit", functools.partial(self.on_hub_exit, code))
                continue
            worker = self.fleet.worker(pid)
            upgrade_ = self.fleet.upgrade
            if upgrade_ is not None and upgrade_.pid == pid:
                # What it said (why it failed) comes before its exit; a "ready" from a dead
                # master is not taken.
                read = functools.partial(self.old_end.read, pid, upgrade_.pipes, exited=True)
                self.guarded("the new master's word", read)
            if worker is not None:
                # What it said last (its final counts, say) may still wait in the channel.
                self.guarded(f"worker {pid}'s messages", functools.partial(self.on_messages, pid))
                self.unwatch(worker.channel)
                worker.channel.close()
            self.guarded(f"worker {pid}'s exit", functools.partial(self.fleet.on_exit, pid, code))
            if upgrade_ is not None and upgrade_.pid == pid:
                self.old_end.close(upgrade_.pipes)

    # In a forked worker

    def leave_master(self) -> None:
        """In a new worker (processes.ProcessLayer.become_child): close what belongs to the
        master: its loop, its status socket, the --metrics port, the pidfile's lock (which
        would outlive a killed master), an upgrade's pipes (a worker holding a pipe's end
        would hide its closing)."""
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.status_server is not None:
            self.status_server.close()
        if self.web is not None:
            self.web.close_in_child()
        if self.pidfile is not None:
            self.pidfile.close_in_child()
        upgrade_ = self.fleet.upgrade
        fds = upgrade_.pipes.fds() if upgrade_ is not None else []
        fds += self.new_end.fds() if self.new_end is not None else []
        for fd in fds:
            os.close(fd)

    # Shutting down

    def stop_workers_and_wait(self) -> None:
        """Start-up failed: the workers that did start drain, and are waited for."""
        self.fleet.stop(graceful=True)
        limit = cfg.drain_limit(self.fleet.config)
        for pid, code in self.processes.wait(self.fleet.pids(), limit):
            self.fleet.on_exit(pid, code)

    def cleanup(self) -> None:
        """Leave: on an error path, workers still running see their channels close and drain
        with 1001 by themselves, as when the master is killed; nothing kills them here."""
        fleet = self.fleet
        self.stop_hub()
        if self.processes.hub is not None and self.processes.hub.admin is not None:
            self.processes.hub.admin.close()  # (after an upgrade, the new master's copy stays)
        for slot in fleet.slots:
            self.processes.close_slot(slot)
        for listener in self.listeners.shared:
            listener.close(remove=not fleet.handed_over)  # the new master's now
        upgrade_ = fleet.upgrade
        if upgrade_ is not None:
            if upgrade_.state is UpgradeState.STARTING:  # an error path: leave no new master
                self.processes.signal(upgrade_.pid, signal.SIGTERM)
            self.old_end.close(upgrade_.pipes)
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
        """The fleet's status, with what the process adds: its pid, age, version, addresses,
        log file and --metrics URL, the outcomes in words (for the status page and older
        commands; "reload" and "upgrade" are the data), and the recent events."""
        status = self.fleet.status()
        fleet = status["master"]
        status["master"] = {
            "pid": os.getpid(),
            "state": fleet.pop("state"),
            "addresses": self.urls(),
            **fleet,
            "last_restart": control.outcome_text(fleet["reload"]),
            "last_upgrade": control.upgrade_text(fleet["upgrade"]),
            "age": round(time.time() - self.started, 1),
            "version": __version__,
            "log_file": os.path.abspath(self.log_file) if self.log_file else None,
        }
        if self.metrics_url is not None:
            status["master"]["metrics"] = self.metrics_url
        steerer = self.processes.steerer
        steers = steerer is not None and steerer.refused is None
        weights = None  # (the weights last given to new connections, by slot; null: the hash)
        if steerer is not None and steers and steerer.weights is not None:
            weights = {str(slot): weight for slot, weight in steerer.weights.items()}
        status["master"]["balance"] = {
            "mode": self.fleet.config.balance if steers else "hash",
            "weights": weights,
        }
        if self.admin_url is not None:
            status["master"]["admin"] = self.admin_url
        child = self.processes.hub
        figures = child.stats if child is not None else {}
        status["pubsub"] = {key: figures.get(key, 0) for key in hub.FIGURES}
        config = self.fleet.config
        if config.broker:
            # (until the hub's first report, a second after it starts: connecting)
            report = child.broker if child is not None else None
            status["broker"] = {
                "address": cfg.redact(config.broker),
                "state": "connecting",
                "since": None,
                "failed": 0,
                **(report or {}),
            }
        else:
            status["broker"] = None
        if child is not None:
            status["hub"] = {
                "pid": child.pid or None,
                "address": "@" + child.name[1:],  # (abstract: the leading NUL as @)
                "max_size": self.fleet.config.max_size,  # (what wsfleet publish may send)
                "age": round(time.monotonic() - child.started, 1) if child.pid else None,
                "restarts": child.restarts,
            }
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
