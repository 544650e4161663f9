"""The master-worker channel: small JSON messages over a SOCK_SEQPACKET socketpair.

SEQPACKET keeps message boundaries (no framing code) and carries file descriptors with
SCM_RIGHTS, which is how the master lends a slot's listening socket to a healthy worker.

Worker to master: ``ready`` (accepting), ``hb`` (heartbeat with the open-connection count, sent
by the worker's event loop itself, so a blocked loop goes quiet, and with --metrics its
counts so far), ``held`` and ``draining`` (it stopped accepting; ``draining`` says over how
many seconds it sends its closes), ``error`` (why it cannot start, with the app's traceback).
Master to worker: ``drain`` (with the close code), ``hurry`` (close everything now: a second
TERM), ``hold`` (a rolling restart replaced it), ``adopt`` (a lent socket, with its
descriptor) and ``release`` (give it back).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

MAX_MESSAGE = 16384

Message = dict[str, Any]


def pair() -> tuple[socket.socket, socket.socket]:
    """(master end, worker end), both non-blocking."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master.setblocking(False)
    worker.setblocking(False)
    return master, worker


def send(sock: socket.socket, message: Message, fds: Sequence[int] = ()) -> bool:
    """Send one message; False when the peer is gone or its buffer is full."""
    data = json.dumps(message, separators=(",", ":")).encode()
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)
    except OSError:  # BlockingIOError, BrokenPipeError, ConnectionResetError...
        return False
    return True


def error(message: str, details: str = "") -> Message:
    """A worker's ``error`` message: why it cannot start, in one line, and the traceback of
    its app's import (``details``), cut from the top to fit in one message: the frames
    nearest the error are the ones that tell."""
    report: Message = {"t": "error", "message": message[:1000], "details": details}
    while len(json.dumps(report, separators=(",", ":"))) > MAX_MESSAGE and report["details"]:
        lines = report["details"].splitlines()
        report["details"] = "\n".join(["[earlier lines cut]", *lines[len(lines) // 2 + 1 :]])
        if len(lines) <= 2:
            report["details"] = ""
    return report


def receive(sock: socket.socket) -> tuple[Message | None, list[int]]:
    """Receive one message and any descriptors with it; (None, []) at end of stream.

    Raises BlockingIOError when nothing is waiting.
    """
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    except (ConnectionResetError, BrokenPipeError):
        return None, []
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
        message = {"t": "garbled", "data": data[:80].decode(errors="replace")}
    return message, list(fds)


class BadMessage(ValueError):
    """A worker's message that does not follow the protocol (the master logs and ignores it)."""


# What each kind a worker sends must carry: the field and its type.
_WORKER_MESSAGES: dict[str, dict[str, type]] = {
    "ready": {},
    "draining": {},  # it stopped accepting (a drain asked for, or a SIGTERM from outside)
    "held": {},  # it stopped accepting, as a rolling restart asked ("hold")
    "released": {"slot": int},  # it stopped accepting on a lent slot ("release"), and closed it
    "hb": {"conns": int},
    "error": {"message": str},
}


def _counts(report: object) -> bool:
    """A heartbeat's "n" (counts.Counts.report): two maps of counts, two counts."""

    def count(value: object) -> bool:  # (a float of it must not overflow at a scrape)
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63

    def counts(value: object) -> bool:
        return (
            isinstance(value, dict)
            and len(value) <= 100
            and all(isinstance(k, str) and len(k) <= 8 and count(v) for k, v in value.items())
        )

    return (
        isinstance(report, dict)
        and set(report) == {"h", "c", "i", "o"}
        and counts(report["h"])
        and counts(report["c"])
        and count(report["i"])
        and count(report["o"])
    )


def validate(message: object) -> Message:
    """Check a message from a worker against the protocol; BadMessage says what is wrong."""
    if not isinstance(message, dict):
        raise BadMessage(f"not an object: {message!r:.80}")
    kind = message.get("t")
    fields = _WORKER_MESSAGES.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise BadMessage(f"unknown kind {kind!r:.40}")
    for name, kind_of in fields.items():
        value = message.get(name)
        if (
            not isinstance(value, kind_of)
            or isinstance(value, bool)
            or (isinstance(value, int) and value < 0)
        ):
            raise BadMessage(f"{kind!r} message with a bad {name!r}: {value!r:.40}")
    if kind == "draining" and "over" in message:
        over = message["over"]
        if not isinstance(over, int | float) or isinstance(over, bool) or not 0 <= over < 1e9:
            raise BadMessage(f"'draining' message with a bad 'over': {over!r:.40}")
    if kind == "error" and not isinstance(message.get("details", ""), str):
        message["details"] = ""  # the line still tells why
    if kind == "hb" and "acc" in message:
        accepted = message["acc"]
        if not isinstance(accepted, int) or isinstance(accepted, bool) or accepted < 0:
            raise BadMessage(f"'hb' message with a bad 'acc': {accepted!r:.40}")
    if kind == "hb" and "n" in message and not _counts(message["n"]):
        # The heartbeat still counts (a worker is not killed for its counts); they do not.
        message["bad_counts"] = repr(message.pop("n"))[:60]
    return message
