"""Rolling restart of wsfleet workers run by supervisord, one process at a time.

    wsfleet rolling-restart conf/supervisord.conf [--port 8765] [--timeout 60]

For each process of the configuration, in order: `supervisorctl restart` it, then wait until
supervisord reports it RUNNING with a new pid, that pid holds a listening socket on the port,
and the port answers the health path with 200. Only then the next one. Exits 1 with a
message naming the process if one does not come back in time, so that a deployment stops
before it takes down the rest.

The port defaults to WSFLEET_PORT, else 8765, as the workers themselves read it. Needs
supervisor in the same environment (pip install '.[supervisor]' from wsfleet's checkout).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

STATUS = re.compile(r"^(\S+)\s+(\S+)\s+(?:pid (\d+),)?")


def supervisorctl(conf: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", conf, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def processes(conf: str) -> dict[str, tuple[str, int | None]]:
    """name -> (state, pid) for every process supervisord runs."""
    result = supervisorctl(conf, "status")
    if result.returncode not in (0, 3):  # 3: some process is not RUNNING
        raise SystemExit(f"rolling-restart: supervisorctl status failed: {result.stdout.strip()}")
    found = {}
    for line in result.stdout.splitlines():
        if m := STATUS.match(line):
            found[m.group(1)] = (m.group(2), int(m.group(3)) if m.group(3) else None)
    return found


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
    try:
        connection = http.client.HTTPConnection(host, port, timeout=2)
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
        time.sleep(0.05)
    return True


def restart(conf: str, name: str, args: argparse.Namespace) -> str | None:
    """Restart one process and wait until it is back; the reason if it is not."""
    _, old_pid = processes(conf)[name]
    deadline = time.monotonic() + args.timeout
    result = supervisorctl(conf, "restart", name)
    pid: int | None = None

    state = "UNKNOWN"

    def running() -> bool:
        nonlocal pid, state
        state, pid = processes(conf).get(name, ("GONE", None))
        return state in ("RUNNING", "FATAL") and pid != old_pid

    if not wait(running, deadline) or state != "RUNNING":
        said = result.stdout.strip() or result.stderr.strip()
        return (
            f"{name} is not RUNNING with a new pid after {args.timeout:g}s but {state} "
            f"({said}); its log has the reason"
        )
    assert pid is not None
    if not wait(lambda: listens(pid, args.port), deadline):
        return f"{name} (pid {pid}) does not listen on port {args.port}"
    if not wait(lambda: healthy(args.host, args.port, args.health_path), deadline):
        return f"{args.host}:{args.port}{args.health_path} does not answer 200 after {name}"
    print(f"{name}: pid {old_pid} -> {pid}", flush=True)
    return None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line (docs/options.md is written from it)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Restart supervisord's wsfleet workers one at a time: each must be "
        "running again, listening and healthy before the next.",
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
        help="seconds each process may take to come back",
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
    names = sorted(processes(args.conf))
    if not names:
        print(f"rolling-restart: no processes in {args.conf}", file=sys.stderr)
        return 1
    for name in names:
        if problem := restart(args.conf, name, args):
            print(f"rolling-restart: {problem}; stopping here", file=sys.stderr)
            return 1
    return 0
