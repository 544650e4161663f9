"""The command line: ``wsfleet worker`` (and, with the master, start/stop/reload/status).

Exit statuses: 0 success; 1 runtime failure (such as a port held by another program); 2 bad
input (unknown option, bad value, bad config file); 4 the app cannot be loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from setproctitle import setproctitle

from . import config as cfg
from . import logs, sockets

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_APP = 4


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line that names the culprit and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _option_type(name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return cfg.parse_value(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def _add_serving_options(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML file of options (default: ${cfg.ENV_PREFIX}CONFIG)",
    )
    for field in cfg.fields_for(command):
        meta = field.metadata
        flags = [cfg.flag(field.name)] + ([meta["short"]] if meta["short"] else [])
        default = "none" if field.default is None else field.default
        if field.default is cfg.dataclasses.MISSING:  # computed, as the number of CPUs
            default = "see above"
        parser.add_argument(
            *flags,
            dest=field.name,
            type=_option_type(field.name),
            default=argparse.SUPPRESS,  # absent stays absent, so env and file can apply
            metavar=meta["metavar"],
            help=f"{meta['help']} [{cfg.env_name(field.name)}; default: {default}]",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wsfleet",
        description="Run a fleet of WebSocket server processes on one port.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    worker = commands.add_parser(
        "worker",
        help="run one worker without a master (as supervisord or systemd start it)",
        description="Serve the app in this one process, on host:port or an inherited socket.",
    )
    _add_serving_options(worker, "worker")
    return parser


def fail(message: str, status: int) -> NoReturn:
    print(f"wsfleet: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def load_config(command: str, args: argparse.Namespace) -> cfg.Config:
    given = {k: v for k, v in vars(args).items() if k in cfg.FIELDS}
    try:
        return cfg.load(command, given, args.config)
    except cfg.ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def setup_logging(config: cfg.Config) -> None:
    try:
        logs.setup(config.log_level, config.log_file)
    except OSError as exc:
        fail(f"--log-file {config.log_file}: cannot open: {exc.strerror}", EXIT_USAGE)


def run_worker(config: cfg.Config) -> int:
    """``wsfleet worker``: one worker on host:port or on --fd."""
    from .worker import AppError, Worker, load_app  # websockets loads only when serving

    try:
        handler = load_app(config.app)
    except AppError as exc:
        fail(str(exc), EXIT_APP)
    try:
        if config.fd is not None:
            sock = sockets.from_fd(config.fd)
        else:
            sock = sockets.bind(config.host, config.port, config.backlog)
    except ValueError as exc:
        fail(f"--fd {config.fd}: {exc}", EXIT_USAGE)
    except sockets.AddressInUse as exc:
        fail(str(exc), EXIT_RUNTIME)
    except OSError as exc:
        fail(f"cannot listen on {config.host}:{config.port}: {exc}", EXIT_RUNTIME)
    setproctitle(f"wsfleet: worker [{sockets.sock_address(sock)}]")
    return asyncio.run(Worker(config, sock, handler).run())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_config(args.command, args)
    setup_logging(config)
    if args.command == "worker":
        return run_worker(config)
    raise AssertionError(args.command)  # argparse only accepts the commands above


if __name__ == "__main__":
    sys.exit(main())
