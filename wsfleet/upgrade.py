"""Upgrading wsfleet itself: a new master, from the code installed now, takes over the sockets.

On SIGUSR2 (or ``wsfleet upgrade``) the old master forks and executes the command it was
started with: ``sys.executable`` and ``sys.orig_argv``, so the Python files read are the ones
on disk now, as with nginx's and gunicorn's binary upgrade. What it hands over:

- its listening sockets, in systemd's socket-activation protocol (``LISTEN_FDS`` descriptors
  from 3, ``LISTEN_PID``), which the new master reads as it reads systemd's; what each one is
  (a slot's socket, a socket every worker shares, the --metrics port) is said in
  ``WSFLEET_UPGRADE`` (JSON). The sockets are the same open sockets, not new ones: a
  connection queued on a slot's socket is accepted by whichever worker, old or new, takes it,
  so no connection attempt meets a closed port;
- its pidfile's descriptor, whose lock (flock belongs to the open file, which both share) the
  new master then holds even if the old one dies;
- a pipe on which the new master says it is ready, or why it failed: the lines a --daemon
  master writes to its waiting command (control.notify_ready, control.notify_failure);
- a pipe on which the old master says "ok" once it has handed over: only then does the new
  master count the pidfile and the Unix sockets' files as its own (to remove at exit), serve
  the --metrics port and go to its configuration's number of workers. Until then the old
  master may still give up on it (too slow, a shutdown) and go on serving.

The old master decides what follows (arbiter.Fleet): on "ready" it writes the new master's
pid in the pidfile, says "ok", its workers stop accepting and close their connections with
1012 over the drain window, and it exits; on a failure, an exit, or no word within
``config.upgrade_limit`` it keeps serving, and the new master (stopped, if still running) is
reaped. A new master whose old one dies before deciding takes over by itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import sockets

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
    pidfile: str | None = None
    pidfile_fd: int | None = None
    ready_fd: int | None = None  # where the new master says it is ready, or why it failed
    handed_fd: int | None = None  # where the old master says "ok" once it has handed over


def describe(handoff: Handoff) -> tuple[str, list[int], int]:
    """The WSFLEET_UPGRADE value, the descriptors to pass from 3 on, in that order (the
    listening sockets, then the pidfile's and the two pipes'), and LISTEN_FDS: how many of
    them are listening sockets."""
    listening = [s for slot in handoff.slots for s in slot] + [s.sock for s in handoff.shared]
    if handoff.metrics is not None:
        listening.append(handoff.metrics)
    fds = [s.fileno() for s in listening]
    extra = [fd for fd in (handoff.pidfile_fd, handoff.ready_fd, handoff.handed_fd)]
    extra = [fd for fd in extra if fd is not None]
    start = sockets.LISTEN_FDS_START + len(fds)
    where = dict(zip(extra, range(start, start + len(extra)), strict=True))
    text = json.dumps(
        {
            "from": handoff.old_pid,
            "listening": handoff.listening,
            "per_slot": handoff.per_slot,
            "slots": len(handoff.slots),
            "shared": [[s.path, s.inode] for s in handoff.shared],  # (read into files)
            "metrics": handoff.metrics is not None,
            "pidfile": handoff.pidfile,
            "pidfile_fd": where.get(handoff.pidfile_fd),  # type: ignore[arg-type]
            "ready_fd": where.get(handoff.ready_fd),  # type: ignore[arg-type]
            "handed_fd": where.get(handoff.handed_fd),  # type: ignore[arg-type]
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


def take_over() -> Handoff | None:
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
        if len(passed) != slots * len(per_slot) + len(shared_info) + metrics:
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
        )
    except (KeyError, TypeError, ValueError) as exc:
        for sock in passed:
            sock.close()
        raise HandoffError(f"{ENV}: not what an old master hands over ({exc})") from None
    rest = passed[slots * len(per_slot) :]
    for sock, (path, inode) in zip(rest, shared_info, strict=False):
        handoff.shared.append(sockets.SharedListener(sock))  # no file of its own yet
        handoff.files.append((path, inode))
    if metrics:
        handoff.metrics = rest[-1]
    for fd in (handoff.pidfile_fd, handoff.ready_fd, handoff.handed_fd):
        if fd is not None:
            os.set_inheritable(fd, False)
    return handoff
