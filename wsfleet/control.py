"""Controlling a running master: its pidfile, its status socket, and stop/reload/status.

The master writes its pid to the pidfile, when it has one, and answers status requests on an
abstract Unix socket named after its pid (``@wsfleet-master-PID``): no file to clean up, no
path-length limit, and a stale pidfile shows itself because nobody answers.

A control command finds its master (:class:`Locator`) by the pidfile when one is given, else
by address: the master of this user whose process title lists the address the command is
given (``wsfleet start`` and ``wsfleet status`` read the same --host/--port/--bind, their
``WSFLEET_*`` variables and --config), so that ``wsfleet start`` needs no pidfile for
``wsfleet status`` to find it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import logs, relay
from .config import MEMORY_INTERVAL, STEER_INTERVAL, Address, parse_address
from .hub import STATS_INTERVAL
from .privileges import peer_credentials
from .topics import check_message, check_topic


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


TITLE = b"wsfleet: master ["  # how a master's title starts; its addresses follow


@dataclass(frozen=True)
class Locator:
    """Which master a control command (stop, reload, upgrade, status) means.

    With a pidfile (--pidfile, ``WSFLEET_PIDFILE``, pidfile in --config): the master it
    names. Without one, discovery by address: the running wsfleet master of this user
    (effective uid) that listens on one of ``addresses``, those --host/--port or --bind say,
    as given to ``wsfleet start``. A master's process title lists its addresses as it
    listens on them: a port 0 as the port the kernel chose, a host name resolved, the
    sockets socket activation passed, and after an upgrade the same as before. So no
    default pidfile is needed: nothing goes stale after a kill -9, nothing in a shared
    directory can be squatted on or swapped for a symbolic link, and a master is found
    however it was started (--daemon, systemd, a login session since closed, several
    --bind: any one of them). Only this user's processes count: they are as trusted as the
    user who runs the command, and the only ones it may signal (root: root's own; give the
    pidfile of another user's master). A master bound to 0.0.0.0 or [::] serves every
    address of that family on its port, and is found by any of them.

    During an upgrade two masters list the same addresses; the one in charge is meant:
    the old one until it hands over (the new one is its child), then the new one (the old
    one is stopping).
    """

    pidfile: str | None = None
    addresses: tuple[Address, ...] = ()

    def pid(self) -> int:
        """The master's pid; ControlError says what was looked for, and how to point at it."""
        if self.pidfile is not None:
            return master_pid(self.pidfile)
        return self.discover()

    def names(self, pid: int) -> bool:
        """Whether this still means master pid (an upgrade's old master, asked again)."""
        if self.pidfile is not None:
            return read_pid(self.pidfile) == pid and is_master(pid)
        return is_master(pid) and self.discover(exclude=pid, missing_ok=True) == 0

    def discover(self, exclude: int = 0, missing_ok: bool = False) -> int:
        masters = [(pid, addrs) for pid, addrs in running_masters() if pid != exclude]
        wanted = [_comparable(a) for a in self.addresses]
        found = [pid for pid, addrs in masters if any(serves(h, w) for h in addrs for w in wanted)]
        if len(found) > 1:
            found = in_charge(found)
        if len(found) == 1:
            return found[0]
        if missing_ok and not found:
            return 0
        where = ", ".join(map(str, self.addresses))
        if found:
            raise ControlError(
                f"several wsfleet masters listen on {where}: pids {', '.join(map(str, found))}; "
                "give the one you mean by its --pidfile, or signal it"
            )
        user = _user()
        hint = _hint(masters, user)
        raise ControlError(f"no wsfleet master of user {user} listens on {where}{hint}")


def _hint(masters: list[tuple[int, list[Address]]], user: str) -> str:
    """What the error says after "no master listens on ...": which ones run, and how to
    point at one."""
    listed = [f"pid {pid} on {', '.join(map(str, addrs)) or '?'}" for pid, addrs in masters]
    running = "; ".join(listed[:5]) + (f"; {len(listed) - 5} more" if len(listed) > 5 else "")
    return (
        f" ({'its masters: ' + running if masters else user + ' runs none'}); give the "
        "address the master listens on, as given to `wsfleet start` (--host/--port or "
        "--bind; WSFLEET_HOST, WSFLEET_PORT, WSFLEET_BIND; or --config FILE) with the port "
        "its 'listening on' line shows, or its --pidfile"
    )


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def running_masters() -> list[tuple[int, list[Address]]]:
    """(pid, addresses) of every running wsfleet master of this user (effective uid), from
    the process titles: ``wsfleet: master [ADDRESS, ...]``. A relative Unix socket path is
    made absolute from the master's working directory."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0]
            if not title.startswith(TITLE) or _effective_uid(name) != os.geteuid():
                continue
            text = title[len(TITLE) :].decode(errors="replace")
            addresses = []
            for item in text.rpartition("]")[0].split(", ") if "]" in text else []:
                with contextlib.suppress(ValueError):
                    address = parse_address(item)
                    if address.path and not address.path.startswith(("/", "@")):
                        cwd = os.readlink(f"/proc/{name}/cwd")
                        address = Address(path=os.path.join(cwd, address.path))
                    addresses.append(address)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append((int(name), addresses))
    return sorted(found)


def _effective_uid(pid: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[2])
    return -1


def _comparable(address: Address) -> Address:
    """An address as a master's title shows it: a host resolved, a path absolute."""
    from .sockets import numeric

    if address.path is None:
        return numeric(address)
    if address.path.startswith("@"):
        return address
    return Address(path=os.path.abspath(address.path))


def serves(have: Address, wanted: Address) -> bool:
    """Whether a master listening on ``have`` serves ``wanted`` (both as _comparable makes
    them): the same address, the same Unix socket file, or a wildcard host (0.0.0.0, [::])
    on the same port. Port 0 names no master: a master listens on the port it got."""
    if have.path is not None or wanted.path is not None:
        if have.path is None or wanted.path is None:
            return False
        if have.path.startswith("@") or wanted.path.startswith("@"):
            return have.path == wanted.path
        return os.path.realpath(have.path) == os.path.realpath(wanted.path)
    if have.port != wanted.port or wanted.port == 0:
        return False
    if have.host == wanted.host:
        return True
    try:
        host, other = ipaddress.ip_address(have.host), ipaddress.ip_address(wanted.host)
    except ValueError:
        return False
    return host == other or (host.is_unspecified and host.version == other.version)


def in_charge(pids: list[int]) -> list[int]:
    """Of several masters on the same address (an upgrade in progress), the one in charge:
    not one that is stopping (an old master that handed over), not one whose parent is
    among them (a new master its old one has not handed over to yet)."""
    states = {}
    for pid in pids:
        try:
            states[pid] = query_status(pid, timeout=2.0)["master"]["state"]
        except (ControlError, KeyError, TypeError):
            states[pid] = "unknown"
    serving = [pid for pid in pids if states[pid] != "stopping"] or pids
    return [pid for pid in serving if _parent(pid) not in serving]


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def locator(master: str | Locator) -> Locator:
    """A pidfile's path (as callers before discovery by address pass it) or a Locator."""
    return master if isinstance(master, Locator) else Locator(pidfile=master)


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


def publish(locator: Locator, topic: str, message: str | bytes, timeout: float) -> int:
    """``wsfleet publish``: the message sequenced by the master's hub, as wsfleet.publish()
    in a worker; its offset. TypeError or ValueError for a bad topic or message (the
    master's --max-size), ControlError when no master or hub answers, or the broker is
    unavailable (the hub's reason). The hub is the one
    the status names, and only an answer from its pid is trusted."""
    check_topic(topic)
    pid = locator.pid()
    status = query_status(pid)
    hub = status.get("hub") or {}
    if not hub.get("address") or not hub.get("pid"):
        raise ControlError(
            f"master {pid} has no hub running (it is starting or replacing it, or it is an "
            "older wsfleet): publish again"
        )
    data = relay.payload(check_message(message, hub["max_size"]))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect("\0" + hub["address"][1:])
            if (peer := peer_credentials(s)[0]) != hub["pid"]:
                raise ControlError(
                    f"the hub's socket of master {pid} is held by another process (pid "
                    f"{peer}): not publishing there"
                )
            s.sendall(relay.encode_publish(1, topic, data))
            reader = relay.Reader()
            while chunk := s.recv(65536):
                for frame in reader.feed(chunk):
                    fields = relay.Fields(frame.body)
                    if frame.kind == relay.ACK and fields.integer() == 1:
                        return fields.integer()
                    if frame.kind == relay.FAILED and fields.integer() == 1:
                        reason = fields.rest().decode(errors="replace")
                        raise ControlError(f"not published: {reason}")
        except (OSError, relay.ProtocolError) as exc:
            raise ControlError(f"the hub of master {pid} did not answer: {exc}") from None
    raise ControlError(
        f"the hub of master {pid} closed before acknowledging the message (replaced "
        "meanwhile?): it may not have been published; publish again"
    )


def format_status(status: dict[str, Any]) -> str:
    master = status["master"]
    # (--max-worker-memory: each worker's USS; an older master, or the bound off: no column)
    memory = bool(master.get("max_worker_memory"))
    rows = [("ROLE", "SLOT", "PID", "STATE", "AGE", "CONNECTIONS") + ("MEMORY",) * memory]
    rows.append(
        ("master", "-", str(master["pid"]), master["state"], _age(master["age"]), "-")
        + ("-",) * memory
    )
    for w in status["workers"]:
        state = w["state"]
        if w.get("borrowed_slots"):
            state += f" (+slots {','.join(map(str, w['borrowed_slots']))})"
        used = w.get("memory")
        rows.append(
            ("worker", str(w["slot"]), str(w["pid"]), state, _age(w["age"]), str(w["connections"]))
            + ((f"{used / 2**20:.0f} MiB" if used is not None else "-"),) * memory
        )
    if (hub := status.get("hub")) is not None:  # (None: an older master)
        pid, age = hub["pid"], hub["age"]
        state = "running" if pid else "starting"
        if hub["restarts"]:
            state += f" (replaced {logs.plural(hub['restarts'], 'time')})"
        rows.append(
            ("hub", "-", str(pid or "-"), state, _age(age) if age is not None else "-", "-")
            + ("-",) * memory
        )
    for s in status.get("empty_slots", []):
        crashes = logs.plural(s["crashes"], "crash", "crashes")
        state = f"none: restart in {s['restart_in']:g}s after {crashes} at start"
        rows.append(("worker", str(s["slot"]), "-", state, "-", "-") + ("-",) * memory)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    reported = f"every {master['heartbeat_interval']:g}s"
    if (master.get("balance") or {}).get("mode") == "least-connections":  # (counts steer)
        reported = f"within {STEER_INTERVAL:g}s of a change, {reported} at least"
    notes = [
        f"connections: as each worker last reported ({reported})",
        f"last rolling restart: {_restart_line(master)}",
        f"last upgrade: {_upgrade_line(master)}",
    ]
    if memory:
        notes.insert(
            1,
            f"memory: each worker's own (USS), read every {MEMORY_INTERVAL:g}s; over "
            f"{master['max_worker_memory']} MiB a worker is replaced",
        )
    if (pubsub := status.get("pubsub")) is not None:  # (None: an older master)
        notes.append(
            f"pub/sub: {logs.plural(pubsub['topics'], 'topic')} subscribed, "
            f"{logs.plural(pubsub['subscriptions'], 'subscription')}; "
            f"{pubsub['published']} published, {pubsub['delivered']} delivered, "
            f"{pubsub['dropped_subscribers']} slow subscribers closed (as last reported, "
            f"every {STATS_INTERVAL:g}s)"
        )
    if broker := status.get("broker"):  # (None: no --broker, or an older master)
        since = broker["since"]
        age = f" for {_age(time.time() - since)}" if since is not None else ""
        notes.append(f"broker: {broker['address']} {broker['state']}{age}")
    if master.get("admin"):
        notes.append(f"admin API: POST {master['admin']}publish/TOPIC")
    if "log_file" in master:
        notes.append(f"log: {master['log_file'] or 'standard error'}")
    body = "\n".join(line.rstrip() for line in lines)
    head = f"wsfleet {master.get('version', 'unknown version')}, {', '.join(master['addresses'])}"
    return f"{head}\n{body}\n" + "\n".join(notes)


def _restart_line(master: dict[str, Any]) -> str:
    """The last rolling restart, and the old workers it leaves while they close."""
    outcome = master.get("reload")
    if outcome is None:  # a master of an older wsfleet: its sentence
        return str(master["last_restart"])
    text = outcome_text(outcome)
    if outcome["kind"] in ("in_progress", "done") and outcome.get("old_workers"):
        text += f"; {_old_workers(outcome)}"
    return text


def _upgrade_line(master: dict[str, Any]) -> str:
    """The last upgrade, from its data (a master of an older wsfleet: its sentence)."""
    if "upgrade" in master:
        return upgrade_text(master["upgrade"])
    return str(master.get("last_upgrade", "not supported"))


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


def stop(master: str | Locator, timeout: float) -> str:
    pid = locator(master).pid()
    signal_master(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout):
        raise ControlError(
            f"master {pid} is still running {timeout:g}s after SIGTERM "
            "(its workers may still be draining; raise --timeout, or SIGQUIT it)"
        )
    return f"master {pid} stopped"


# What `wsfleet reload --wait` waits for: "drained" (the default) until the workers from
# before the reload are gone, "serving" until every slot serves the new code.
WAIT_UNTIL = ("drained", "serving")


def outcome_text(reload: dict[str, Any]) -> str:
    """The last rolling restart (the status's "reload") in words, for `wsfleet status`."""
    kind, detail = reload["kind"], reload.get("detail")
    text = {
        "none": "none yet",
        "in_progress": "in progress",
        "done": "done" + (f" with the old configuration: {detail}" if detail else ""),
        "stopped": f"stopped by {detail}",
    }.get(kind, f"{kind}: {detail}")  # failed, refused
    return text


def upgrade_text(upgrade: dict[str, Any]) -> str:
    """The last upgrade (the status's "upgrade") in words, for `wsfleet status`."""
    if upgrade["kind"] == "done":
        return f"done: master {upgrade.get('new_master')} serves"
    return outcome_text(upgrade)  # none yet, in progress, failed/refused: why, stopped by


def _old_workers(reload: dict[str, Any]) -> str:
    """ "N old workers (C connections) still run(s) the old code"."""
    count, conns = reload.get("old_workers", 0), reload.get("old_connections", 0)
    workers = "1 old worker" if count == 1 else f"{count} old workers"
    connections = "1 connection" if conns == 1 else f"{conns} connections"
    runs = "runs" if count == 1 else "run"
    return f"{workers} ({connections}) still {runs} the old code"


def reload(
    master: str | Locator,
    wait: str | None = None,
    timeout: float = 300.0,
    say: Callable[[str], None] | None = None,
) -> str:
    """SIGHUP. With wait, follow that rolling restart: it has two moments, when every slot
    serves the new code (its new worker is ready; the old workers stop accepting) and when
    the old workers (forked before the SIGHUP: held, then closing their connections with
    1012 over the drain window) have exited. ``say`` hears the first; with wait "drained"
    this returns at the second, with "serving" at the first. A reload that failed, was
    refused or stopped raises with its reason, as does one done with the old
    configuration (the file could not be re-read). Never says "done" while a worker that
    runs the old code is left."""
    pid = locator(master).pid()
    if not wait:
        signal_master(pid, signal.SIGHUP)
        return f"master {pid}: rolling restart started"
    if wait not in WAIT_UNTIL:
        raise ValueError(f"wait: expected one of {', '.join(WAIT_UNTIL)}, got {wait!r}")
    before = query_status(pid)["master"]
    if "reload" not in before:
        raise ControlError(
            f"master {pid} runs a wsfleet ({before.get('version', 'older')}) that does not "
            "report when its old workers are gone: reload without --wait, or restart it once"
        )
    asked = before["restarts"] + 1
    began = time.monotonic()
    signal_master(pid, signal.SIGHUP)
    serving: str | None = None  # what was said when every slot served the new code
    while True:
        state = query_status(pid)["master"]
        outcome = state["reload"]
        if state["restarts"] >= asked and outcome["kind"] != "in_progress":
            if outcome["kind"] != "done":
                raise ControlError(f"master {pid}: rolling restart {outcome_text(outcome)}")
            if serving is None:
                serving = f"master {pid}: every slot serves the new code after " + (
                    f"{time.monotonic() - began:.1f}s"
                )
                if outcome["old_workers"]:
                    serving += f"; {_old_workers(outcome)}"
                if wait == "drained" and say is not None:
                    say(serving)
            if wait == "serving" or not outcome["old_workers"]:
                break
        if time.monotonic() - began > timeout:
            left = f": {_old_workers(outcome)}" if serving else ""
            raise ControlError(
                f"master {pid}: the rolling restart is not over after {timeout:g}s{left}"
            )
        time.sleep(0.1)  # the poll interval
    if outcome.get("detail"):
        raise ControlError(f"master {pid}: rolling restart {outcome_text(outcome)}")
    if wait == "serving":
        assert serving is not None
        if outcome["old_workers"]:
            serving += " (`wsfleet status` shows when the old workers are gone)"
        return serving
    return (
        f"master {pid}: rolling restart done: the old workers are gone, every worker runs "
        f"the new code ({time.monotonic() - began:.1f}s)"
    )


def upgrade(master: str | Locator, timeout: float = 300.0) -> str:
    """SIGUSR2, then wait until a new master from the installed code serves (the pidfile
    names it, or it listens on the addresses) or the old one says why not (raised: it goes
    on serving)."""
    where = locator(master)
    pid = where.pid()
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
            state = query_status(pid)["master"]
        except ControlError:
            if where.names(pid):
                raise
            if where.pidfile is None and is_master(pid) and time.monotonic() < deadline:
                # Found by address, the old master is not "the one meant" once its new one
                # lists the same address; while it lives, its answer is the outcome.
                time.sleep(0.1)
                continue
            break  # it handed over (the new master is the one meant now), or it is gone
        if state["upgrades"] >= asked and (done := _upgrade_over(state)) is not None:
            outcome = done
        elif time.monotonic() > deadline:
            raise ControlError(f"master {pid}: the upgrade is not over after {timeout:g}s")
        else:
            time.sleep(0.1)  # the poll interval
    if outcome is not None and outcome[0] != "done":
        raise ControlError(f"master {pid}: upgrade {outcome[1]}; it goes on serving")
    try:
        new = read_pid(where.pidfile) if where.pidfile else where.discover(exclude=pid)
    except ControlError:
        new = pid
    if new == pid or not is_master(new):
        raise ControlError(f"master {pid} exited during the upgrade; see its log")
    version = query_status(new)["master"]["version"]
    return (
        f"master {pid} upgraded: master {new} (wsfleet {version}) serves; the old workers "
        f"close their connections with 1012 over the drain window, then master {pid} exits"
    )


def _upgrade_over(master: dict[str, Any]) -> tuple[str, str] | None:
    """The last upgrade's kind and words once it is over, else None. A master of an older
    wsfleet (upgraded by this command: the one installed now) says it in words only."""
    if "upgrade" in master:
        upgrade = master["upgrade"]
        if upgrade["kind"] == "in_progress":
            return None
        return upgrade["kind"], upgrade_text(upgrade)
    text = str(master["last_upgrade"])
    if text == "in progress":
        return None
    return ("done" if text.startswith("done") else "not done"), text
