"""The master's process layer: its listening sockets, and its workers as processes.

What the fleet decides (wsfleet/fleet.py), this does with system calls: it implements
:class:`records.Processes`: open and close a slot's sockets, fork a worker (and, in the forked
child, drop what belongs to the master and start serving), signal a process, send a message
on a worker's channel, say that the fleet serves. It decides nothing.

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

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from setproctitle import setproctitle

from . import channel, control, logs, notify, sockets, steering
from . import config as cfg
from .fleet import Fleet
from .privileges import drop_privileges, identity
from .records import EXIT_APP, Slot, Worker, with_details

log = logging.getLogger("wsfleet.master")

# The master's signals (wsfleet/master.py handles them): blocked across fork, so that none
# is handled in a child by the master's handlers; the child resets them before unblocking.
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


@dataclass
class HubChild:
    """The master's hub process (wsfleet/hub.py): its listening socket (the master's, kept
    for the fleet's life and handed over on upgrade, so that workers always reach a hub at
    one name), the token an upgrade's new hub shows the old one, the --admin port it serves
    (the master's too, kept and handed over alike) with its token, and the running child."""

    listener: socket.socket
    token: str
    pid: int = 0
    channel: socket.socket | None = None
    wait_for_takeover: bool = False  # an upgrade's new master: serve once told to take over
    stats: dict[str, int] = field(default_factory=dict)  # its last report
    broker: dict[str, Any] | None = None  # --broker: its last report of the broker's state
    started: float = 0.0  # (monotonic)
    restarts: int = 0  # replaced after it died
    quick_exits: int = 0  # died within a second of its start, running
    name: str = ""  # its abstract name, which workers connect to
    admin: socket.socket | None = None  # --admin's listening socket (wsfleet/admin.py)
    admin_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        name = self.listener.getsockname()  # (bytes for an abstract name)
        self.name = name.decode() if isinstance(name, bytes) else name


@dataclass
class Listeners:
    """Every address in its order, as bound (a port 0 became the kernel's choice) or as
    inherited; those with a socket per slot; the sockets every worker accepts on."""

    listening: list[cfg.Address] = field(default_factory=list)
    per_slot: list[cfg.Address] = field(default_factory=list)
    shared: list[sockets.SharedListener] = field(default_factory=list)
    activated: bool = False  # passed by systemd (their order in a group is unknown)

    def inherit(
        self, listening: list[str], per_slot: list[str], shared: list[sockets.SharedListener]
    ) -> None:
        """An upgrade's new master: the old master's (its slots' sockets come with them)."""
        self.listening = [cfg.parse_address(a) for a in listening]
        self.per_slot = [cfg.parse_address(a) for a in per_slot]
        self.shared = shared

    def open(self, config: cfg.Config) -> list[list[socket.socket]]:
        """The sockets systemd passed, else bind every address. Returns the slots' sockets:
        every slot's when passed, the first slot's when bound here (open_slot opens the
        others)."""
        activated = sockets.listen_fds()
        if activated:
            return self.adopt(config, activated)
        return [self.bind(config)]

    def adopt(
        self, config: cfg.Config, activated: list[socket.socket]
    ) -> list[list[socket.socket]]:
        """Socket activation: as many sockets on one address as workers are one per slot
        (systemd's ReusePort=yes: the kernel spreads connections over them, as over the
        sockets wsfleet binds); otherwise every worker accepts on each one."""
        if config.bind:
            log.warning(
                "--bind ignored: serving the %s systemd passed",
                logs.plural(len(activated), "socket"),
            )
        self.activated = True
        self.listening = list(dict.fromkeys(map(sockets.address_of, activated)))
        if len(activated) == config.workers > 1 and len(self.listening) == 1:
            self.per_slot = self.listening[:]
            return [[sock] for sock in activated]
        self.shared = [sockets.SharedListener(sock) for sock in activated]
        return [[]]

    def bind(self, config: cfg.Config) -> list[socket.socket]:
        """Bind every address: the first slot's TCP sockets, refused if anything listens
        there already, and the fleet's Unix sockets. Returns the first slot's sockets."""
        first: list[socket.socket] = []
        owner = identity(config)  # the Unix sockets belong to the workers' identity
        try:
            for address in cfg.addresses(config):
                if address.path is not None:
                    self.shared.append(
                        sockets.bind_unix(address.path, config.backlog, config.umask, owner)
                    )
                    self.listening.append(address)
                    continue
                sock = sockets.bind_exclusive(address, config.backlog)
                first.append(sock)
                self.listening.append(sockets.address_of(sock))
                self.per_slot.append(self.listening[-1])
        except BaseException:
            for sock in first:
                sock.close()
            raise
        return first

    def open_slot(self, backlog: int) -> list[socket.socket]:
        """A new slot's sockets, one per TCP address (SO_REUSEPORT, beside the others')."""
        opened: list[socket.socket] = []
        try:
            for address in self.per_slot:
                opened.append(sockets.bind(address, backlog))
        except BaseException:
            for sock in opened:
                sock.close()
            raise
        return opened

    def urls(self, config: cfg.Config) -> list[str]:
        """What the listening lines and the status say: ws:// or wss:// as configured now."""
        return [cfg.url(config, str(address)) for address in self.listening]

    def title(self) -> str:
        """The addresses as the processes' titles list them (control.Locator reads them)."""
        return ", ".join(map(str, self.listening))


class ProcessLayer:
    """The fleet's processes and sockets (records.Processes), with system calls.

    ``watch(channel, pid)`` is called with a new worker's channel, for the master's loop to
    read; ``leave_master()`` is called in a forked child, to close the master's own
    descriptors (its loop's, its status socket, its pidfile...). ``fleet`` is set by the
    master once the fleet is made (the fleet is given this layer)."""

    fleet: Fleet

    def __init__(
        self,
        listeners: Listeners,
        handler: Any,
        tls: ssl.SSLContext | None,
        watch: Callable[[socket.socket, int], None],
        leave_master: Callable[[], None],
    ) -> None:
        self.listeners = listeners
        self.handler = handler  # an app object given to wsfleet.run(); else workers import
        # Loaded in the master, inherited by every worker forked after: a reload whose
        # certificate files do not load keeps serving the ones that did.
        self.tls = tls
        self.watch = watch
        self.leave_master = leave_master
        self.hub: HubChild | None = None
        # --balance least-connections: the slots' groups, when this master knows their order
        # (it bound them; None: the kernel's hash)
        self.steerer: steering.Steerer | None = None
        self.aside: dict[Slot, int] = {}  # retired slots' keys in the steerer's groups

    # records.Processes

    def open_slot(self, index: int) -> list[socket.socket]:
        opened = self.listeners.open_slot(self.fleet.config.backlog)
        if self.steerer is not None:
            self.steerer.join(index)
        return opened

    def close_slot(self, slot: Slot) -> None:
        if self.steerer is not None and slot.sockets:
            self.steerer.leave(self.aside.pop(slot, slot.index))
        for sock in slot.sockets:
            sock.close()

    def set_aside(self, slot: Slot) -> None:
        if self.steerer is not None and slot.sockets:
            self.aside[slot] = self.steerer.set_aside(slot.index)

    def queued(self, slot: Slot) -> int:
        return sum(sockets.accept_queue(sock) for sock in slot.sockets)

    def close_shared(self) -> None:
        for listener in self.listeners.shared:
            listener.sock.close()  # the file stays until the master exits

    def fork(self, slot: Slot) -> tuple[int, socket.socket]:
        pid, master_end = self._fork(slot, functools.partial(self.run_worker, slot))
        self.watch(master_end, pid)
        return pid, master_end

    def fork_hub(self, hub: HubChild) -> None:
        """Start the hub process (its pid and channel go into ``hub``)."""
        pid, master_end = self._fork(None, functools.partial(self.run_hub, hub))
        hub.pid, hub.channel, hub.started = pid, master_end, time.monotonic()

    def _fork(
        self, slot: Slot | None, run: Callable[[socket.socket], int]
    ) -> tuple[int, socket.socket]:
        """Fork a worker of ``slot`` (or the hub: None) that runs ``run(its channel end)``
        and exits with what it returns; (its pid, the master's end of its channel)."""
        master_end, child_end = channel.pair()
        # No signal may be handled in the child by the master's handlers: block them across
        # fork; the child resets their dispositions before unblocking.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            master_end.close()
            child_end.close()
            raise
        if pid == 0:  # the child never returns from here
            status = 1
            try:
                self.become_child(slot, master_end)
                status = run(child_end)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        child_end.close()
        return pid, master_end

    def signal(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def send(self, worker: Worker, message: channel.Message, fds: Sequence[int] = ()) -> bool:
        return channel.send(worker.channel, message, fds)

    def all_ready(self) -> None:
        urls = self.listeners.urls(self.fleet.config)
        for url in urls:
            print(notify.ready_line(url), file=sys.stderr, flush=True)
        notify.notify_ready(urls)  # (an upgrade's new master: to the old master)

    # Reaping

    def exited(self) -> Iterator[tuple[int, int]]:
        """Every child that has exited, as (pid, exit code; negative: killed by that signal),
        without waiting for any other."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            yield pid, os.waitstatus_to_exitcode(status)

    def wait(self, pids: list[int], timeout: float) -> Iterator[tuple[int, int]]:
        """Wait for these children to exit, SIGKILL those still there after timeout; as
        (pid, exit code) each."""
        deadline = time.monotonic() + timeout
        for pid in pids:
            if not control.wait_exit(pid, deadline - time.monotonic()):
                self.signal(pid, signal.SIGKILL)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            yield pid, os.waitstatus_to_exitcode(status)

    # Inside a new worker

    def become_child(self, slot: Slot | None, master_end: socket.socket) -> None:
        """In a new worker (or the hub: no slot): drop the master's signal set-up and every
        descriptor it does not need, so that only the master holds channels (whose closing
        tells a worker the master died) and each worker holds only its own slot's sockets
        (and the shared)."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN if sig in IGNORED_WHILE_STARTING else signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the master decides
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self.leave_master()
        master_end.close()
        for worker_channel in self.fleet.channels():
            worker_channel.close()
        for other in self.fleet.other_slots(slot):
            self.close_slot(other)
        if self.hub is not None:
            if self.hub.channel is not None:
                self.hub.channel.close()
            if slot is not None:  # (a worker reaches the hub by name; the admin API is the hub's)
                self.hub.listener.close()
                if self.hub.admin is not None:
                    self.hub.admin.close()
        if slot is None:
            for listener in self.listeners.shared:
                listener.sock.close()
        notify.set_ready_fd(None)

    def run_hub(self, hub: HubChild, hub_end: socket.socket) -> int:
        from . import hub as hub_module
        from .admin import Port
        from .topics import MAX_IDLE_TOPICS, Topics

        setproctitle(f"wsfleet: hub [{self.listeners.title()}]")
        config = self.fleet.config
        setup = None
        if config.broker:
            from . import broker

            def setup(hub: hub_module.Hub) -> None:
                hub.broker = broker.attach(config, hub.deliver, hub.heard, password)

            password = broker.password(config)  # (before dropping privileges: a root's file)
        drop_privileges(config)  # the workers' user: they connect, it checks who
        topics = Topics(
            history_size=config.history_size,
            history_ttl=config.history_ttl,
            max_idle_topics=MAX_IDLE_TOPICS,
        )
        admin = None
        if hub.admin is not None:
            admin = Port(hub.admin, hub.admin_token, config.max_size)
        return asyncio.run(
            hub_module.serve_process(
                hub.listener,
                hub_end,
                topics,
                hub.token,
                hub.wait_for_takeover,
                admin,
                setup,
            )
        )

    def run_worker(self, slot: Slot, worker_end: socket.socket) -> int:
        from . import worker  # (after fork: the master imports it only to preload it)

        setproctitle(f"wsfleet: worker {slot.index} [{self.listeners.title()}]")
        config = self.fleet.config
        drop_privileges(config)  # its socket is bound; the app comes next
        try:
            handler = self.handler or worker.load_app(config.app)
        except worker.AppError as exc:
            # The master logs it (or, at start, says it in start's message): once, however
            # many workers fail alike. Alone with no master to tell, say it here.
            if not channel.send(worker_end, channel.error(str(exc), exc.details)):
                logging.getLogger("wsfleet.worker").error("%s", with_details(exc))
            return EXIT_APP
        listening = [*slot.sockets, *(listener.sock for listener in self.listeners.shared)]
        hub_name = self.hub.name if self.hub is not None else None
        serving = worker.Worker(config, listening, handler, worker_end, self.tls, hub_name)
        return worker.run(config, serving.run())
