"""The README, followed as a newcomer would: its own commands, run as it shows them.

A copy of the checkout stands for a fresh clone. The fenced shell blocks of the README's
sections are run as they are written (the only change: the port 8765 becomes a free one, in
the URLs and as ``WSFLEET_PORT`` in the environment), so that the README and this test cannot
drift apart: "Install and run" makes a fresh virtual environment, installs wsfleet from the
checkout and starts the master; "Connect a client" talks to it with the client the README
names, typing what its transcript types; "Write your own handler" writes the README's
``myapp.py``, stops the first master with Ctrl-C and starts another; "Operate it" runs each of
its commands from "another terminal" (a new shell that activates the environment, as the
README says), checking with ``wsfleet status --json`` what each one claims.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .support.harness import ROOT, Process, free_port, gone, wait_for
from .support.newcomer import Newcomer

README = ROOT / "README.md"
NEW_CODE = """

async def handler(websocket):  # the edit before `wsfleet reload`: new code to serve
    async for message in websocket:
        await websocket.send(f"new code: {message}")
"""


def section(title: str) -> str:
    """The text of the README's "## title" section."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of a language (``""`` for the unlabelled ones)."""
    found: list[tuple[str, list[str]]] = []
    inside = False
    for line in text.splitlines():
        if not inside and line.startswith("```"):
            found.append((line[3:].strip(), []))
            inside = True
        elif inside and line.strip() == "```":
            inside = False
        elif inside:
            found[-1][1].append(line)
    return ["\n".join(lines) + "\n" for lang, lines in found if lang == language]


def commands(text: str) -> list[str]:
    """The command lines of a section's shell blocks (comments are left to the shell)."""
    lines = [line.strip() for block in blocks(text, "sh") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def transcript() -> tuple[str, str]:
    """What the README's client transcript types ("> ") and gets back ("< ")."""
    (shown,) = blocks(section("Connect a client"), "")
    typed = [line[2:] for line in shown.splitlines() if line.startswith("> ")]
    answers = [line[2:] for line in shown.splitlines() if line.startswith("< ")]
    assert len(typed) == 1 and len(answers) == 1, f"expected one line each way in:\n{shown}"
    return typed[0], answers[0]


@pytest.mark.timeout(600)
def test_the_readme_works_for_a_newcomer(tmp_path: Path) -> None:
    me = Newcomer(tmp_path, free_port())
    me.clone()
    listening = re.compile(rf"^listening on ws://127\.0\.0\.1:{me.port}$")
    procs: list[Process] = []
    try:
        # Install and run: a fresh virtual environment, wsfleet from the checkout, the master.
        install = commands(section("Install and run"))
        assert any(line.startswith("pip install .") for line in install), install
        first = me.start("\n".join(["set -e", *install]), activate=False)  # stop at a failure
        procs.append(first)
        first.wait_line(listening, timeout=300)
        found = me.run("command -v wsfleet").stdout.strip()
        assert found == str(me.checkout / ".venv" / "bin" / "wsfleet"), first.output

        # Connect a client: the README's command and what its transcript shows.
        (client,) = commands(section("Connect a client"))
        typed, answer = transcript()
        me.chat(typed, answer, client)

        # Write your own handler: Ctrl-C the echo server, start the README's app.
        own = section("Write your own handler")
        (source,) = blocks(own, "python")
        name = re.match(r"# (\w+\.py)\n", source)
        assert name, f"the handler's block must start with '# FILE.py':\n{source}"
        app = me.checkout / name.group(1)
        app.write_text(source)
        first.interrupt()
        assert first.wait(30) == 0, first.output  # a graceful stop
        (start,) = commands(own)
        second = me.start(me.line(start))
        procs.append(second)
        second.wait_line(listening, timeout=60)
        gets = re.search(r"gets `(.+?)` for `(.+?)`", own)
        assert gets, "the section says what the client now gets: 'gets `X` for `Y`'"
        me.chat(gets.group(2), gets.group(1), client)

        # Operate it: each command from another terminal, and what it claims.
        operate = commands(section("Operate it"))
        verbs = [re.match(r"wsfleet (\w+)", line) for line in operate]
        assert [v.group(1) for v in verbs if v] == ["status", "reload", "upgrade", "stop"], operate
        master = None
        for line in operate:
            verb = re.match(r"wsfleet (\w+)", line).group(1)  # type: ignore[union-attr]
            if verb == "reload":
                app.write_text(source + NEW_CODE)  # "after editing myapp.py"
            shown = me.run(me.line(line))
            if verb == "status":
                status = me.status()
                master = status["master"]["pid"]
                workers = status["workers"]
                assert len(workers) == 4 and {w["state"] for w in workers} == {"ready"}, status
                assert f"{master}" in shown.stdout and str(me.port) in shown.stdout, shown.stdout
            elif verb == "reload":
                assert me.reply("hello") == "new code: hello"
            elif verb == "upgrade":
                new = me.status()["master"]["pid"]
                assert new != master, "the upgrade left the same master"
                wait_for(lambda old=master: gone(old), 30, "the old master to exit")
                master = new
                assert me.reply("hello") == "new code: hello"
            elif verb == "stop":
                assert master is not None
                wait_for(lambda pid=master: gone(pid), 30, "the master to exit")
        assert second.wait(30) == 0, second.output  # its master exited after the upgrade
    finally:
        for proc in procs:
            proc.kill()
