"""`--help` of every command, run as a user runs it: it works (no traceback: argparse
%-formats help texts, and one `%` in the option table once crashed `start --help`) and lists
every option the command takes. `--version` too.

The commands are those the top-level parser has, so a new command is checked without
touching this file; the options are the command's own argparse actions plus, for `start`
and `worker`, every option of the table in wsfleet/config.py (with its WSFLEET_ variable).
"""

from __future__ import annotations

import argparse
import re

import pytest

import wsfleet
from wsfleet import cli, rolling
from wsfleet import config as cfg

from .support.helpers import run_wsfleet

COMMANDS = sorted(cli.build_parser().commands)


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser that reads a command's arguments. `rolling-restart` is handed to
    wsfleet/rolling.py before the top-level parser runs: its parser is the one rolling.main
    builds, caught as it parses."""
    if command != "rolling-restart":
        return cli.build_parser().commands[command]
    caught: list[argparse.ArgumentParser] = []

    def catch(self: argparse.ArgumentParser, *args: object, **kw: object) -> None:
        caught.append(self)
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        rolling.main([], prog="wsfleet rolling-restart")
    return caught[0]


def listed(word: str, text: str) -> bool:
    """Whether an option (or a command) appears in a help text as a word of its own, not as
    part of a longer one (--port in --proxy-protocol)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def run_help(args: list[str]) -> str:
    result = run_wsfleet(args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_top_level_help_lists_every_command_and_option() -> None:
    text = run_help(["--help"])
    parser = cli.build_parser()
    options = [o for action in parser._actions for o in action.option_strings]
    assert "--version" in options
    missing = [w for w in [*options, *COMMANDS] if not listed(w, text)]
    assert not missing, text


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_lists_every_option(command: str) -> None:
    text = run_help([command, "--help"])
    options = {o for action in command_parser(command)._actions for o in action.option_strings}
    variables = set()
    for field in cfg.fields_for(command):  # start, worker: the option table
        options |= {cfg.flag(field.name), field.metadata["short"] or "--help"}
        variables.add(cfg.env_name(field.name))
    assert "--help" in options  # (a command's own parser was found)
    missing = sorted(word for word in options | variables if not listed(word, text))
    assert not missing, f"{command} --help does not list {missing}:\n{text}"


def test_help_survives_a_percent_sign_in_any_option_text() -> None:
    """The escape is where the table meets argparse: a help text from the table with a
    `%` (or argparse's `%(default)s` syntax) is shown as written."""
    parser = argparse.ArgumentParser()
    field = cfg.FIELDS["max_connection_age"]
    cli._add_option(parser, field, "100% of %(default)s, +-10%")
    assert "100% of %(default)s, +-10%" in " ".join(parser.format_help().split())


def test_version() -> None:
    result = run_wsfleet(["--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wsfleet {wsfleet.__version__}\n"
