"""A newcomer's terminal: a fresh clone, a fresh virtual environment made from it as a user
makes one, and commands typed in new shells, without this test run's environment (its virtual
environment, its WSFLEET_* settings). The README's test follows the README with it; the bench
test checks that `wsfleet bench` works from a plain install."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from websockets.sync.client import connect

from .harness import ROOT, Process, clean_env

ACTIVATE = ". .venv/bin/activate"  # the README's "in the same environment"
# Not part of a fresh clone (.gitignore): what a working tree may hold besides its files.
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)


class Newcomer:
    """A terminal's environment: the user's own, without this test's virtual environment or
    any WSFLEET_* setting; ``python3`` is the interpreter the tests run on (3.11 or newer)."""

    def __init__(self, home: Path, port: int) -> None:
        self.checkout = home / "wsfleet"
        self.port = port
        bin_dir = home / "bin"
        bin_dir.mkdir()
        (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
        ours = str(Path(sys.executable).parent)
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != ours]
        self.env = {
            "PATH": os.pathsep.join([str(bin_dir), *path]),
            "VIRTUAL_ENV": "",
            "PYTHONPATH": "",
            "WSFLEET_PORT": str(port),
        }

    def line(self, text: str) -> str:
        """A README command on this test's port."""
        return re.sub(r"\b8765\b", str(self.port), text)

    def start(self, script: str, *, activate: bool = True, interactive: bool = False) -> Process:
        """A command typed in a new terminal (its own session), left running."""
        script = f"{ACTIVATE} && {script}" if activate else script
        return Process(
            [script],
            program=("bash", "-c"),
            env=self.env,
            cwd=self.checkout,
            new_session=True,
            interactive=interactive,
        )

    def clone(self) -> None:
        """A fresh clone of the repository: the checkout's files, without what a working tree
        adds to them (its virtual environment, build output, caches)."""
        shutil.copytree(ROOT, self.checkout, ignore=IGNORED)

    def run(
        self, command: str, timeout: float = 120, *, activate: bool = True, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """A command typed in another terminal, in the same environment (``activate``);
        unless ``check`` is false, it must succeed."""
        result = subprocess.run(
            ["bash", "-c", f"{ACTIVATE} && {command}" if activate else command],
            cwd=self.checkout,
            env=clean_env(self.env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert not check or result.returncode == 0, (
            f"`{command}` exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
        return result

    def status(self) -> dict:
        """What `wsfleet status --json` says, found as the README's commands find it."""
        return dict(json.loads(self.run("wsfleet status --json").stdout))

    def chat(self, typed: str, expected: str, client: str) -> None:
        """The README's interactive client: type a line, see the answer, Ctrl-D."""
        proc = self.start(self.line(client), interactive=True)
        try:
            proc.wait_line(r"^Connected to ", timeout=30)
            proc.type(typed)
            proc.wait_line(re.compile(rf"< {re.escape(expected)}$"), timeout=30)
            proc.end_input()
            assert proc.wait(30) == 0, proc.output
            assert "Connection closed: 1000 (OK)." in proc.output, proc.output
        finally:
            proc.kill()

    def reply(self, message: str) -> str:
        with connect(f"ws://127.0.0.1:{self.port}/", open_timeout=10) as ws:
            ws.send(message)
            return str(ws.recv(timeout=10))
