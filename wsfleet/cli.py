"""The command line: ``wsfleet start|worker|stop|reload|upgrade|status|bench|rolling-restart``.

Exit statuses are :data:`EXIT_STATUSES` (docs/options.md shows them, from there).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from setproctitle import setproctitle

from . import __version__, control, logs, notify, sockets
from . import config as cfg
from .records import EXIT_APP

EXIT_RUNTIME = 1
EXIT_USAGE = 2
# What each exit status means, for every command (scripts/gen-docs writes it to docs/options.md).
EXIT_STATUSES: dict[int, str] = {
    0: "success; for start and worker, a graceful stop",
    EXIT_RUNTIME: "runtime failure, with the reason: an address already in use (by a program "
    "that does not share it or, for start, by anything listening there, such as another "
    "master or a forgotten wsfleet worker: the message names the address); a pidfile held by "
    "a running master (named) or that is a symbolic link; no running master found (stop, "
    "reload, upgrade, status: a missing or stale pidfile, or none listening on the "
    "address); a master that did not stop in time (stop); a rolling restart that stopped "
    "(reload --wait); a new master that could not start, the old one serving on (upgrade); "
    "a lone worker stopped by a second TERM or INT, its connections closed at once",
    EXIT_USAGE: "bad input: an unknown option (the closest valid one suggested), a bad value, "
    "an unreadable or invalid config file, --admin without a token file or with one that is "
    "unreadable or empty; one line names the option, the environment variable, or the file "
    "and line",
    EXIT_APP: "the app cannot be loaded: the message says why; start gives up rather than "
    "restart workers that cannot load it",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line that names the culprit and where to look."""

    commands: dict[str, _Parser]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_command_line(self, argv: Sequence[str]) -> argparse.Namespace:
        """parse_args, except that an unknown option is reported by the sub-command that got
        it (so its --help is the one named), with the closest valid option suggested."""
        args, extras = self.parse_known_args(argv)
        if extras:
            command = self.commands.get(getattr(args, "command", ""), self)
            unknown = next((e.split("=")[0] for e in extras if e.startswith("-")), None)
            hint = ""
            if unknown is not None:
                options = [o for a in command._actions for o in a.option_strings]
                hint = cfg.suggest(unknown, options).replace("(known: ", "(options: ")
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return args


def _option_type(name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return cfg.parse_value(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def _address(text: str) -> str:
    try:
        cfg.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def help_text(text: str) -> str:
    """A help text as argparse must be given it: argparse %-formats every help string (for
    its ``%(default)s``), so a literal ``%`` ("+-10%") would crash ``--help``. Every help
    text that comes from the option table goes through here."""
    return text.replace("%", "%%")


def _add_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    field: dataclasses.Field[Any],
    text: str | None = None,
) -> None:
    """One option of the table (wsfleet/config.py) on a command: its flags, how its value is
    read, and its help (``text`` instead of the table's, for a control command), with the
    environment variable and the default."""
    meta = field.metadata
    flags = [cfg.flag(field.name)] + ([meta["short"]] if meta["short"] else [])
    default = cfg.shown_default(field)
    kind: dict[str, Any] = {"type": _option_type(field.name), "metavar": meta["metavar"]}
    if field.type == "bool":
        kind = {"action": "store_const", "const": True}
    elif field.name == "bind":  # repeated, one address each time (a path may hold a comma)
        kind = {"type": _address, "metavar": meta["metavar"], "action": "append"}
    parser.add_argument(
        *flags,
        dest=field.name,
        default=argparse.SUPPRESS,  # absent stays absent, so env and file can apply
        help=help_text(f"{text or meta['help']} [{cfg.env_name(field.name)}; default: {default}]"),
        **kind,
    )


def _add_serving_options(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "app_argument",
        nargs="?",
        metavar="APP",
        help="the connection handler as MODULE:ATTR: the same as --app",
        default=argparse.SUPPRESS,  # checked in given_options, after unknown options
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=help_text(f"TOML file of options (default: ${cfg.ENV_PREFIX}CONFIG)"),
    )
    for field in cfg.fields_for(command):
        _add_option(parser, field)


def _add_control_options(parser: argparse.ArgumentParser) -> None:
    """How a control command finds its master: the pidfile when one is given, else the
    address the master listens on, from the same options, variables and file as ``wsfleet
    start`` (control.Locator says how)."""
    where = parser.add_argument_group(
        "finding the master",
        "The master is the one its pidfile names, when one is given (--pidfile, "
        f"{cfg.env_name('pidfile')}, or pidfile in --config); otherwise the master of this "
        "user that listens on the address given as to `wsfleet start` (--host/--port, "
        "--bind, their WSFLEET_* variables, or --config).",
    )
    where.add_argument(
        "--pidfile",
        metavar="FILE",
        help=help_text(f"the master's pidfile [{cfg.env_name('pidfile')}; default: none]"),
    )
    where.add_argument(
        "--config",
        metavar="FILE",
        help=help_text(
            f"the TOML file given to `wsfleet start`: its pidfile, or its address "
            f"(default: ${cfg.ENV_PREFIX}CONFIG)"
        ),
    )
    _add_option(where, cfg.FIELDS["host"], "the address the master listens on")
    _add_option(where, cfg.FIELDS["port"], "the port the master listens on (the one it printed)")
    _add_option(
        where,
        cfg.FIELDS["bind"],
        "an address the master listens on: HOST:PORT, [V6ADDR]:PORT or unix:PATH",
    )


def _add_timeout(
    parser: argparse.ArgumentParser, default: float, text: str, kind: str = "timeout"
) -> None:
    """A control command's --timeout: how long it waits for the master (parsed as the
    option ``kind``: stop's may be 0)."""
    parser.add_argument(
        "--timeout",
        type=_option_type(kind),
        default=default,
        metavar="S",
        help=f"{text} (default: {default:g})",
    )


def _positive(kind: type) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return convert


# wsfleet bench URL's options: flags, type, default, metavar, help.
BENCH_URL_OPTIONS: list[tuple[tuple[str, ...], Any, Any, str, str]] = [
    (("-c", "--connections"), _positive(int), 50, "N", "connections in all"),
    (("-k", "--in-flight"), _positive(int), 4, "K", "messages in flight on each connection"),
    (("-s", "--size"), _positive(int), 64, "BYTES", "size of each message"),
    (("-t", "--duration"), _positive(float), 10.0, "S", "seconds of measurement"),
    (("-p", "--processes"), _positive(int), None, "N", "client processes (none: the CPUs)"),
]
BENCH_MEMORY_OPTIONS = {
    "messages": "MESSAGES",
    "memory_connections": "-n",
    "settings": "--settings",
}


def build_parser() -> _Parser:
    parser = _Parser(
        prog="wsfleet",
        description="Run a fleet of WebSocket server processes on one port.",
    )
    parser.add_argument("--version", action="version", version=f"wsfleet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    start = commands.add_parser(
        "start",
        help="run the master and its workers",
        description="Run the master, which pre-forks the workers and keeps them running.",
    )
    _add_serving_options(start, "start")
    worker = commands.add_parser(
        "worker",
        help="run one worker without a master (as supervisord or systemd start it)",
        description="Serve the app in this one process, on host:port or an inherited socket. "
        "TERM or INT: stop accepting, close every connection with 1001 (going away), exit. HUP: "
        "the same with 1012 (service restart), for a supervisor to start it again (what "
        "`wsfleet rolling-restart` sends through supervisord).",
    )
    _add_serving_options(worker, "worker")
    stop = commands.add_parser(
        "stop", help="stop the master gracefully and wait until it has exited"
    )
    _add_control_options(stop)
    _add_timeout(stop, 60.0, "how long to wait for the master to exit", "graceful_timeout")
    bench = commands.add_parser(
        "bench",
        help="measure an echo server: messages/s and round-trip times (wsfleet bench URL); "
        "memory per connection by compression setting (wsfleet bench memory)",
        description="wsfleet bench URL keeps IN_FLIGHT messages of SIZE bytes in flight on "
        "each of CONNECTIONS connections to an echo server for DURATION seconds, from several "
        "processes. wsfleet bench memory measures, for each permessage-deflate setting (window "
        "bits / memory level) and without compression, the compressed size and compression "
        "time of typical messages relative to websockets' default (12/5), and the memory per "
        "connection of a worker holding N connections that exchanged them (tracemalloc "
        "inside, RSS/USS outside).",
    )
    bench.add_argument("target", metavar="URL|memory", help="ws://HOST:PORT/PATH, or memory")
    bench.add_argument(
        "messages",
        nargs="?",
        help="memory: a JSON-lines file (one message a line) or a directory (one message a "
        "file); default: a synthetic sample of chat-like JSON messages",
    )
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    url = bench.add_argument_group("wsfleet bench URL")
    for flags, kind, default, metavar, text in BENCH_URL_OPTIONS:
        url.add_argument(
            *flags,
            type=kind,
            default=argparse.SUPPRESS,  # given or not: bench memory refuses them
            metavar=metavar,
            help=text if default is None else f"{text} (default: {default})",
        )
    url.add_argument(
        "--compression",
        choices=("none", "deflate"),
        default=argparse.SUPPRESS,
        help="none, or permessage-deflate as websockets' client offers it (default: none)",
    )
    url.add_argument(
        "--cafile",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="wss://: the CA that signed the server's certificate (default: the system's)",
    )
    url.add_argument(
        "--proxy-protocol",
        action="store_true",
        default=argparse.SUPPRESS,
        help="start each connection with a PROXY v1 header, for a server with --proxy-protocol",
    )
    memory = bench.add_argument_group("wsfleet bench memory")
    memory.add_argument(
        "-n",
        "--memory-connections",
        type=_positive(int),
        default=argparse.SUPPRESS,
        metavar="N",
        help="connections the worker holds (default: 2000)",
    )
    memory.add_argument(
        "--settings",
        default=argparse.SUPPRESS,
        help="comma-separated BITS/LEVEL or none (default: 15/8 down to 9/2, and none)",
    )
    reload = commands.add_parser("reload", help="rolling restart of the workers (SIGHUP)")
    _add_control_options(reload)
    reload.add_argument(
        "--wait",
        nargs="?",
        const="drained",
        choices=control.WAIT_UNTIL,
        metavar="drained|serving",
        help="follow the rolling restart and say when every slot serves the new code, then "
        "when the old workers have closed their connections and exited. --wait (or "
        "--wait=drained) returns at that second moment: exit 0 once no process runs the old "
        "code; --wait=serving returns at the first, while old workers may still close "
        "their connections. Exit 1 with the reason when the restart failed or stopped",
    )
    _add_timeout(reload, 300.0, "with --wait, how long to wait")
    upgrading = commands.add_parser(
        "upgrade",
        help="upgrade wsfleet itself (SIGUSR2): a new master from the installed code takes "
        "over the sockets",
        description="Send SIGUSR2 to the master: it starts a new master from the code "
        "installed now, handing it the listening sockets; once the new master's workers are "
        "ready it takes over the pidfile, the old workers close their connections with 1012 "
        "and the old master exits. Waits and says how it went: exit 0 once the new master "
        "serves, 1 with the reason when it could not start (the old master goes on serving).",
    )
    _add_control_options(upgrading)
    _add_timeout(upgrading, 300.0, "how long to wait")
    publish = commands.add_parser(
        "publish",
        help="publish a message on a topic, to the fleet's subscribers",
        description="Publish MESSAGE on TOPIC through the running master's hub, as "
        "wsfleet.publish() does in the app: every subscriber of TOPIC on every worker gets "
        "it. MESSAGE is published as text; with - or no MESSAGE, standard input is read to "
        "its end and published as it is (text when it is UTF-8, else bytes). Prints the "
        "message's offset. Exit 1 with the reason when no master answers; 2 for a bad topic "
        "or a message over the master's --max-size.",
    )
    publish.add_argument("topic", metavar="TOPIC", help="the topic (1 to 256 characters)")
    publish.add_argument(
        "message", metavar="MESSAGE", nargs="?", default="-", help="the text (default: -)"
    )
    _add_control_options(publish)
    _add_timeout(publish, 10.0, "how long to wait for the hub's acknowledgement")
    status = commands.add_parser("status", help="show the master and its workers")
    _add_control_options(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    commands.add_parser(  # dispatched before parsing: wsfleet/rolling.py parses its arguments
        "rolling-restart",
        help="restart supervisord's workers one at a time, health-checked (needs the "
        "'supervisor' extra)",
        add_help=False,
    )
    parser.commands = dict(commands.choices)
    return parser


def fail(message: str, status: int) -> NoReturn:
    if notify.notify_failure(message, status):  # a detached master tells the waiting command
        # Its stderr is its log file, whose own line has the traceback already.
        message = message.partition("\n")[0]
    print(f"wsfleet: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line; APP (positional) is --app."""
    given = {k: v for k, v in vars(args).items() if k in cfg.FIELDS}
    if "bind" in given:
        try:
            given["bind"] = cfg.parse_value("bind", given["bind"])  # the list: no duplicates
        except ValueError as exc:
            fail(f"argument --bind: {exc}", EXIT_USAGE)
    if "app_argument" in args:
        try:
            app = cfg.parse_value("app", args.app_argument)
        except ValueError as exc:
            fail(f"APP: {exc}", EXIT_USAGE)
        if "app" in given and given["app"] != app:
            fail(f"the app is given twice: {app} and --app {given['app']}", EXIT_USAGE)
        given["app"] = app
    return given


def check(config: cfg.Config) -> None:
    """What is checked before anything starts, beyond each option's own value (also for
    wsfleet.run()): ValueError says what to fix, as the exit 2 message."""
    sockets.server_context(config)  # the certificate and key load, or the error names them
    if config.user or config.group:
        from .privileges import identity

        identity(config)  # a known user and group, and permission to switch
    if config.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError("--loop uvloop: uvloop is not installed (pip install uvloop)")
    if config.broker:
        if importlib.util.find_spec("redis") is None:
            raise ValueError(
                "--broker needs redis-py: pip install redis (from wsfleet's checkout: "
                "pip install '.[redis]')"
            )
        if config.broker_password_file:
            from .broker import read_password

            try:
                read_password(config.broker_password_file)
            except OSError as exc:
                raise ValueError(
                    f"--broker-password-file {config.broker_password_file}: cannot read it: "
                    f"{exc.strerror}"
                ) from None
    if config.metrics and importlib.util.find_spec("prometheus_client") is None:
        raise ValueError(
            "--metrics needs prometheus-client: pip install prometheus-client (from wsfleet's "
            "checkout: pip install '.[metrics]')"
        )
    try:
        cfg.admin_token(config)  # (read again by the master as it starts: it keeps it)
    except cfg.ConfigError as exc:
        raise ValueError(str(exc)) from None


def load_config(command: str, args: argparse.Namespace) -> cfg.Config:
    given = given_options(args)
    try:
        return cfg.load(command, given, args.config)
    except cfg.ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


DAEMON_LOG = "wsfleet.log"  # --daemon's log file when --log-file is not given


def daemon_log(config: cfg.Config) -> cfg.Config:
    """--daemon without --log-file logs to wsfleet.log in the current directory (as
    supervisord's supervisord.log), made absolute: a detached master's stderr is nobody's,
    and a log thrown away without a word is the worst default. An upgrade's new master
    (started with the same arguments, in the same directory) logs to the same file."""
    if config.daemon and not config.log_file:
        try:
            path = os.path.abspath(DAEMON_LOG)
        except OSError:  # a working directory removed: opening it will say so
            path = DAEMON_LOG
        return dataclasses.replace(config, log_file=path)
    return config


def setup_logging(config: cfg.Config, defaulted: bool = False) -> None:
    try:
        logs.setup(config.log_level, config.log_file)
    except OSError as exc:
        if defaulted:
            fail(
                f"--daemon logs to {config.log_file} when no --log-file is given: cannot open "
                f"it: {exc.strerror}; give --log-file FILE",
                EXIT_USAGE,
            )
        fail(f"--log-file {config.log_file}: cannot open: {exc.strerror}", EXIT_USAGE)


def run_worker(config: cfg.Config) -> int:
    """``wsfleet worker``: one worker on --fd, on the first socket systemd passed (socket
    activation), or on its addresses (--bind, or host:port)."""
    from .privileges import drop_privileges, identity
    from .worker import AppError, Worker, hold_restart_signal, load_app, run

    hold_restart_signal()
    listening: list[socket.socket] = []
    unix: list[sockets.SharedListener] = []
    try:
        if config.fd is not None:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)  # --fd says which one
            try:
                listening.append(sockets.from_fd(config.fd))
            except ValueError as exc:
                fail(f"--fd {config.fd}: {exc}", EXIT_USAGE)
        elif activated := sockets.listen_fds():
            listening.append(activated[0])
            if config.bind or len(activated) > 1:
                logging.getLogger("wsfleet.worker").warning(
                    "serving the first socket systemd passed (%s); %s ignored",
                    sockets.sock_address(activated[0]),
                    "--bind and the others" if config.bind else "the others",
                )
            for sock in activated[1:]:
                sock.close()
        for address in cfg.addresses(config) if not listening else []:
            if address.path is None:
                listening.append(sockets.bind(address, config.backlog))
            else:
                owner = identity(config)
                unix.append(sockets.bind_unix(address.path, config.backlog, config.umask, owner))
                listening.append(unix[-1].sock)
    except sockets.ListenError as exc:
        fail(str(exc), EXIT_RUNTIME)
    try:
        setproctitle(f"wsfleet: worker [{', '.join(map(sockets.sock_address, listening))}]")
        sockets.raise_fd_limit()
        tls = sockets.server_context(config)  # read while still allowed to
        drop_privileges(config)  # the sockets are bound: the app is imported as --user
        try:
            handler = load_app(config.app)
        except AppError as exc:
            message = f"{exc}\n{exc.details}" if exc.details else str(exc)
            if config.log_file:  # else the log is stderr, where fail() says it
                logging.getLogger("wsfleet.worker").error("%s", message)
            fail(message, EXIT_APP)
        return run(config, Worker(config, listening, handler, tls=tls).run())
    finally:
        for listener in unix:
            listener.close(remove=True)


def run_master(config: cfg.Config, args: argparse.Namespace) -> int:
    """``wsfleet start``: the master, in the foreground or detached with --daemon."""
    from . import upgrade  # (the master's modules: not imported by the other commands)
    from .fleet import BootError
    from .master import Master

    def reload_config() -> cfg.Config:
        return daemon_log(cfg.load("start", given_options(args), args.config))

    sockets.raise_fd_limit()  # before forking: the workers inherit it
    if config.daemon and upgrade.ENV not in os.environ:  # (an upgrade's: detached already)
        daemonize(config.log_file)
    try:
        return Master(config, reload_config).run()
    except BootError as exc:  # (with its traceback: an app that raised at import)
        fail(f"cannot start: {exc}\n{exc.details}".rstrip(), exc.status)
    except sockets.ListenError as exc:
        fail(str(exc), EXIT_RUNTIME)
    except (control.ControlError, upgrade.HandoffError) as exc:
        fail(str(exc), EXIT_RUNTIME)
    except cfg.ConfigError as exc:  # (the token file, changed since it was checked)
        fail(str(exc), EXIT_USAGE)
    except OSError as exc:  # the status socket, say
        fail(f"cannot start: {exc}", EXIT_RUNTIME)


def daemonize(log_file: str | None) -> None:
    """Detach: the command returns once the master is ready (printing its listening lines
    and where it logs), or fails with the master's exit status if it could not start. The
    detached master's standard output and error go to its log file too, so that nothing
    written there (a traceback from a forked child, a warning) is lost."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end) as ready:
            text = ready.read()  # until the master closes its end: ready, failed, or gone
        line, _, more = text.partition("\n")
        if notify.LISTENING.match(line):
            print(text, end="", file=sys.stderr)  # one line per address
            print(f"logging to {log_file or os.devnull}", file=sys.stderr)
            raise SystemExit(0)
        if failed := notify.FAILED.match(line):  # the master's own reason and status
            fail(f"{failed.group(2)}\n{more}".rstrip(), int(failed.group(1)))
        fail(f"the master exited before it was ready; see its log {log_file}", EXIT_RUNTIME)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    notify.set_ready_fd(write_end)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    logs.redirect_std_streams()  # stdout and stderr: to the log file, when there is one


def find_master(args: argparse.Namespace) -> control.Locator:
    """Which master a control command means: the pidfile's when one is given (--pidfile, or
    from the environment or --config), else the one listening on the address read as
    `wsfleet start` reads it (--host/--port/--bind, WSFLEET_*, --config): control.Locator."""
    config = cfg.load("start", given_options(args), args.config)
    pidfile = args.pidfile or config.pidfile
    if pidfile:
        return control.Locator(pidfile=pidfile)
    return control.Locator(addresses=tuple(cfg.addresses(config)))


def run_control(args: argparse.Namespace) -> int:
    """``wsfleet stop|reload|upgrade|status|publish``."""
    master = find_master(args)
    try:
        if args.command == "stop":
            print(control.stop(master, args.timeout))
        elif args.command == "reload":
            say = functools.partial(print, flush=True)
            print(control.reload(master, args.wait, args.timeout, say))
        elif args.command == "upgrade":
            print(control.upgrade(master, args.timeout))
        elif args.command == "publish":
            print(publish(master, args))
        else:
            status = control.query_status(master.pid())
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                print(control.format_status(status))
    except control.ControlError as exc:
        fail(str(exc), EXIT_RUNTIME)
    return 0


def publish(master: control.Locator, args: argparse.Namespace) -> int:
    """``wsfleet publish``: the message read and checked, then its offset."""
    message: str | bytes = args.message
    if message == "-":
        data = sys.stdin.buffer.read()
        try:
            message = data.decode()
        except UnicodeDecodeError:
            message = data
    try:
        return control.publish(master, args.topic, message, args.timeout)
    except (TypeError, ValueError) as exc:
        fail(f"publish: {exc}", EXIT_USAGE)


def run_bench(args: argparse.Namespace) -> int:
    """``wsfleet bench URL`` (the load client) or ``wsfleet bench memory [MESSAGES]``."""
    given = vars(args)
    url_options = [flags[-1] for flags, *_ in BENCH_URL_OPTIONS]
    url_options += ["--compression", "--cafile", "--proxy-protocol"]
    if args.target == "memory":
        if wrong := [o for o in url_options if o[2:].replace("-", "_") in given]:
            fail(f"bench memory: {', '.join(wrong)} go with bench URL", EXIT_USAGE)
        return run_bench_memory(args)
    if wrong := [flag for o, flag in BENCH_MEMORY_OPTIONS.items() if given.get(o) is not None]:
        fail(f"bench: {', '.join(wrong)} go with bench memory", EXIT_USAGE)
    if not args.target.startswith(("ws://", "wss://")):
        fail(f"bench: expected a ws:// URL or memory, got {args.target!r}", EXIT_USAGE)
    options = {
        flags[-1][2:].replace("-", "_"): default for flags, _, default, *_ in BENCH_URL_OPTIONS
    }
    options.update({k: v for k, v in given.items() if k in options})
    from . import bench

    report = bench.run(
        args.target,
        compression=given.get("compression", "none"),
        cafile=given.get("cafile"),
        proxy_header=given.get("proxy_protocol", False),
        progress=options["duration"] > 3 and sys.stderr.isatty() and not args.json,
        **options,
    )
    print(bench.format_report(report, args.json))
    return 0 if report.messages else EXIT_RUNTIME


def run_bench_memory(args: argparse.Namespace) -> int:
    """Memory and compression by deflate setting."""
    from . import bench

    settings = args.settings.split(",") if "settings" in args else list(bench.SETTINGS)
    for setting in settings:
        if setting != "none" and not re.fullmatch(r"(9|1[0-5])/[1-9]", setting):
            fail(
                f"bench memory: --settings: {setting!r} is not BITS/LEVEL (9-15/1-9) or none",
                EXIT_USAGE,
            )
    if args.messages and not os.path.exists(args.messages):
        fail(f"bench memory: no such file or directory: {args.messages}", EXIT_USAGE)
    connections = getattr(args, "memory_connections", 2000)
    progress = sys.stderr.isatty() and not args.json
    report = bench.run_memory(args.messages, connections, settings, progress)
    print(bench.format_memory(report, args.json))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["rolling-restart"]:
        from . import rolling

        return rolling.main(argv[1:], prog="wsfleet rolling-restart")
    args = build_parser().parse_command_line(argv)
    if args.command == "bench":
        return run_bench(args)
    if args.command in ("stop", "reload", "upgrade", "status", "publish"):
        try:
            return run_control(args)
        except cfg.ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
    if args.command == "start":
        from .upgrade import ready_fd

        notify.set_ready_fd(ready_fd())  # an upgrade's new master: tell the old one
    config = load_config(args.command, args)
    defaulted = args.command == "start" and config.daemon and not config.log_file
    if args.command == "start":
        config = daemon_log(config)
    if args.command == "worker" and config.fd is not None and config.bind:
        fail("--fd and --bind: give one (--fd serves an inherited socket)", EXIT_USAGE)
    try:
        check(config)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    setup_logging(config, defaulted)
    if args.command == "worker":
        return run_worker(config)
    return run_master(config, args)


if __name__ == "__main__":
    sys.exit(main())
