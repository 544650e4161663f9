"""Rolling restart of wsfleet workers run by supervisord, one process at a time.

    wsfleet rolling-restart conf/supervisord.conf [--port 8765] [--timeout 60]

For each process of the configuration, in order: send it SIGHUP through supervisord (what
`supervisorctl signal HUP NAME` does). A lone `wsfleet worker` takes HUP as "you are being
restarted": it stops accepting at once (its listener closes then, so nothing waits on it),
closes its connections with 1012 (service restart) over its drain, and exits 0; supervisord's
`autorestart` starts the new process (or this starts it, where the configuration does not
restart a clean exit). Then wait until supervisord reports it RUNNING with a new pid, that pid
holds a listening socket on the port, and the port answers the health path with 200. Only then
the next one. Exits 1 with a message naming the process if one does not come back in time, so
that a deployment stops before it takes down the rest.

Why a signal rather than `supervisorctl restart`: a restart is a stop (TERM) and then a start,
and a process cannot tell that TERM from `supervisorctl stop`, after which clients must hear
1001 (going away), not 1012. `supervisorctl restart` also waits in turns of a second or more
of supervisord's; this talks to supervisord over its XML-RPC interface, as supervisorctl does
(same [supervisorctl] section, same socket and credentials), and asks for the state every
POLL seconds, so each step takes what the drain and supervisord's `startsecs` take.

The port defaults to WSFLEET_PORT, else 8765, as the workers themselves read it. Needs
supervisor in the same environment (pip install '.[supervisor]' from wsfleet's checkout).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import os
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Sequence
from typing import Any

POLL = 0.05  # seconds between two looks at a process's state; each is one XML-RPC request
ALREADY_STARTED = 60  # supervisor.xmlrpc.Faults


class Problem(Exception):
    """A process did not come back, or supervisord cannot be asked: the message says which."""


class Supervisord:
    """supervisord's XML-RPC interface, found as supervisorctl finds it: from the
    [supervisorctl] section of the configuration (server URL, user name, password)."""

    def __init__(self, conf: str, prog: str) -> None:
        from supervisor.options import ClientOptions

        if not os.path.isfile(conf):
            raise Problem(f"{conf}: no such configuration file")
        options = ClientOptions()
        options.realize(args=["-c", conf, "status"], progname=prog)  # exit 2 on a bad file
        self.url: str = options.serverurl
        self.rpc = options.getServerProxy().supervisor

    def call(self, method: str, *args: Any) -> Any:
        """One XML-RPC call; Problem, with what to check, if supervisord cannot be reached."""
        try:
            return getattr(self.rpc, method)(*args)
        except OSError as exc:
            raise Problem(
                f"cannot reach supervisord at {self.url} ({exc.strerror or exc}): is it running "
                "with this configuration? (supervisord -c CONF)"
            ) from None
        except xmlrpc.client.ProtocolError as exc:
            raise Problem(
                f"supervisord at {self.url} refused {method}: {exc.errcode} {exc.errmsg}"
            ) from None

    def processes(self) -> dict[str, tuple[str, int | None]]:
        """group:name -> (state, pid) for every process supervisord runs."""
        return {
            f"{p['group']}:{p['name']}": (p["statename"], p["pid"] or None)
            for p in self.call("getAllProcessInfo")
        }

    def state_of(self, name: str) -> tuple[str, int | None]:
        info = self.call("getProcessInfo", name)
        return info["statename"], info["pid"] or None

    def start(self, name: str) -> None:
        """Start a process that is not running, without waiting (the caller watches its
        state); one that supervisord has started meanwhile (autorestart) is fine."""
        try:
            self.call("startProcess", name, False)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode != ALREADY_STARTED:
                raise Problem(f"{name}: supervisord cannot start it: {exc.faultString}") from None


def listens(pid: int, port: int) -> bool:
    """Whether the process holds a listening TCP socket on the port (bound or inherited):
    its socket descriptors' inodes, looked up in the kernel's tables of TCP sockets."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    inodes = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)  # the header
            for row in rows:
                fields = row.split()  # local address, state (0A: LISTEN), inode
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    return True
    return False


def healthy(host: str, port: int, path: str) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def wait(condition: Callable[[], bool], deadline: float) -> bool:
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def restart(sv: Supervisord, name: str, args: argparse.Namespace) -> str:
    """Restart one process and wait until it is back; what happened, or Problem."""
    deadline = time.monotonic() + args.timeout
    old_state, old_pid = sv.state_of(name)
    if old_state == "RUNNING":
        try:
            sv.call("signalProcess", name, "HUP")
        except xmlrpc.client.Fault as exc:  # it exited in between: start it, as below
            if old_pid is not None and sv.state_of(name)[1] == old_pid:
                raise Problem(f"{name}: supervisord cannot signal it: {exc.faultString}") from None
    elif old_state in ("STOPPED", "EXITED", "FATAL"):
        sv.start(name)  # as `supervisorctl restart` would: nothing to drain
    # (STARTING, BACKOFF: supervisord is starting it already, on the code there is now.)
    state, pid = old_state, old_pid

    def back() -> bool:
        nonlocal state, pid
        state, pid = sv.state_of(name)
        if state == "EXITED":
            # The old process drained and exited 0, and supervisord does not restart a clean
            # exit with `autorestart = unexpected`; with `true` it has, or is about to.
            sv.start(name)
        elif state == "STOPPED":
            raise Problem(f"{name} was stopped during its restart (supervisorctl stop?)")
        # (A process that was STARTING becomes RUNNING with the same pid.)
        replaced = pid != old_pid or old_state != "RUNNING"
        return (state == "RUNNING" and replaced) or state == "FATAL"

    if not wait(back, deadline) or state != "RUNNING":
        if pid == old_pid and state in ("RUNNING", "STOPPING"):
            raise Problem(
                f"{name} (pid {old_pid}) has not exited {args.timeout:g}s after SIGHUP: its "
                "connections have not closed yet (--drain-window, --graceful-timeout), or its "
                "event loop is blocked; its log has the reason"
            )
        raise Problem(
            f"{name} is not RUNNING with a new pid after {args.timeout:g}s but {state}; its log "
            "has the reason"
        )
    assert pid is not None
    new_pid = pid
    if not wait(lambda: listens(new_pid, args.port), deadline):
        raise Problem(f"{name} (pid {new_pid}) does not listen on port {args.port}")
    if not wait(lambda: healthy(args.host, args.port, args.health_path), deadline):
        raise Problem(f"{args.host}:{args.port}{args.health_path} does not answer 200 after {name}")
    if old_state == "RUNNING":
        return f"pid {old_pid} -> {new_pid}"
    return f"was {old_state}, now RUNNING, pid {new_pid}"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line (docs/options.md is written from it)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Restart supervisord's wsfleet workers one by one: SIGHUP to each (its "
        "clients get 1012, service restart), then wait until supervisord has it RUNNING again "
        "with a new pid that listens on the port, and the port answers the health path.",
    )
    parser.add_argument("conf", help="the supervisord configuration file")
    parser.add_argument("--host", default="127.0.0.1", help="where to probe the health path")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="the workers' port (default: $WSFLEET_PORT, else 8765, as the workers read it)",
    )
    parser.add_argument(
        "--health-path", default="/health/", metavar="PATH", help="the workers' health path"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds each process may take to drain and come back",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.port is None:
        args.port = int(os.environ.get("WSFLEET_PORT", 8765))
    if importlib.util.find_spec("supervisor") is None:
        print(
            "rolling-restart: needs supervisor in this environment: "
            "pip install supervisor (from wsfleet's checkout: pip install '.[supervisor]')",
            file=sys.stderr,
        )
        return 2
    try:
        sv = Supervisord(args.conf, prog or "rolling-restart")
        names = sorted(sv.processes())
        if not names:
            print(f"rolling-restart: no processes in {args.conf}", file=sys.stderr)
            return 1
        for name in names:
            began = time.monotonic()
            try:
                done = restart(sv, name, args)
            except Problem as exc:
                raise Problem(f"{exc}; stopping here") from None
            print(f"{name}: {done} ({time.monotonic() - began:.2f}s)", flush=True)
    except Problem as exc:
        print(f"rolling-restart: {exc}", file=sys.stderr)
        return 1
    return 0
