"""wsfleet: a process manager for WebSocket servers built on the websockets library."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "BrokerUnavailable",
    "Subscription",
    "__version__",
    "client_address",
    "publish",
    "run",
    "subscribe",
]

if TYPE_CHECKING:
    from .pubsub import Envelope, Subscription
    from .topics import BrokerUnavailable


async def publish(topic: str, message: str | bytes) -> int:
    """Publish ``message`` on ``topic`` to every subscriber of the fleet; return its offset.

    In an app that wsfleet serves (a worker's handler). TypeError for a topic that is not a
    str or a message neither str nor bytes-like; ValueError for an empty topic, one over 256
    characters, or a message over --max-size (a str measured UTF-8 encoded): raised at once,
    nothing published. With --broker, :class:`BrokerUnavailable` when Redis could not take
    it within --broker-timeout (the fleet serves on). (The pub/sub code is imported by
    workers only, when first used.)
    """
    from .pubsub import publish as publish_

    return await publish_(topic, message)


async def subscribe(
    websocket: Any,
    topic: str,
    *,
    since: tuple[str, int] | None = None,
    envelope: Envelope | None = None,
) -> Subscription:
    """Send every message published on ``topic`` (by any worker) to ``websocket``, in the
    topic's one order, each once, until ``await subscription.unsubscribe()`` or the
    connection closes.

    ``since=(epoch, offset)``, the last a client saw: first what it missed, if the history
    still holds it (``subscription.recovered``), then the live messages. ``envelope(topic,
    epoch, offset, message) -> str | bytes`` makes what is sent (once per message for all its
    subscribers); without it, the message as published. With --broker,
    :class:`BrokerUnavailable` when Redis did not answer within --broker-timeout.
    """
    from .pubsub import subscribe as subscribe_

    return await subscribe_(websocket, topic, since=since, envelope=envelope)


def __getattr__(name: str) -> Any:
    if name == "Subscription":
        from .pubsub import Subscription

        return Subscription
    if name == "BrokerUnavailable":
        from .topics import BrokerUnavailable

        return BrokerUnavailable
    raise AttributeError(f"module 'wsfleet' has no attribute {name!r}")


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
