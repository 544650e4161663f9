"""Running wsfleet for tests and benchmarks: what tests/ and scripts/ both need, written once.

- :data:`READY`: the line a master (or a lone worker) prints once it accepts connections.
- :class:`Process`: a wsfleet command whose output a thread reads line by line, so that a
  caller waits for an event (a line) instead of sleeping, and the pipe never fills.
- :class:`Master`: ``wsfleet start`` with a pidfile; its status asked from this process.
- :class:`Supervisor`: supervisord from a copy of one of ``conf/``, as ``supervisord -c FILE``
  starts it, driven with supervisorctl.
- :class:`Browser`: headless Chromium over the DevTools protocol (the status page's test and
  its screenshot in docs/).
- :func:`gone`, :func:`end`, :func:`wait_for`, :func:`free_port`; :func:`worktree` (wsfleet
  at another git revision, for a benchmark's A/B).

Not part of the package: wsfleet never imports it, and it needs a checkout (``conf/``, git)
and psutil (in the test and bench extras). The scripts import it as ``tests.support.harness``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from websockets.sync.client import connect

from wsfleet import control
from wsfleet.notify import READY

__all__ = [
    "READY",
    "Browser",
    "Master",
    "Process",
    "Supervisor",
    "end",
    "free_port",
    "gone",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[2]  # the checkout (tests/support/..), for conf/ and git
BIN = Path(sys.executable).parent  # where this environment's wsfleet and supervisord are


def wait_for(predicate: Callable[[], object], timeout: float = 10, what: str = "condition") -> None:
    """Poll a condition (a file's content, a process's state) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def hub_pid(master_pid: int) -> int:
    """The master's hub process, as its status says (0: none). (Not by its title: a hub
    just forked has not set it yet.)"""
    hub = control.query_status(master_pid).get("hub") or {}
    return int(hub.get("pid") or 0)


def gone(pid: int) -> bool:
    """Whether a process has exited. An orphan's zombie counts as gone (its sockets are
    closed): not every init reaps (this sandbox's does not)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def end(pid: int) -> None:
    """Kill a process and every process under it, by pid: one that is not a child of the
    caller (an upgrade's new master, started by the master a test started)."""
    try:
        top = psutil.Process(pid)
        procs = [*top.children(recursive=True), top]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    wait_for(lambda: all(gone(p.pid) for p in procs), 10, f"process {pid} and its children")


def _group_members(group: int | None) -> list[int]:
    """The live (not zombie) processes of a process group."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if os.getpgid(proc.pid) == group and not gone(proc.pid):
                found.append(proc.pid)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without WSFLEET_* settings (a test sets what it means to)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSFLEET_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Process:
    """A wsfleet process whose stderr (and stdout) a thread reads into a line list.

    ``new_session``: in a session and process group of its own, as a command typed in a
    terminal is, so that :meth:`interrupt` is a Ctrl-C (SIGINT to the whole group) and
    :meth:`kill` also ends what left the process tree (an upgrade's new master).
    ``interactive``: its stdin is a pipe that :meth:`type` writes lines to.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        pass_fds: Sequence[int] = (),
        program: Sequence[str] = (sys.executable, "-m", "wsfleet"),
        new_session: bool = False,
        interactive: bool = False,
    ) -> None:
        self.args = [*program, *args]
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
            cwd=cwd,
            pass_fds=pass_fds,
            text=True,
            start_new_session=new_session,
        )
        self.group = self.popen.pid if new_session else None
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self.lines.append("")  # EOF marker: wakes waiters
            self._new.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str | re.Pattern[str], timeout: float = 15) -> re.Match[str]:
        """Wait until a line matches; fail with the output so far if it never does."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.popen.poll() is not None and not self._reader.is_alive()
                ):
                    raise AssertionError(
                        f"no line matching {regex.pattern!r} within {timeout}s "
                        f"(exit status {self.popen.poll()}); output:\n{self.output}"
                    )
                self._new.wait(min(remaining, 0.5))

    def wait_ready(self, timeout: float = 15) -> int:
        """Wait for the readiness line; return the port."""
        return int(self.wait_line(READY, timeout).group(2))

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to every process of its group (``new_session`` only)."""
        assert self.group is not None, "interrupt() needs new_session=True"
        os.killpg(self.group, signal.SIGINT)

    def type(self, line: str) -> None:
        """Write a line to its stdin (``interactive`` only)."""
        assert self.popen.stdin is not None, "type() needs interactive=True"
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def end_input(self) -> None:
        """Ctrl-D: close its stdin (``interactive`` only)."""
        assert self.popen.stdin is not None, "end_input() needs interactive=True"
        self.popen.stdin.close()

    def wait(self, timeout: float = 15) -> int:
        status = self.popen.wait(timeout)
        self._reader.join(timeout)
        return status

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        """The master's workers (its children but the hub), by process title."""
        found = []
        for child in self.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.name().startswith("wsfleet: worker"):
                    found.append(child)
        return found

    def hub(self) -> psutil.Process | None:
        """The master's hub process (pub/sub)."""
        pid = hub_pid(self.pid)
        return psutil.Process(pid) if pid else None

    def kill(self) -> None:
        """Make sure the process and every process it started are gone: children first,
        found by pid while the parent still exists."""
        children = self.children() if self.popen.poll() is None else []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        psutil.wait_procs(children, timeout=10)
        if self.group is not None:  # its own group: whatever is left in it, by the group's id
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.group, signal.SIGKILL)
            wait_for(lambda: not _group_members(self.group), 10, f"process group {self.group}")
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        self._reader.join(5)


class Master:
    """A running ``wsfleet start --port 0`` with its pidfile in ``directory``.

    ``spawn`` starts the process (a test passes its fixture, which ends it by pid).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *args: str,
        spawn: Callable[..., Process] | None = None,
        timeout: float = 15,
        **kw: Any,
    ) -> None:
        self.pidfile = str(Path(directory) / "wsfleet.pid")
        args = ("start", "--port", "0", "--pidfile", self.pidfile, *args)
        self.proc = spawn(*args, **kw) if spawn else Process(args, **kw)
        self.port = self.proc.wait_ready(timeout)
        self.url = f"ws://127.0.0.1:{self.port}/"

    def status(self) -> dict[str, Any]:
        """What `wsfleet status --json` prints, asked from this process."""
        return control.query_status(control.master_pid(self.pidfile))

    def worker_pids(self) -> set[int]:
        return {w["pid"] for w in self.status()["workers"]}

    def wait_workers(self, count: int, state: str = "ready", timeout: float = 15) -> None:
        def settled() -> bool:
            workers = self.status()["workers"]
            return len(workers) == count and all(w["state"] == state for w in workers)

        wait_for(settled, timeout, f"{count} workers {state}")

    def rolling_restart(self, timeout: float = 60) -> None:
        """SIGHUP, then wait until it is done and the old workers are gone."""
        old = self.worker_pids()
        self.proc.signal(signal.SIGHUP)

        def done() -> bool:
            status = self.status()
            pids = {w["pid"] for w in status["workers"]}
            return status["master"]["reload"]["kind"] != "in_progress" and not pids & old

        wait_for(done, timeout, "the rolling restart")
        outcome = self.status()["master"]["reload"]
        if outcome["kind"] != "done" or outcome["old_workers"]:
            raise AssertionError(f"rolling restart: {control.outcome_text(outcome)}")

    def stop(self, timeout: float = 60) -> int:
        self.proc.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc.kill()


class Supervisor:
    """supervisord started from a copy of one of the project's configurations, as a user
    would: `supervisord -c FILE` (it daemonizes), driven with supervisorctl."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        conf: str,
        options: str = "",
        replace: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.conf = str(Path(directory) / "supervisord.conf")
        text = (ROOT / "conf" / conf).read_text()
        if options:  # only where another app is needed
            text = text.replace("command = wsfleet worker", f"command = wsfleet worker {options}")
        for old, new in (replace or {}).items():  # a setting as users may have it instead
            if old not in text:
                raise ValueError(f"conf/{conf} has no {old!r} to replace")
            text = text.replace(old, new)
        # The fcgi variant names its port in the file (supervisord opens the socket).
        Path(self.conf).write_text(text.replace("127.0.0.1:8765", f"127.0.0.1:{self.port}"))
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.env = clean_env(
            {
                "WSFLEET_PORT": str(self.port),
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # where wsfleet is
            }
        )
        started = subprocess.run(
            [str(BIN / "supervisord"), "-c", self.conf],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if started.returncode:
            raise RuntimeError(f"supervisord did not start: {started.stdout}{started.stderr}")
        pidfile = Path(directory) / "supervisord.pid"
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "its pidfile")
        self.pid = int(pidfile.read_text())

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", self.conf, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, tuple[str, int | None]]:
        """name -> (state, pid) for every process supervisord runs."""
        found = {}
        for line in self.ctl("status").stdout.splitlines():
            if m := re.match(r"^(\S+)\s+(\S+)\s+(?:pid (\d+),)?", line):
                found[m.group(1)] = (m.group(2), int(m.group(3)) if m.group(3) else None)
        return found

    def pids(self) -> set[int]:
        return {pid for _, pid in self.status().values() if pid}

    def wait_running(self, count: int = 4) -> None:
        def all_running() -> bool:
            states = self.status()
            return len(states) == count and all(s == "RUNNING" for s, _ in states.values())

        wait_for(all_running, 30, f"{count} processes RUNNING")

    def rolling_restart(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`wsfleet rolling-restart` on this configuration, as an installed user runs it."""
        return subprocess.run(
            [str(BIN / "wsfleet"), "rolling-restart", self.conf, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        """supervisorctl shutdown, then wait for supervisord to exit."""
        self.ctl("shutdown")
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(self.pid).wait(60)

    def cleanup(self) -> None:
        """End supervisord and every process it started, by pid."""
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.pid).children(recursive=True)
            for proc in [*children, psutil.Process(self.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs([*children], timeout=10)


@contextlib.contextmanager
def worktree(rev: str | None) -> Iterator[dict[str, str]]:
    """{rev: directory} with wsfleet's tree at that revision, removed at the end."""
    if not rev:
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="wsfleet-rev-") as parent:
        path = os.path.join(parent, "tree")
        added = subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", path, rev],
            capture_output=True,
            text=True,
        )
        if added.returncode:
            raise SystemExit(f"--rev {rev}: git worktree add failed: {added.stderr.strip()}")
        try:
            yield {rev: path}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", path])


class Browser:
    """Headless Chromium driven over the DevTools protocol (a WebSocket, with websockets'
    own client): load a page, read what it shows, take a screenshot. Ended by pid."""

    def __init__(self, directory: str | os.PathLike[str], width: int = 390, height: int = 844):
        binary = next(
            (found for name in ("chromium", "chromium-browser") if (found := _which(name))), None
        )
        if binary is None:
            raise RuntimeError("chromium is missing: scripts/install-test-tools installs it")
        port = free_port()
        self._stack = contextlib.ExitStack()
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # as root, Chromium refuses to start with its sandbox
                "--disable-gpu",
                "--no-first-run",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={Path(directory) / 'chromium'}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def page() -> str | None:
                listing = f"http://127.0.0.1:{port}/json/list"
                with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(listing) as f:
                    for target in json.load(f):
                        if target["type"] == "page":
                            return str(target["webSocketDebuggerUrl"])
                return None

            wait_for(lambda: page() or self.proc.poll() is not None, 30, "Chromium to start")
            target = page()
            if target is None:
                raise RuntimeError(f"Chromium exited with status {self.proc.poll()}")
            self.devtools = self._stack.enter_context(
                connect(target, max_size=None, open_timeout=10)
            )
            self._id = 0
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=width < 600,
            )
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.devtools.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # events may come first
            answer = json.loads(self.devtools.recv(timeout=30))
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return dict(answer.get("result", {}))

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def screenshot(self, path: str | os.PathLike[str]) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        Path(path).write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        children = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        self.proc.wait(10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=10)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/lib/chromium")
