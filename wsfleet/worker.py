"""The worker: serves the app with websockets on one listening socket, and drains on demand.

A worker runs alone (``wsfleet worker``, as supervisord or systemd start it) or as a child of
the master. Either way its life is: load the app, serve on the socket, and on SIGTERM/SIGINT
drain: stop accepting at once, close every connection with a code (1001 going away; the master
asks for 1012 service restart during a rolling restart), wait for the closing handshakes up to
the graceful timeout, and return.
"""

from __future__ import annotations

import asyncio
import http
import importlib
import inspect
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from . import logs
from .config import Config
from .sockets import sock_address

Handler = Callable[[ServerConnection], Awaitable[None]]

log = logging.getLogger("wsfleet.worker")


class AppError(Exception):
    """The --app handler cannot be loaded (the CLI exits 4, the master gives up at start)."""


def load_app(spec: str) -> Handler:
    """Import ``module:attr`` and check that it is an ``async def handler(websocket)``.

    Called inside the worker process, after fork, so that a restarted worker serves the code
    as it is now on disk.
    """
    module_name, _, attr = spec.partition(":")
    # Like gunicorn and uvicorn: the app's module is looked up from the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise AppError(f"cannot import --app {spec}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppError(
                f"cannot load --app {spec}: {module_name} has no attribute {attr!r}"
            ) from None
    if not inspect.iscoroutinefunction(target) and not inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - an object with async __call__
    ):
        raise AppError(
            f"--app {spec} is {type(target).__name__} {target!r}, not a coroutine function: "
            "define it as 'async def handler(websocket): ...'"
        )
    try:
        inspect.signature(target).bind(None)
    except TypeError:
        raise AppError(
            f"--app {spec} must take exactly one argument, the connection: "
            "'async def handler(websocket)' (two-argument handlers are the deprecated legacy "
            "API; read the path from websocket.request.path)"
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin); let it run
    return target


def websockets_options(config: Config) -> dict[str, Any]:
    """The keyword arguments for websockets' serve() that the memory options set."""
    extensions = None
    if config.compression == "deflate":
        extensions = [
            ServerPerMessageDeflateFactory(
                server_max_window_bits=config.window_bits,
                client_max_window_bits=config.window_bits,
                compress_settings={"memLevel": config.memory_level},
            )
        ]
    return {
        "compression": None,  # the extension list above says it all
        "extensions": extensions,
        "max_size": config.max_size,
        "max_queue": config.max_queue,
        "write_limit": config.write_limit,
    }


def describe_compression(config: Config) -> str:
    if config.compression == "none":
        return "compression none"
    return (
        f"compression deflate window_bits={config.window_bits} memory_level={config.memory_level}"
    )


class _DrainingServer(Server):
    """websockets' Server, except that a handshake which completes during a drain succeeds.

    websockets answers 503 to a handshake that completes after its listener closed. A worker
    that drains has stopped accepting, but the connections it accepted just before must not
    fail: their handshake completes (101) and the worker then closes them with the drain's
    code, which tells the client to reconnect. The worker switches its server to this class
    when it starts draining.
    """

    def is_serving(self) -> bool:
        return True


class Worker:
    """One process serving the app on one listening socket."""

    def __init__(self, config: Config, sock: socket.socket, handler: Handler) -> None:
        self.config = config
        self.sock = sock
        self.handler = handler
        self.address = sock_address(sock)
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self.drain_code: int = CloseCode.GOING_AWAY
        self.drain_reason = ""
        self.server: Server | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Future[int] | None = None
        self._closers: list[asyncio.Task[None]] = []

    # Serving

    async def run(self) -> int:
        """Serve until a drain completes; return the exit status."""
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, logs.reopen)

        self.server = await serve(
            self._handle,
            sock=self.sock,
            process_request=self._process_request,
            **websockets_options(self.config),
        )
        log.info(
            "worker %d serving app %s on ws://%s (%s, max_size=%d, max_queue=%d, write_limit=%d)",
            os.getpid(),
            self.config.app,
            self.address,
            describe_compression(self.config),
            self.config.max_size,
            self.config.max_queue,
            self.config.write_limit,
        )
        # The readiness line that scripts and tests wait for; always on stderr.
        print(f"listening on ws://{self.address}", file=sys.stderr, flush=True)
        return await self._stopped

    async def _handle(self, websocket: ServerConnection) -> None:
        if self.draining:
            # The handshake completed during a drain (see _DrainingServer).
            await websocket.close(self.drain_code, self.drain_reason)
            return
        self.connections.add(websocket)
        try:
            await self.handler(websocket)
        except ConnectionClosed:
            pass  # the client left, or a drain closed it: not the app's error
        finally:
            self.connections.discard(websocket)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = self.config.health_path
        if path and request.path.partition("?")[0] == path:
            if self.draining:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    # Draining

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._drain_task is None:
            log.info("received %s: draining with code 1001", sig.name)
            self.start_drain(CloseCode.GOING_AWAY)
        else:
            log.warning("received %s again: closing every connection now", sig.name)
            self.abort(status=1)

    def start_drain(self, code: int, reason: str = "") -> None:
        """Begin draining with this close code (1001 on SIGTERM, 1012 for a restart)."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain(code, reason))

    async def drain(self, code: int, reason: str = "") -> None:
        assert self.server is not None
        self.draining = True
        self.drain_code, self.drain_reason = code, reason
        # Stop accepting now rather than when websockets' close task first runs. In-flight
        # handshakes go on and succeed (see _DrainingServer), then _handle closes them.
        self.server.__class__ = _DrainingServer
        self.server.server.close()
        self.server.close(close_connections=False)
        log.info(
            "stopped accepting; closing %d connections with code %d",
            len(self.connections),
            code,
        )
        # Keep references: the loop holds tasks only weakly.
        self._closers = [
            asyncio.create_task(websocket.close(code, reason)) for websocket in self.connections
        ]
        try:
            async with asyncio.timeout(self.config.graceful_timeout):
                await self.server.wait_closed()
        except TimeoutError:
            log.warning(
                "graceful timeout (%gs) reached: aborting %d connections",
                self.config.graceful_timeout,
                len(self.server.all_connections),
            )
            self.abort(status=0)
            return
        log.info("all connections closed; worker %d exiting", os.getpid())
        self._finish(0)

    def abort(self, status: int) -> None:
        """Drop every connection without a closing handshake and stop."""
        if self.server is not None:
            for connection in list(self.server.all_connections):
                connection.transport.abort()
        self._finish(status)

    def _finish(self, status: int) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(status)
