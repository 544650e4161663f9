"""Saying that a master is ready, or why it cannot start: the readiness protocol.

Three listeners, one message each way:

- whoever reads standard error (a script, a test): :func:`ready_line`, ``listening on URL``
  once per address, printed by the master once every worker accepts, and by a lone worker
  (``wsfleet worker``) once it does; :data:`READY` and :data:`LISTENING` parse it;
- a command that waits on a pipe: ``wsfleet start --daemon``'s parent, or an upgrade's old
  master (wsfleet/upgrade.py). The master writes the readiness lines there
  (:func:`notify_ready`) or ``failed STATUS REASON`` (:func:`notify_failure`,
  :data:`FAILED`), then closes it: a command waiting for the end of the pipe also learns
  of a master that died without a word;
- systemd: :func:`sd_notify` sends its notification protocol's lines (READY=1, STATUS=, the
  watchdog's WATCHDOG=1 every :func:`watchdog_interval`) to ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket


def ready_line(url: str) -> str:
    """The line printed once every worker accepts (READY parses it): scripts wait for it."""
    return f"listening on {url}"


READY = re.compile(r"listening on wss?://(\S+):(\d+)")  # a TCP address: host, port
LISTENING = re.compile(r"listening on (\S+)")  # any address, unix:PATH too
FAILED = re.compile(r"failed (\d+) (.*)")  # what a detached master that cannot start says

_ready_fd: int | None = None


def set_ready_fd(fd: int | None) -> None:
    """Where --daemon's parent waits for the detached master to be ready (None in workers,
    which close the master's copy)."""
    global _ready_fd
    if fd is None and _ready_fd is not None:
        with contextlib.suppress(OSError):
            os.close(_ready_fd)
    _ready_fd = fd


def notify_failure(message: str, status: int) -> bool:
    """A detached master that cannot start tells the waiting command why, and its status:
    ``failed STATUS REASON`` on the first line (all that an upgrading master reads), then any
    more lines of the message (an app's traceback). True if a command was told."""
    global _ready_fd
    if _ready_fd is None:
        return False
    told = False
    with contextlib.suppress(OSError):
        os.write(_ready_fd, f"failed {status} {message.rstrip()}\n".encode())
        told = True
    with contextlib.suppress(OSError):
        os.close(_ready_fd)
    _ready_fd = None
    return told


def notify_ready(urls: list[str]) -> None:
    """Tell whoever waits that the master accepts: a --daemon parent, or systemd."""
    global _ready_fd
    if _ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(_ready_fd, "".join(f"{ready_line(url)}\n" for url in urls).encode())
            os.close(_ready_fd)
        _ready_fd = None
    sd_notify(f"READY=1\nMAINPID={os.getpid()}")


def sd_notify(state: str) -> None:
    """Send systemd's notification protocol's state lines to $NOTIFY_SOCKET, if set: one Unix
    datagram, as systemd reads it (a name starting with @ is an abstract socket)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if target:
        if target.startswith("@"):
            target = "\0" + target[1:]
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), target)


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC, when systemd watches this process (WatchdogSec=); else None."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
