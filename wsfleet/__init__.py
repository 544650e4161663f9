"""wsfleet: a process manager for WebSocket servers built on the websockets library."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "client_address", "run"]


def client_address(websocket: Any) -> str:
    """The client's IP address as a string: the peer's own, or, when the peer is a proxy that
    --forwarded-allow-ips trusts, the last entry of the X-Forwarded-For header it set."""
    from .worker import client_address as find

    return find(websocket)


def run(app: Any = "wsfleet.echo:echo", **options: Any) -> int:
    """Run the master and its workers in this process until stopped, as ``wsfleet start``.

    ``app`` is an ``async def handler(websocket)`` or its "module:attr" name; options are
    those of ``wsfleet start`` with underscores (``workers=4``, ``port=0``,
    ``graceful_timeout=10``). Returns the exit status (0 after a graceful stop).

    Workers are forked, so a handler object works as it is. Pass the "module:attr" name for
    SIGHUP to serve new code: workers then import it afresh, while a handler object is the
    code this process loaded.

    Raises TypeError for an unknown option (naming the closest valid one), ValueError for a
    bad value (with the message ``wsfleet start`` gives for it), and the master's start-up
    errors: ``wsfleet.fleet.BootError`` when no worker can start (its ``details`` hold the
    app's traceback when the import raised), OSError when the port is taken.
    """
    import os

    from . import cli, logs, sockets
    from . import config as cfg
    from .master import Master
    from .worker import check_handler

    # What wsfleet start takes, but for --daemon: run() serves in this process.
    known = [n for n, f in cfg.FIELDS.items() if "start" in f.metadata["commands"]]
    known.remove("daemon")
    values: dict[str, Any] = {}
    for name, value in options.items():
        if name not in known:
            if name == "daemon":
                hint = " (run() serves in this process; wsfleet start --daemon detaches)"
            elif name in cfg.FIELDS:
                hint = f" ({name} is an option of wsfleet worker, not of start)"
            else:
                hint = cfg.suggest(name, known)
            raise TypeError(f"run() got an unexpected keyword argument {name!r}{hint}")
        if value is None and cfg.FIELDS[name].default is None:
            continue  # None: not given, as for an option left out
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, tuple):  # bind=(...) as well as a list
            value = list(value)
        try:
            values[name] = cfg.parse_typed(name, value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    handler = None
    if isinstance(app, str):
        values["app"] = cfg.parse_value("app", app)
    else:
        handler = check_handler(app, f"run({app!r})")
        values["app"] = f"{app.__module__}:{getattr(app, '__qualname__', 'handler')}"
    config = cfg.Config(**values)
    cli.check(config)
    try:
        logs.setup(config.log_level, config.log_file)
    except OSError as exc:
        raise ValueError(f"--log-file {config.log_file}: cannot open: {exc.strerror}") from None
    sockets.raise_fd_limit()
    return Master(config, handler=handler).run()
