"""Controlling a running master: its pidfile, its status socket, and stop/reload/status.

The master writes its pid to the pidfile and answers status requests on an abstract Unix
socket named after its pid (``@wsfleet-master-PID``): no file to clean up, no path-length
limit, and a stale pidfile shows itself because nobody answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
from typing import Any


class ControlError(Exception):
    """The pidfile is missing or stale, or the master did not do as asked (exit 1)."""


# The master's side


def status_address(pid: int) -> str:
    return f"\0wsfleet-master-{pid}"


def listen_status(pid: int) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(status_address(pid))
    server.listen(8)
    server.setblocking(False)
    return server


def encode_status(status: dict[str, Any]) -> bytes:
    return json.dumps(status).encode()


def write_pidfile(path: str) -> None:
    """Write our pid, refusing if the file names a master that is still running."""
    try:
        pid = read_pid(path)
    except ControlError:
        pid = None  # missing or unreadable: ours to write
    if pid is not None and pid != os.getpid() and is_master(pid):
        raise ControlError(f"a wsfleet master (pid {pid}) already runs with pidfile {path}")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)  # atomic: a reader never sees half a pid
    except OSError as exc:
        raise ControlError(f"cannot write pidfile {path}: {exc.strerror}") from None


def remove_pidfile(path: str) -> None:
    """Remove the pidfile if it is still ours (a new master may have replaced it)."""
    with contextlib.suppress(ControlError, OSError):
        if read_pid(path) == os.getpid():
            os.unlink(path)


_ready_fd: int | None = None


def set_ready_fd(fd: int | None) -> None:
    """Where --daemon's parent waits for the detached master to be ready (None in workers,
    which close the master's copy)."""
    global _ready_fd
    if fd is None and _ready_fd is not None:
        with contextlib.suppress(OSError):
            os.close(_ready_fd)
    _ready_fd = fd


def notify_ready(address: str) -> None:
    """Tell whoever waits that the master accepts: a --daemon parent, or systemd."""
    global _ready_fd
    if _ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(_ready_fd, f"listening on ws://{address}\n".encode())
            os.close(_ready_fd)
        _ready_fd = None
    target = os.environ.get("NOTIFY_SOCKET")
    if target:
        if target.startswith("@"):
            target = "\0" + target[1:]
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), target)


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
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(status_address(pid))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise ControlError(f"master {pid} did not answer a status request: {exc}") from None
    result: dict[str, Any] = json.loads(b"".join(chunks))
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return f"{master['address']}\n" + "\n".join(line.rstrip() for line in lines)


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


def stop(path: str, timeout: float) -> str:
    pid = master_pid(path)
    os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout):
        raise ControlError(
            f"master {pid} is still running {timeout:g}s after SIGTERM "
            "(its workers may still be draining; raise --timeout, or SIGQUIT it)"
        )
    return f"master {pid} stopped"


def reload(path: str) -> str:
    pid = master_pid(path)
    os.kill(pid, signal.SIGHUP)
    return f"master {pid}: rolling restart started"
