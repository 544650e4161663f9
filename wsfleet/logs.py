"""Logging set-up shared by the master and the workers, log-file reopening on USR1, and
counted nouns for messages."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TextIO


def plural(count: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun in the form the count takes, for messages: "1 worker", "2 workers"
    (a noun such as "process" needs its plural given)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"

_handler: logging.StreamHandler[TextIO] | None = None
_path: str | None = None
_std_streams = False  # stdout and stderr are the log file too (a --daemon master's fleet)


def setup(level: str, path: str | None) -> None:
    """Send wsfleet's and websockets' logs to stderr or to an appended file.

    websockets logs every connection opening and closing at INFO: that is a flood at fleet
    scale, so its loggers stay at WARNING unless the level is debug.
    """
    global _handler, _path
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    _path = path
    _handler = logging.StreamHandler(_open(path) if path else sys.stderr)
    _handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(_handler)
    root.setLevel(level.upper())
    quiet = logging.DEBUG if level == "debug" else logging.WARNING
    logging.getLogger("websockets").setLevel(max(quiet, root.level))


def _open(path: str) -> TextIO:
    return open(path, "a", buffering=1, encoding="utf-8")


def reopen() -> None:
    """Reopen the log file, as after logrotate moved it (USR1). A no-op for stderr."""
    if _handler is None or _path is None:
        return
    try:
        stream = _open(_path)
    except OSError as exc:  # a removed directory, a wrong owner: keep writing where we were
        logging.getLogger("wsfleet").error(
            "cannot reopen log file %s (%s): still writing to the old one", _path, exc.strerror
        )
        return
    _handler.acquire()
    try:
        old, _handler.stream = _handler.stream, stream
    finally:
        _handler.release()
    if _std_streams:
        with contextlib.suppress(OSError):
            os.dup2(stream.fileno(), 1)
            os.dup2(stream.fileno(), 2)
    with contextlib.suppress(OSError):  # flushing what the old one held can fail (disk full)
        old.close()
    logging.getLogger("wsfleet").info("reopened log file %s", _path)


def redirect_std_streams() -> bool:
    """Point stdout and stderr at the log file, if logs go to one: a detached master's are
    nobody's, and what is written there (a traceback from a forked child, a warning) is
    then logged too. reopen() moves them to the new file with the logs. False without a
    log file (nothing done)."""
    global _std_streams
    if _handler is None or _path is None:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(_handler.stream.fileno(), 1)
    os.dup2(_handler.stream.fileno(), 2)
    _std_streams = True
    return True


def reopen_if_moved() -> None:
    """Reopen if the path now names another file: a process that ignored USR1 while it
    started (a new worker) may have missed a rotation."""
    if _handler is None or _path is None:
        return
    try:
        moved = os.stat(_path).st_ino != os.fstat(_handler.stream.fileno()).st_ino
    except OSError:
        moved = True
    if moved:
        reopen()
