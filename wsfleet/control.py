"""Controlling a running master: its pidfile, its status socket, and stop/reload/status.

The master writes its pid to the pidfile and answers status requests on an abstract Unix
socket named after its pid (``@wsfleet-master-PID``): no file to clean up, no path-length
limit, and a stale pidfile shows itself because nobody answers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import time
from typing import Any

from . import logs


class ControlError(Exception):
    """The pidfile is missing or stale, or the master did not do as asked (exit 1)."""


# The master's side


def status_address(pid: int) -> str:
    return f"\0wsfleet-master-{pid}"


def listen_status(pid: int) -> socket.socket | None:
    """The master's status socket; None (logged) if another process holds its name."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(status_address(pid))
    except OSError as exc:
        server.close()
        logging.getLogger("wsfleet.master").error(
            "no status socket: its name %s is taken (%s); `wsfleet status` will refuse "
            "whoever holds it",
            status_address(pid)[1:],
            exc.strerror,
        )
        return None
    server.listen(8)
    server.setblocking(False)
    return server


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def peer_allowed(conn: socket.socket) -> bool:
    """The status socket answers only the master's own user and root."""
    return peer_credentials(conn)[1] in (0, os.getuid())


def encode_status(status: dict[str, Any]) -> bytes:
    return json.dumps(status).encode()


class Pidfile:
    """The master's pidfile, held locked (flock) for its whole life.

    The lock, not the pid in the file, says whether a master runs: a second master with the
    same pidfile fails to take it and names the running pid. The file is opened without
    following a symbolic link, so a link planted where it goes is refused, not written
    through. An upgrade's new master gets the old one's descriptor (``fd``): the lock
    belongs to the open file, which both then share, and the new master writes its pid
    (claim) once it serves.
    """

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self.claimed = False  # the file names this process: it removes the file at exit
        if fd is not None:
            self.fd = fd
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held already: a check
            except OSError as exc:
                raise ControlError(f"pidfile {path}: lock not handed over ({exc})") from None
            return
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ControlError(
                    f"pidfile {path} is a symbolic link: refusing to write through it"
                ) from None
            raise ControlError(f"cannot open pidfile {path}: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            try:
                running = f"pid {read_pid(path)}"
            except ControlError:
                running = "its pid not written yet"
            raise ControlError(
                f"a wsfleet master ({running}) already runs with pidfile {path}"
            ) from None
        self.claim()

    def claim(self, pid: int | None = None) -> None:
        """Write this process's pid (or an upgrade's new master's), in one write that pads
        over a longer pid (a reader never sees an empty file, or the end of an old pid)."""
        size = os.fstat(self.fd).st_size
        os.pwrite(self.fd, f"{pid or os.getpid()}".ljust(size - 1).encode() + b"\n", 0)
        self.claimed = pid is None

    def release(self) -> None:
        """Let go, leaving the file: an upgrade's new master wrote its pid there and holds
        the lock through its own descriptor."""
        os.close(self.fd)

    def close_in_child(self) -> None:
        """A worker must not hold the lock: it would outlive a killed master."""
        os.close(self.fd)

    def remove(self) -> None:
        """Remove the file if it is still ours, then let go of the lock. (An upgrade's new
        master that never served leaves the file to the old one.)"""
        with contextlib.suppress(OSError):
            ours = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino
            if ours and self.claimed and os.pread(self.fd, 16, 0).split() == [b"%d" % os.getpid()]:
                os.unlink(self.path)
        os.close(self.fd)


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


def notify_failure(message: str, status: int) -> None:
    """A detached master that cannot start tells the waiting command why, and its status:
    ``failed STATUS REASON`` on the first line (all that an upgrading master reads), then any
    more lines of the message (an app's traceback)."""
    global _ready_fd
    if _ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(_ready_fd, f"failed {status} {message.rstrip()}\n".encode())
            os.close(_ready_fd)
        _ready_fd = None


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


# The commands' side


def read_pid(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise ControlError(f"no pidfile at {path}: is the master running?") from None
    except OSError as exc:
        raise ControlError(f"cannot read pidfile {path}: {exc.strerror}") from None
    if not text.isdigit():
        raise ControlError(f"pidfile {path} does not hold a pid: {text[:40]!r}")
    return int(text)


def is_master(pid: int) -> bool:
    """Whether pid is a live wsfleet master (not a pid reused by another program)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(b"wsfleet: master")
    except OSError:
        return False


def master_pid(path: str) -> int:
    pid = read_pid(path)
    if not is_master(pid):
        raise ControlError(f"stale pidfile {path}: pid {pid} is not a running wsfleet master")
    return pid


def query_status(pid: int, timeout: float = 5.0) -> dict[str, Any]:
    """Ask master pid for its status; only an answer from that very process is trusted."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(status_address(pid))
            if (peer := peer_credentials(s)[0]) != pid:
                raise ControlError(
                    f"the status socket of master {pid} is held by another process (pid "
                    f"{peer}): not trusting its answer"
                )
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise ControlError(f"master {pid} did not answer a status request: {exc}") from None
    try:
        result: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"master {pid} sent a status that is not JSON (cut short?)") from None
    return result


def format_status(status: dict[str, Any]) -> str:
    master = status["master"]
    rows = [("ROLE", "SLOT", "PID", "STATE", "AGE", "CONNECTIONS")]
    rows.append(("master", "-", str(master["pid"]), master["state"], _age(master["age"]), "-"))
    for w in status["workers"]:
        state = w["state"]
        if w.get("borrowed_slots"):
            state += f" (+slots {','.join(map(str, w['borrowed_slots']))})"
        rows.append(
            ("worker", str(w["slot"]), str(w["pid"]), state, _age(w["age"]), str(w["connections"]))
        )
    for s in status.get("empty_slots", []):
        crashes = logs.plural(s["crashes"], "crash", "crashes")
        state = f"none: restart in {s['restart_in']:g}s after {crashes} at start"
        rows.append(("worker", str(s["slot"]), "-", state, "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    notes = [
        f"connections: as each worker last reported (every {master['heartbeat_interval']:g}s)",
        f"last rolling restart: {master['last_restart']}",
        f"last upgrade: {master.get('last_upgrade', 'not supported')}",
    ]
    body = "\n".join(line.rstrip() for line in lines)
    head = f"wsfleet {master.get('version', 'unknown version')}, {', '.join(master['addresses'])}"
    return f"{head}\n{body}\n" + "\n".join(notes)


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit; True if it did in time."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has exited
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if poller.poll(remaining * 1000):
                return True
        return False
    finally:
        os.close(fd)


def signal_master(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise ControlError(f"master {pid} exited meanwhile") from None
    except PermissionError:
        raise ControlError(
            f"not allowed to signal master {pid}: run this as its user, or as root"
        ) from None


def stop(path: str, timeout: float) -> str:
    pid = master_pid(path)
    signal_master(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout):
        raise ControlError(
            f"master {pid} is still running {timeout:g}s after SIGTERM "
            "(its workers may still be draining; raise --timeout, or SIGQUIT it)"
        )
    return f"master {pid} stopped"


def reload(path: str, wait: bool = False, timeout: float = 300.0) -> str:
    """SIGHUP; with wait, return once that rolling restart is over, or raise with its reason."""
    pid = master_pid(path)
    if not wait:
        signal_master(pid, signal.SIGHUP)
        return f"master {pid}: rolling restart started"
    asked = query_status(pid)["master"]["restarts"] + 1
    signal_master(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        master = query_status(pid)["master"]
        if master["restarts"] >= asked and master["last_restart"] != "in progress":
            break
        if time.monotonic() > deadline:
            raise ControlError(f"master {pid}: the rolling restart is not over after {timeout:g}s")
        time.sleep(0.1)  # the poll interval
    if master["last_restart"] != "done":
        raise ControlError(f"master {pid}: rolling restart {master['last_restart']}")
    return f"master {pid}: rolling restart done: every worker runs the new code"


def upgrade(path: str, timeout: float = 300.0) -> str:
    """SIGUSR2, then wait until a new master from the installed code serves (the pidfile
    names it) or the old one says why not (raised: it goes on serving)."""
    pid = master_pid(path)
    before = query_status(pid)["master"]
    if "upgrades" not in before:  # SIGUSR2 would end it (the signal's default action)
        raise ControlError(
            f"master {pid} runs a wsfleet that cannot be upgraded in place: restart it once"
        )
    asked = before["upgrades"] + 1
    signal_master(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    outcome = None
    while outcome is None:
        try:
            master = query_status(pid)["master"]
        except ControlError:
            if read_pid(path) == pid and is_master(pid):
                raise
            break  # it handed over (the pidfile names the new master), or it is gone
        if master["upgrades"] >= asked and master["last_upgrade"] != "in progress":
            outcome = master["last_upgrade"]
        elif time.monotonic() > deadline:
            raise ControlError(f"master {pid}: the upgrade is not over after {timeout:g}s")
        else:
            time.sleep(0.1)  # the poll interval
    if outcome is not None and not outcome.startswith("done"):
        raise ControlError(f"master {pid}: upgrade {outcome}; it goes on serving")
    new = read_pid(path)
    if new == pid or not is_master(new):
        raise ControlError(f"master {pid} exited during the upgrade; see its log")
    version = query_status(new)["master"]["version"]
    return (
        f"master {pid} upgraded: master {new} (wsfleet {version}) serves; the old workers "
        f"close their connections with 1012 over the drain window, then master {pid} exits"
    )
