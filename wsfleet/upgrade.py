"""Upgrading wsfleet itself: a new master, from the code installed now, takes over the sockets.

On SIGUSR2 (or ``wsfleet upgrade``) the old master forks and executes the command it was
started with: ``sys.executable`` and ``sys.orig_argv``, so the Python files read are the ones
on disk now, as with nginx's and gunicorn's binary upgrade. What it hands over:

- its listening sockets, in systemd's socket-activation protocol (``LISTEN_FDS`` descriptors
  from 3, ``LISTEN_PID``), which the new master reads as it reads systemd's; what each one is
  (a slot's socket, a socket every worker shares, the --metrics port, the --admin port, the
  hub's) is said in ``WSFLEET_UPGRADE`` (JSON). The sockets are the same open sockets, not
  new ones: a connection queued on a slot's socket is accepted by whichever worker, old or
  new, takes it, so no connection attempt meets a closed port;
- its pidfile's descriptor, whose lock (flock belongs to the open file, which both share) the
  new master then holds even if the old one dies;
- a pipe on which the new master says it is ready, or why it failed: the lines a --daemon
  master writes to its waiting command (notify.notify_ready, notify.notify_failure);
- a pipe on which the old master says "ok" once it has handed over: only then does the new
  master count the pidfile and the Unix sockets' files as its own (to remove at exit), serve
  the --metrics port and go to its configuration's number of workers. Until then the old
  master may still give up on it (too slow, a shutdown) and go on serving.

The old master's fleet decides what follows (wsfleet/fleet.py): on "ready" it writes the new
master's pid in the pidfile, says "ok", its workers stop accepting and close their connections
with 1012 over the drain window, and it exits; on a failure, an exit, or no word within
``config.upgrade_limit`` it keeps serving, and the new master (stopped, if still running) is
reaped. A new master whose old one dies before deciding takes over by itself.

Both ends are here: :class:`OldEnd` in the old master (the fleet's :class:`records.Upgrades`:
start the new master, read what it says, hand over) and :class:`NewEnd` in the new master
(wait for the old master's word, take over). Each works on the master it belongs to
(:class:`Host`: wsfleet/master.py) and tells its fleet what happened; the fleet decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import control, notify, sockets
from .fleet import Fleet
from .processes import HANDLED_SIGNALS, Listeners, ProcessLayer
from .records import Upgrade
from .web import WebServer

log = logging.getLogger("wsfleet.master")

ENV = "WSFLEET_UPGRADE"


class HandoffError(ValueError):
    """WSFLEET_UPGRADE does not say what an old master hands over (exit 1)."""


@dataclass
class Handoff:
    """What an old master hands over: every socket, and what it is for."""

    old_pid: int
    listening: list[str]  # every address, in the order of the listening lines
    per_slot: list[str]  # the addresses with a socket per slot, in each slot's order
    slots: list[list[socket.socket]]
    shared: list[sockets.SharedListener]  # accepted on by every worker
    # The Unix sockets' files the old master made (path, inode), for each shared socket: the
    # new master's to remove at exit once it serves (take_files), not before.
    files: list[tuple[str | None, int]] = field(default_factory=list)
    metrics: socket.socket | None = None
    admin: socket.socket | None = None  # --admin's port, which the hub serves
    hub: socket.socket | None = None  # the hub's listening socket (wsfleet/hub.py)
    hub_token: str = ""  # what the new hub shows the old one to take its topics over
    pidfile: str | None = None
    pidfile_fd: int | None = None
    ready_fd: int | None = None  # where the new master says it is ready, or why it failed
    handed_fd: int | None = None  # where the old master says "ok" once it has handed over
    # --balance least-connections: each address's reuseport group, its slots in the kernel's
    # order (None: not steered, or an older wsfleet)
    groups: list[list[int]] | None = None


def describe(handoff: Handoff) -> tuple[str, list[int], int]:
    """The WSFLEET_UPGRADE value, the descriptors to pass from 3 on, in that order (the
    listening sockets, then the pidfile's and the two pipes'), and LISTEN_FDS: how many of
    them are listening sockets."""
    listening = [s for slot in handoff.slots for s in slot] + [s.sock for s in handoff.shared]
    if handoff.metrics is not None:
        listening.append(handoff.metrics)
    if handoff.admin is not None:
        listening.append(handoff.admin)
    if handoff.hub is not None:
        listening.append(handoff.hub)
    fds = [s.fileno() for s in listening]
    given = (handoff.pidfile_fd, handoff.ready_fd, handoff.handed_fd)
    extra = [fd for fd in given if fd is not None]
    start = sockets.LISTEN_FDS_START + len(fds)
    where: dict[int | None, int] = dict(zip(extra, range(start, start + len(extra)), strict=True))
    text = json.dumps(
        {
            "from": handoff.old_pid,
            "listening": handoff.listening,
            "per_slot": handoff.per_slot,
            "slots": len(handoff.slots),
            "shared": [[s.path, s.inode] for s in handoff.shared],  # (read into files)
            "metrics": handoff.metrics is not None,
            "admin": handoff.admin is not None,
            "groups": handoff.groups,
            "hub": handoff.hub_token if handoff.hub is not None else None,
            "pidfile": handoff.pidfile,
            "pidfile_fd": where.get(handoff.pidfile_fd),
            "ready_fd": where.get(handoff.ready_fd),
            "handed_fd": where.get(handoff.handed_fd),
        }
    )
    return text, fds + extra, len(fds)


def start(handoff: Handoff, blocked: Sequence[signal.Signals]) -> int:
    """Fork and execute the new master with the handoff; return its pid (OSError if the
    fork fails; a failed exec is the child's exit status 127)."""
    text, fds, listening = describe(handoff)
    argv = [sys.executable, *sys.orig_argv[1:]]
    env = dict(os.environ, **{ENV: text, "LISTEN_FDS": str(listening)})
    # As for a worker: no signal may reach the master's handlers in the child.
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        raise
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            for sig in blocked:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)  # the mask survives exec
            # Every descriptor to 3, 4, ...: first above that range, so none overwrites
            # another before it is moved; the copies close at exec.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
            for index, fd in enumerate(high):
                os.dup2(fd, sockets.LISTEN_FDS_START + index)  # inheritable
            env["LISTEN_PID"] = str(os.getpid())
            if "WATCHDOG_USEC" in env:  # systemd watches the new master once told MAINPID=
                env["WATCHDOG_PID"] = str(os.getpid())
            os.execve(argv[0], argv, env)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(127)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    return pid


def take_files(handoff: Handoff) -> None:
    """The new master serves: the Unix sockets' files the old master made are its now, to
    remove at exit (the old master leaves them)."""
    for listener, (path, inode) in zip(handoff.shared, handoff.files, strict=True):
        listener.path, listener.inode = path, inode


def ready_fd() -> int | None:
    """In a new master, from its first step: where to say it failed (the pipe), so that even
    a bad option reaches the old master as a reason, not only as an exit status."""
    try:
        fd = json.loads(os.environ.get(ENV, "null"))["ready_fd"]
    except (KeyError, TypeError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


def inherited() -> Handoff | None:
    """In a new master: what the old master handed over (None when not an upgrade). The
    variables are removed, so that nothing this master starts takes them for its own.
    HandoffError if they do not say what they should."""
    text = os.environ.pop(ENV, None)
    if text is None:
        return None
    passed = sockets.listen_fds()
    try:
        info = json.loads(text)
        slots, per_slot = int(info["slots"]), list(info["per_slot"])
        shared_info, metrics = list(info["shared"]), bool(info["metrics"])
        hub_token = info.get("hub")  # (None: an older wsfleet, or no hub)
        if hub_token is not None and not isinstance(hub_token, str):
            raise ValueError(f"hub: {hub_token!r}")
        hub = hub_token is not None
        admin = bool(info.get("admin", False))  # (an older wsfleet: none)
        count = slots * len(per_slot) + len(shared_info) + metrics + admin + hub
        if len(passed) != count:
            raise ValueError(f"{len(passed)} sockets passed for {text}")
        handoff = Handoff(
            old_pid=int(info["from"]),
            listening=list(info["listening"]),
            per_slot=per_slot,
            slots=[passed[i * len(per_slot) : (i + 1) * len(per_slot)] for i in range(slots)],
            shared=[],
            pidfile=info["pidfile"],
            pidfile_fd=info["pidfile_fd"],
            ready_fd=info["ready_fd"],
            handed_fd=info["handed_fd"],
            groups=_groups(info.get("groups"), slots, len(per_slot)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        for sock in passed:
            sock.close()
        raise HandoffError(f"{ENV}: not what an old master hands over ({exc})") from None
    rest = passed[slots * len(per_slot) :]
    for sock, (path, inode) in zip(rest, shared_info, strict=False):
        handoff.shared.append(sockets.SharedListener(sock))  # no file of its own yet
        handoff.files.append((path, inode))
    if hub:
        handoff.hub, handoff.hub_token = rest[-1], str(hub_token)
        rest = rest[:-1]
    if admin:
        handoff.admin = rest[-1]
        rest = rest[:-1]
    if metrics:
        handoff.metrics = rest[-1]
    for fd in (handoff.pidfile_fd, handoff.ready_fd, handoff.handed_fd):
        if fd is not None:
            os.set_inheritable(fd, False)
    return handoff


def _groups(value: object, slots: int, addresses: int) -> list[list[int]] | None:
    """The groups' order as handed over, if it is one: each address's group a permutation
    of the slots (else None: the new master does not steer)."""
    if not isinstance(value, list) or len(value) != addresses:
        return None
    groups = [group for group in value if isinstance(group, list)]
    if len(groups) != addresses or any(sorted(g) != list(range(slots)) for g in groups):
        return None
    return [[int(slot) for slot in group] for group in groups]


class Host(Protocol):
    """The master that an upgrade's end works on (wsfleet/master.py)."""

    fleet: Fleet
    listeners: Listeners
    pidfile: control.Pidfile | None
    web: WebServer | None
    processes: ProcessLayer

    def watch(self, fileobj: Any, what: str, step: Callable[[], None]) -> None: ...
    def unwatch(self, fileobj: Any) -> None: ...
    def open_web(self, sock: socket.socket) -> None: ...
    def take_over_hub(self) -> None: ...


@dataclass
class Pipes:
    """The old master's ends of the pipes with its new master: the handle of the fleet's
    record of that child (records.Upgrade.pipes)."""

    says: int | None  # read end: "listening on ..." once ready, or "failed N reason"
    handed: int | None  # write end: "ok" once this master hands over
    said: bytes = b""

    def fds(self) -> list[int]:
        return [fd for fd in (self.says, self.handed) if fd is not None]


class OldEnd:
    """In the old master: start a new master, read what it says, hand over to it."""

    def __init__(self, master: Host) -> None:
        self.master = master

    def start_master(self, slots: list[list[socket.socket]]) -> tuple[int, Pipes]:
        """Start a new master from the installed code, handing it every socket, the pidfile
        and two pipes: one it says on when it is ready (or why it failed), one this master
        says on that it handed over."""
        master = self.master
        says_r, says_w = os.pipe()
        handed_r, handed_w = os.pipe()
        pidfile = master.pidfile
        handoff = Handoff(
            old_pid=os.getpid(),
            listening=[str(a) for a in master.listeners.listening],
            per_slot=[str(a) for a in master.listeners.per_slot],
            slots=slots,
            shared=master.listeners.shared,
            metrics=master.web.sock if master.web is not None else None,
            admin=master.processes.hub.admin if master.processes.hub is not None else None,
            hub=master.processes.hub.listener if master.processes.hub is not None else None,
            hub_token=master.processes.hub.token if master.processes.hub is not None else "",
            groups=master.processes.steerer.orders() if master.processes.steerer else None,
            pidfile=pidfile.path if pidfile is not None else None,
            pidfile_fd=pidfile.fd if pidfile is not None else None,
            ready_fd=says_w,
            handed_fd=handed_r,
        )
        try:
            pid = start(handoff, HANDLED_SIGNALS)
        except BaseException:
            os.close(says_r)
            os.close(handed_w)
            raise
        finally:
            os.close(says_w)
            os.close(handed_r)
        os.set_blocking(says_r, False)
        pipes = Pipes(says_r, handed_w)
        master.watch(says_r, "the new master's word", functools.partial(self.read, pid, pipes))
        return pid, pipes

    def read(self, pid: int, pipes: Pipes, exited: bool = False) -> None:
        """Read what new master pid says; at the end of it (it closes the pipe once ready,
        or when it fails) tell the fleet. Said nothing: its exit tells why. Called with
        exited when it was reaped: a "ready" it said before dying is not taken."""
        if pipes.says is None:
            return
        while True:
            try:
                data = os.read(pipes.says, 4096)
            except BlockingIOError:
                return
            if not data:
                break
            pipes.said += data
        self.master.unwatch(pipes.says)
        os.close(pipes.says)
        pipes.says = None
        line = pipes.said.decode(errors="replace").partition("\n")[0]
        # Not reaped yet is not alive: it could have died right after saying it was ready.
        dead = exited or os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if notify.LISTENING.match(line) and not dead:
            self.master.fleet.on_new_master_ready()
        elif failed := notify.FAILED.match(line):
            self.master.fleet.on_new_master_failed(failed.group(2))

    def hand_over(self, upgrade: Upgrade) -> None:
        """The new master serves: write its pid in the pidfile (it holds the lock too, by
        the same open file) and let go of the file; tell the new master (which then counts
        the pidfile and the Unix sockets' files as its own, to remove at exit) and systemd
        (NotifyAccess=main listens to this master until told MAINPID=). The --metrics port
        stops taking requests here; those in progress are answered."""
        master, pipes = self.master, upgrade.pipes
        if master.pidfile is not None:
            master.pidfile.claim(upgrade.pid)
            master.pidfile.release()
            master.pidfile = None
        if pipes.handed is not None:
            with contextlib.suppress(OSError):
                os.write(pipes.handed, b"ok\n")
            os.close(pipes.handed)
            pipes.handed = None
        notify.sd_notify(f"MAINPID={upgrade.pid}")
        if master.web is not None:
            master.web.stop_listening()

    def close(self, pipes: Pipes) -> None:
        """The new master is gone (or this one exits): close what is left of the pipes."""
        if pipes.says is not None:
            self.master.unwatch(pipes.says)
            os.close(pipes.says)
            pipes.says = None
        if pipes.handed is not None:
            os.close(pipes.handed)
            pipes.handed = None


class NewEnd:
    """In an upgrade's new master: wait for the old master's word, then take over."""

    def __init__(self, master: Host, handoff: Handoff) -> None:
        self.master = master
        self.handoff = handoff

    def fds(self) -> list[int]:
        """What a forked worker must not keep (a pipe's end held by a worker would hide
        its closing; the --metrics port is the master's)."""
        handoff = self.handoff
        fds = [handoff.handed_fd] if handoff.handed_fd is not None else []
        return fds + ([handoff.metrics.fileno()] if handoff.metrics is not None else [])

    def on_old_master_says(self) -> None:
        """The old master handed over ("ok"), or it closed the pipe without a word: it gave
        up on this master (which it is stopping), or it died (this master is the only one
        left: it takes over)."""
        handoff = self.handoff
        assert handoff.handed_fd is not None
        try:
            data = os.read(handoff.handed_fd, 16)
        except BlockingIOError:
            return
        self.master.unwatch(handoff.handed_fd)
        os.close(handoff.handed_fd)
        handoff.handed_fd = None
        if data.startswith(b"ok") or not control.is_master(handoff.old_pid):
            self.take_over()

    def take_over(self) -> None:
        """This master is the fleet's now: the pidfile names it, the Unix sockets' files are
        its to remove at exit, it serves the --metrics port, and it runs as many workers as
        its configuration says (it started as many as the old master had)."""
        master, handoff = self.master, self.handoff
        log.info("took over from master %d", handoff.old_pid)
        if master.pidfile is not None:
            master.pidfile.claim()
        take_files(handoff)
        if handoff.metrics is not None:
            master.open_web(handoff.metrics)
            handoff.metrics = None
        master.take_over_hub()
        master.fleet.on_taken_over()
