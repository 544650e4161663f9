"""The worker: serves the app with websockets on its listening sockets, and drains on demand.

A worker runs alone (``wsfleet worker``, as supervisord or systemd start it) or as a child of
the master. Either way its life is: load the app, serve on its sockets (one per --bind
address; one websockets server each), and on SIGTERM/SIGINT
drain: stop accepting at once, close every connection with a code (1001 going away; the master
asks for 1012 service restart during a rolling restart), wait for the closing handshakes up to
the graceful timeout, and return. Alone, SIGHUP is that rolling restart's request: the same
drain with 1012, then exit 0 for the supervisor to start the new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import http
import importlib
import inspect
import ipaddress
import logging
import os
import random
import resource
import secrets
import signal
import socket
import ssl
import sys
import sysconfig
import time
import traceback
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from . import channel, hub, logs, notify, pubsub
from .channel import Message
from .config import (
    HURRY_CLOSE,
    STEER_INTERVAL,
    Config,
    drain_duration,
    heartbeat_interval,
    url,
    uses_uvloop,
)
from .connection import Connection, CountedConnection, with_metrics, with_proxy_header
from .counts import COUNTS
from .drain import PacedClose
from .sockets import sock_address
from .topics import MAX_IDLE_TOPICS, Topics

Handler = Callable[[ServerConnection], Awaitable[None]]

log = logging.getLogger("wsfleet.worker")
access = logging.getLogger("wsfleet.access")


class Proxies:
    """Which peers may say who the client is (X-Forwarded-For): --forwarded-allow-ips."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.any = "*" in allowed
        self.networks = [ipaddress.ip_network(a, strict=False) for a in allowed if a != "*"]

    def trusts(self, peer: object) -> bool:
        if not isinstance(peer, tuple) or not peer:  # a Unix socket: the local proxy
            return True
        if self.any:
            return True
        address = ipaddress.ip_address(peer[0])
        return any(address in network for network in self.networks)


_proxies = Proxies(("127.0.0.1",))  # the worker sets it from its configuration


def client_address(connection: ServerConnection) -> str:
    """The client's address: the last X-Forwarded-For entry when the peer is a trusted proxy,
    else the peer's own."""
    peer = connection.remote_address
    if proxied := getattr(connection, "proxied_client", None):  # --proxy-protocol said who
        peer = (proxied, 0)
    if _proxies.trusts(peer) and connection.request is not None:
        forwarded = ",".join(connection.request.headers.get_all("X-Forwarded-For"))
        if last := forwarded.rpartition(",")[2].strip():
            return last
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unix"


class AppError(Exception):
    """The --app handler cannot be loaded (the CLI exits 4, the master gives up at start).

    ``str()`` is one line (it goes into status and reload reports); ``details`` is the
    traceback of an import that raised, the app's own frames only, or "".
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def _importlib_frame(frame: traceback.FrameSummary) -> bool:
    """A frame of the import machinery, not of the app: CPython hides these from an
    ``import`` statement's traceback, but not from importlib.import_module's."""
    return frame.filename.startswith("<frozen importlib") or (
        os.path.dirname(frame.filename) == os.path.dirname(importlib.__file__)
    )


def _app_frames(report: traceback.TracebackException) -> None:
    """Keep the app's frames in report and in the exceptions chained to it."""
    seen: set[int] = set()
    pending = [report]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        frames = [f for f in current.stack if not _importlib_frame(f) and f.filename != __file__]
        current.stack = traceback.StackSummary.from_list(frames)
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        pending += getattr(current, "exceptions", None) or []


def import_error(spec: str, exc: BaseException) -> AppError:
    """The AppError for an app whose import raised exc: one line that names the exception and
    where it was raised (file and line), and the traceback, without wsfleet's and importlib's
    frames, as details (none when it would only repeat the line: a missing module)."""
    report = traceback.TracebackException.from_exception(exc)
    _app_frames(report)
    where = ""
    if report.stack and not isinstance(exc, SyntaxError):  # (a SyntaxError's says where)
        # The line to fix is more often the app's than the library's it called.
        libraries = {sysconfig.get_path(p) for p in ("stdlib", "platstdlib", "purelib")}
        frame = next(
            (f for f in reversed(report.stack) if not f.filename.startswith(tuple(libraries))),
            report.stack[-1],
        )
        path = frame.filename
        with contextlib.suppress(ValueError):
            if not (relative := os.path.relpath(path)).startswith(".."):
                path = relative
        where = f" ({path}, line {frame.lineno})"
    details = "".join(report.format()).rstrip("\n")
    if "\n" not in details:  # no frame of the app's: the exception's line says it all
        details = ""
    return AppError(f"cannot import --app {spec}: {type(exc).__name__}: {exc}{where}", details)


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
        raise import_error(spec, exc) from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppError(
                f"cannot load --app {spec}: {module_name} has no attribute {attr!r}"
            ) from None
    return check_handler(target, f"--app {spec}")


def check_handler(target: Any, name: str) -> Handler:
    """Check that target is an ``async def handler(websocket)``; AppError says why not."""
    if not inspect.iscoroutinefunction(target) and not inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - an object with async __call__
    ):
        raise AppError(
            f"{name} is {type(target).__name__} {target!r}, not a coroutine function: "
            "define it as 'async def handler(websocket): ...'"
        )
    try:
        inspect.signature(target).bind(None)
    except TypeError:
        raise AppError(
            f"{name} must take exactly one argument, the connection: "
            "'async def handler(websocket)' (two-argument handlers are the deprecated legacy "
            "API; read the path from websocket.request.path)"
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin); let it run
    return cast(Handler, target)  # a coroutine function of one argument, as checked above


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
    options: dict[str, Any] = {
        "compression": None,  # the extension list above says it all
        "extensions": extensions,
        "max_size": config.max_size,
        "max_queue": config.max_queue,
        "write_limit": config.write_limit,
        "open_timeout": config.open_timeout,
        "ping_interval": config.ping_interval or None,  # 0: off, which websockets says None
        "ping_timeout": config.ping_timeout or None,
        "close_timeout": config.close_timeout,
    }
    if config.server_header is not None:  # else websockets' own
        options["server_header"] = config.server_header or None  # None: no header
    if config.origins is not None:
        options["origins"] = [*config.origins, None]  # None: no Origin (not a browser) is fine
    return options


def describe_compression(config: Config) -> str:
    if config.compression == "none":
        return "compression none"
    return (
        f"compression deflate window_bits={config.window_bits} memory_level={config.memory_level}"
    )


class Occurrences:
    """A condition that may repeat fast (each failed accept at the open-file limit, each
    failed TLS handshake of a scanner): counted every time, reported at most once every
    interval, with the count since the last report."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.count = 0
        self.reported = float("-inf")

    def report_due(self, now: float) -> int:
        """Count one; return how many to report (this one and those not reported yet) when a
        report is due, else 0."""
        self.count += 1
        if now - self.reported < self.interval:
            return 0
        count, self.count, self.reported = self.count, 0, now
        return count


class _WatchedSSLObject(ssl.SSLObject):
    """The TLS state of one connection (SSLContext.sslobject_class), telling the worker when
    its handshake fails: asyncio and uvloop log nothing of it unless the loop runs in debug
    mode. It changes nothing else: the error goes on as before."""

    on_failure: Callable[[str, ssl.SSLError], None] = staticmethod(lambda peer, error: None)

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLSyscallError):
            raise  # more to read or write: the handshake goes on
        except ssl.SSLError as error:
            with contextlib.suppress(Exception):  # reporting must not change the outcome
                self.on_failure(_handshake_peer(), error)
            raise


def _handshake_peer() -> str:
    """The client whose handshake is failing. asyncio's SSLProtocol calls do_handshake and
    knows its transport; uvloop's, compiled, shows no frame to look at."""
    with contextlib.suppress(Exception):
        caller = sys._getframe(2).f_locals.get("self")
        if isinstance(caller, sslproto.SSLProtocol):
            transport = caller._transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            return str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
    return "an unknown address"


class Phase(enum.Enum):
    SERVING = "serving"  # accepting on its sockets
    HOLDING = "holding"  # replaced by a rolling restart: not accepting, keeps its connections
    DRAINING = "draining"  # not accepting, closing its connections (over the drain window)


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


async def stop_accepting(servers: list[Server]) -> None:
    """Stop accepting on these servers' sockets without failing a connection accepted already.

    asyncio's accept callback accepts a batch of connections and builds their transports in
    tasks that run later; closing the server in between makes those tasks fail (the closed
    server refuses to attach them) and drop their connections without a word: the clients'
    handshakes end in a reset. So: stop reading the listening sockets, let the pending tasks
    attach their transports (one pass of the event loop), and only then close. Handshakes in
    flight then complete (see _DrainingServer).
    """
    loop = asyncio.get_running_loop()
    servers = [s for s in servers if not isinstance(s, _DrainingServer)]  # stopped already
    for server in servers:
        server.__class__ = _DrainingServer
        for sock in server.sockets:
            with contextlib.suppress(RuntimeError):  # uvloop: not its reader, and no such race
                loop.remove_reader(sock.fileno())
    await asyncio.sleep(0)
    for server in servers:
        server.server.close()


def run(config: Config, main: Coroutine[Any, Any, int]) -> int:
    """Run the worker's coroutine on the event loop that --loop names."""
    factory = None
    if uses_uvloop(config):
        try:
            import uvloop
        except ImportError:
            if config.loop == "uvloop":  # the CLI checks first; this is for wsfleet.run()
                raise AppError("--loop uvloop: uvloop is not installed") from None
        else:
            factory = uvloop.new_event_loop
    runner = asyncio.Runner(loop_factory=factory)
    try:
        return runner.run(main)
    finally:
        loop = runner.get_loop()
        if _cancel_tasks(loop, HURRY_CLOSE):
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), HURRY_CLOSE))
        # Not runner.close(): on 3.11 it waits without a bound for the default executor's
        # threads, and one a handler left blocked would keep the worker alive (an orphan, if
        # the master is gone). loop.close() leaves them; the process exits without them.
        loop.close()


def _cancel_tasks(loop: asyncio.AbstractEventLoop, bound: float) -> bool:
    """Cancel what still runs (handlers a drain aborted) and wait for it at most ``bound``
    seconds; False if some task ignored its cancellation. asyncio.Runner would wait for
    such a task forever, and a worker whose master is gone must not linger as an orphan:
    it leaves without it."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=bound))
        if pending:
            log.warning(
                "%d tasks did not end %gs after their cancellation: exiting without them",
                len(pending),
                bound,
            )
            return False
    return True


FD_LIMIT_WARNING = 10_000  # connections a single worker is expected to hold (see docs)


_early_restart = False  # a lone worker got SIGHUP before its event loop took the signal


def hold_restart_signal() -> None:
    """In a lone worker, from its start: note a SIGHUP (the rolling restart's request) that
    comes before the event loop handles it, instead of dying of it with connections queued
    on the socket, bound first; the worker acts on it once it serves."""

    def note(signum: int, frame: object) -> None:
        global _early_restart
        _early_restart = True

    signal.signal(signal.SIGHUP, note)


class Worker:
    """One process serving the app on its listening socket (and on sockets lent to it).

    Alone, it answers signals itself. Under the master (``channel`` given), it reports ready,
    sends heartbeats from its event loop, drains when told (or when the master is gone) and
    serves sockets the master lends it while their own slot has no worker.
    """

    def __init__(
        self,
        config: Config,
        sockets: Sequence[socket.socket],
        handler: Handler,
        channel: socket.socket | None = None,
        tls: ssl.SSLContext | None = None,
        hub_name: str | None = None,
    ) -> None:
        self.config = config
        self.hub_name = hub_name  # where the fleet's hub listens; None: alone, its own hub
        self.sockets = sockets  # its slot's, one per TCP address, and the fleet's Unix ones
        self.handler = handler
        self.channel = channel
        self.urls = [url(config, sock_address(sock)) for sock in sockets]
        self.ssl = tls
        self.connection_class = CountedConnection if config.access_log else Connection
        self.steered = config.balance == "least-connections"  # (its counts weigh new ones)
        if config.metrics:
            self.connection_class = with_metrics(self.connection_class)
        if config.proxy_protocol:
            self.connection_class = with_proxy_header(self.connection_class)
        global _proxies
        _proxies = Proxies(config.forwarded_allow_ips)
        self.connections: set[ServerConnection] = set()
        self.phase = Phase.SERVING
        self.drain_code: int = CloseCode.GOING_AWAY
        self.drain_reason = ""
        self.servers: list[Server] = []  # every server started, to wait for in a drain
        self.borrowed: dict[int, list[Server]] = {}  # lent slot number -> its servers
        self._drain_task: asyncio.Task[None] | None = None
        self._restarting = False  # alone: draining for a SIGHUP, not (yet) for a stop
        self._stopped: asyncio.Future[int] | None = None
        self._closer: PacedClose | None = None  # the drain's closes, once it sends them
        self._hurry: asyncio.TimerHandle | None = None  # ending now: when to drop the rest
        self._status = 0  # the exit status once the drain is over (1: a lone worker's 2nd TERM)
        self._tasks: set[asyncio.Task[Any]] = set()  # the loop holds tasks only weakly
        self.pubsub: pubsub.Client | None = None
        self._own_hub: hub.Hub | None = None
        self._inbox: list[tuple[Message, list[int]]] = []
        self._reported = 0  # the connections the master last heard of
        self._accepted = 0  # connections accepted (the master estimates the arrivals from it)
        self._count_due: asyncio.TimerHandle | None = None
        self._count_sent = -STEER_INTERVAL  # (the loop's time of the last count report)
        self._accept_failures = Occurrences()
        self._tls_failures = Occurrences()
        if tls is not None:  # (this process's copy of the context: the master's is untouched)
            tls.sslobject_class = _WatchedSSLObject
            _WatchedSSLObject.on_failure = self._on_tls_failure

    # Serving

    async def run(self) -> int:
        """Serve until a drain completes; return the exit status."""
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        loop.set_exception_handler(self._on_loop_error)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGQUIT, self._on_quit_signal)
        loop.add_signal_handler(signal.SIGUSR1, logs.reopen)
        logs.reopen_if_moved()  # a USR1 that came while this worker started was ignored
        if self.channel is None:
            loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, signal.SIGINT)
            loop.add_signal_handler(signal.SIGHUP, self._on_restart_signal)
        else:
            # (HUP stays ignored, as the master set it: the master runs the rolling restarts.)
            # Ctrl-C reaches the whole process group; the master decides what happens.
            loop.add_signal_handler(signal.SIGINT, lambda: None)

        await self._start_pubsub()
        for sock in self.sockets:
            await self._serve(sock)
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.info(
            "worker %d serving app %s on %s (%s, max_size=%d, max_queue=%d, write_limit=%d, "
            "loop=%s, open file limit %d)",
            os.getpid(),
            self.config.app,
            ", ".join(self.urls),
            describe_compression(self.config),
            self.config.max_size,
            self.config.max_queue,
            self.config.write_limit,
            type(loop).__module__.split(".")[0],
            fd_limit,
        )
        if fd_limit < FD_LIMIT_WARNING:
            log.warning(
                "the open file limit is %d: this worker can hold fewer than that many "
                "connections; raise the hard limit (ulimit -Hn, systemd's LimitNOFILE)",
                fd_limit,
            )
        if self.channel is None:
            # The readiness lines that scripts and tests wait for; always on stderr.
            for url in self.urls:
                print(notify.ready_line(url), file=sys.stderr, flush=True)
            if _early_restart:  # once every server exists, so that the drain stops them all
                loop.call_soon(self._on_restart_signal)
        else:
            loop.add_reader(self.channel, self._on_message)
            self._send({"t": "ready"})
            self._heartbeat(heartbeat_interval(self.config))
        return await self._stopped

    async def _start_pubsub(self) -> None:
        """Reach the fleet's hub; alone (no master), be its own: wsfleet.publish() then
        reaches this process's subscribers only."""
        name = self.hub_name
        if name is None:
            token = secrets.token_hex(16)
            name = hub.address(os.getpid(), token)
            store = Topics(
                history_size=self.config.history_size,
                history_ttl=self.config.history_ttl,
                max_idle_topics=MAX_IDLE_TOPICS,
            )
            own = self._own_hub = hub.Hub(store, token)
            if self.config.broker:  # (the processes of a supervisord group share topics so)
                from . import broker

                password = broker.password(self.config)
                own.broker = broker.attach(self.config, own.deliver, own.heard, password)
            await own.serve(hub.listen(name))
        timeout = self.config.broker_timeout if self.config.broker else None
        self.pubsub = pubsub.start(name, self.config.max_backlog, self.config.max_size, timeout)

    async def _serve(self, sock: socket.socket) -> Server:
        server = await serve(
            self._handle,
            sock=sock,
            # asyncio calls listen() again on the socket, with 100 unless told otherwise.
            backlog=self.config.backlog,
            process_request=self._process_request,
            process_response=(
                self._on_handshake if self.config.access_log or self.config.metrics else None
            ),
            ssl=self.ssl,
            create_connection=self.connection_class,
            **websockets_options(self.config),
        )
        self.servers.append(server)
        return server

    async def _handle(self, websocket: ServerConnection) -> None:
        if self.phase is Phase.DRAINING:
            # The handshake completed during a drain (see _DrainingServer).
            await websocket.close(self.drain_code, self.drain_reason)
            return
        self.connections.add(websocket)
        self._accepted += 1
        self._count_changed()
        age = self.config.max_connection_age
        aging = (
            asyncio.get_running_loop().call_later(
                age * random.uniform(0.9, 1.1), self._close_aged, websocket
            )
            if age
            else None
        )
        try:
            await self.handler(websocket)
        except ConnectionClosed:
            pass  # the client left, or a drain closed it: not the app's error
        finally:
            if aging is not None:
                aging.cancel()
            self.connections.discard(websocket)
            self._count_changed()
            if isinstance(websocket, CountedConnection):
                self._log_close(websocket)

    def _on_handshake(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        """--access-log and --metrics: every answered request but the health path's."""
        if self.config.metrics and request.path.partition("?")[0] != self.config.health_path:
            COUNTS.handshakes[str(response.status_code)] += 1
        if self.config.access_log:
            access.info(
                '%s "GET %s" %d', client_address(connection), request.path, response.status_code
            )

    def _log_close(self, websocket: CountedConnection) -> None:
        # The handler may return before the closing handshake ends: say what is known then.
        code = websocket.close_code if websocket.close_code is not None else "open"
        access.info(
            "%s %s closed %s after %.3fs, %d in, %d out",
            client_address(websocket),
            websocket.request.path if websocket.request else "-",
            code,
            time.monotonic() - websocket.opened,
            websocket.messages_in,
            websocket.messages_out,
        )

    def _close_aged(self, websocket: ServerConnection) -> None:
        """--max-connection-age: one connection at a time, closed as websockets closes."""
        if self.phase is not Phase.DRAINING:  # else the drain closes it
            self._spawn(websocket.close(CloseCode.SERVICE_RESTART, "max connection age"))

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = self.config.health_path
        if path and request.path.partition("?")[0] == path:
            if self.phase is not Phase.SERVING:
                text = "draining\n" if self.phase is Phase.DRAINING else "not accepting\n"
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, text)
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        limit = self.config.max_connections
        if limit and len(self.connections) >= limit:
            response = connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections: retry later\n"
            )
            response.headers["Retry-After"] = "1"  # another worker, or this one, then
            return response
        # The app's own, as websockets' process_request (a handler's attribute: the README).
        app_hook = getattr(self.handler, "process_request", None)
        if app_hook is not None:
            answer: Response | None = app_hook(connection, request)
            return answer
        return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Report running out of file descriptors once every few seconds, not per attempt.

        asyncio logs every failed accept() at the open-file limit, up to the backlog per
        wake-up (a flood of log lines and CPU); it retries by itself a second later, so
        connections are accepted again as soon as descriptors are free.
        """
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        if count := self._accept_failures.report_due(loop.time()):
            log.error(
                "cannot accept connections: %s (%s open, open file limit %d); "
                "%s since the last report; retrying every second",
                context.get("exception"),
                logs.plural(len(self.connections), "connection"),
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                logs.plural(count, "failed accept"),
            )

    def _on_tls_failure(self, peer: str, error: ssl.SSLError) -> None:
        """A TLS handshake failed (a client that does not trust the certificate, plain HTTP
        to a wss:// port, a scanner): the event loop says nothing of it; this says it, at
        most once every few seconds, so that a scanner cannot flood the log."""
        if count := self._tls_failures.report_due(time.monotonic()):
            reason = str(error).removesuffix(")").rpartition(" (_ssl.c:")[0] or str(error)
            log.warning(
                "TLS handshake from %s failed: %s%s",
                peer,
                reason,
                f" ({logs.plural(count, 'failed handshake')} since the last report)"
                if count > 1
                else "",
            )

    # The master's channel

    def _send(self, message: channel.Message) -> None:
        assert self.channel is not None
        channel.send(self.channel, message)  # a full buffer drops a heartbeat, no more

    def _heartbeat(self, interval: float) -> None:
        if self._stopped is None or self._stopped.done():
            return
        self._report()
        asyncio.get_running_loop().call_later(interval, self._heartbeat, interval)

    def _on_message(self) -> None:
        assert self.channel is not None
        while True:
            try:
                message, fds = channel.receive(self.channel)
            except BlockingIOError:
                return
            if message is None:
                asyncio.get_running_loop().remove_reader(self.channel)
                log.warning("the master is gone: closing every connection now (1001)")
                self.hurry()
                return
            # In order, one at a time: a release must not overtake the adopt before it.
            self._inbox.append((message, fds))
            if len(self._inbox) == 1:
                self._spawn(self._process_inbox())

    async def _process_inbox(self) -> None:
        while self._inbox:
            message, fds = self._inbox[0]
            kind = message.get("t")
            try:
                if kind == "drain":
                    log.info("the master asks for a drain with code %d", message["code"])
                    self.start_drain(int(message["code"]), str(message.get("reason", "")))
                elif kind == "hurry":
                    log.info("the master asks to stop now: closing every connection (1001)")
                    self.hurry()
                elif kind == "hold":
                    await self.hold()
                elif kind == "adopt" and fds:
                    adopted = [socket.socket(fileno=fd) for fd in fds]
                    fds.clear()
                    await self._adopt(int(message["slot"]), adopted)
                elif kind == "release":
                    await self._release(int(message["slot"]))
            except Exception:  # one bad message must not stop the ones after it
                log.exception("cannot act on the master's message %r", message)
            finally:
                for fd in fds:
                    os.close(fd)
                self._inbox.pop(0)

    async def _adopt(self, slot: int, sockets: list[socket.socket]) -> None:
        """Accept on another slot's sockets while that slot has no worker of its own."""
        if self.phase is not Phase.SERVING or slot in self.borrowed:
            for sock in sockets:
                sock.close()
            return
        self.borrowed[slot] = servers = []  # recorded first: a release finds what started
        for sock in sockets:
            servers.append(await self._serve(sock))
        log.info("accepting for slot %d while it has no worker", slot)

    async def _release(self, slot: int) -> None:
        """Stop accepting on lent sockets; their connections stay and are served as usual."""
        servers = self.borrowed.pop(slot, None)
        if servers is not None:
            await stop_accepting(servers)  # closes this process's descriptors only
            log.info("gave slot %d back", slot)
        if self.channel is not None:  # (a slot scaled away closes once no process holds it)
            self._send({"t": "released", "slot": slot})

    # Draining

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._drain_task is None:
            log.info("received %s: draining with code 1001", sig.name)
            self.start_drain(CloseCode.GOING_AWAY)
        elif self._restarting:
            # A stop (supervisorctl stop) while a restart drains: that drain already tells
            # every client to reconnect; let it end, and exit as the stop asks. Only another
            # TERM/INT cuts it short.
            self._restarting = False
            log.info("received %s while draining for a restart: finishing that drain", sig.name)
        elif self.channel is None:
            # Alone, a second TERM/INT means "now". Under a master it does not: systemd and
            # supervisord may signal the whole group besides the master's own TERM, and the
            # master says "now" on the channel.
            log.warning("received %s again: closing every connection now (1001)", sig.name)
            self.hurry(status=1)

    def _on_restart_signal(self) -> None:
        """Alone, HUP says "you are being restarted" (``wsfleet rolling-restart`` sends it
        through supervisord): close the connections with 1012 (service restart), which asks
        clients to reconnect at once, not 1001 as for a stop, and exit 0; the supervisor
        starts the new process. A process cannot tell a restart from a stop by its TERM, so
        the restart has a signal of its own."""
        if self._drain_task is None:
            log.info("received SIGHUP: restarting: draining with code 1012, then exiting")
            self._restarting = True
            self.start_drain(CloseCode.SERVICE_RESTART, "service restart")
        else:
            log.info("received SIGHUP while draining already: ignored")

    def _on_quit_signal(self) -> None:
        log.warning("received SIGQUIT: closing every connection now")
        self.abort(status=0)

    def start_drain(self, code: int, reason: str = "") -> None:
        """Begin draining with this close code (1001 on SIGTERM, 1012 for a restart)."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain(code, reason))

    async def hold(self) -> None:
        """A rolling restart replaced this worker: stop accepting, so that new connections go
        to the new workers, but keep these until the restart ends (the master then asks for a
        drain), so that a client is closed once per reload, never by a worker it has just
        reconnected to."""
        if self.phase is Phase.SERVING:
            self.phase = Phase.HOLDING
            await stop_accepting(self.servers)
            log.info(
                "replaced: stopped accepting; keeping %s until the restart ends",
                logs.plural(len(self.connections), "connection"),
            )
            if self.channel is not None:
                self._send({"t": "held"})  # the master drains no one before all say so

    async def drain(self, code: int, reason: str = "") -> None:
        self.phase = Phase.DRAINING
        if self._hurry is None:  # else it is 1001, whatever was asked before
            self.drain_code, self.drain_reason = code, reason
        # Stop accepting now rather than when websockets' close task first runs. In-flight
        # handshakes go on and succeed (see _DrainingServer), then _handle closes them.
        await stop_accepting(self.servers)
        for server in self.servers:
            server.close(close_connections=False)
        code, reason = self.drain_code, self.drain_reason  # (a hurry meanwhile made it 1001)
        count = len(self.connections)
        paced = 0.0 if self._hurry is not None else drain_duration(self.config, count)
        if self.channel is not None:
            # The master may not know (a TERM from outside), and it kills a draining worker
            # at a deadline that counts the closes' duration: say how long they take.
            self._send({"t": "draining", "over": paced})
        log.info(
            "stopped accepting; closing %s with code %d over %.3gs",
            logs.plural(count, "connection"),
            code,
            paced,
        )
        self._closer = PacedClose(self.connections, paced, code, reason, self._spawn)
        if self._hurry is not None:
            self._closer.hurry(self.drain_code, self.drain_reason)
        await self._closer.done
        # What close() would do per connection, once for all: a peer that has not ended its
        # connection close_timeout after the (last) close frame is dropped.
        lingering = asyncio.get_running_loop().call_later(
            self.config.close_timeout, self._abort_connections
        )
        try:
            async with asyncio.timeout(self.config.graceful_timeout):
                for server in self.servers:
                    await server.wait_closed()
                # A connection still in its TLS handshake is not websockets' yet, and Python
                # 3.11's asyncio.Server.wait_closed() returns at once after close(): wait for
                # the transports asyncio still counts, so that such a handshake completes (101,
                # then the drain's code) instead of dying with this process. No event tells
                # when that count reaches zero in 3.11; it is polled, within the timeout.
                while any(getattr(s.server, "_active_count", 0) for s in self.servers):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            log.warning(
                "graceful timeout (%gs) reached: aborting %s",
                self.config.graceful_timeout,
                logs.plural(sum(len(s.all_connections) for s in self.servers), "connection"),
            )
            self.abort(status=self._status)
            return
        finally:
            lingering.cancel()
        log.info("all connections closed; worker %d exiting", os.getpid())
        self._finish(self._status)

    def hurry(self, status: int = 0) -> None:
        """End now: every remaining connection gets its close frame at once (1001), and
        whatever has not closed HURRY_CLOSE seconds later is dropped. For a master that died
        and for a second TERM: the operator wants the process gone, not a paced drain, but
        a client still deserves a close frame rather than a reset."""
        if self._hurry is not None:
            return
        self._status = status
        self.drain_code, self.drain_reason = CloseCode.GOING_AWAY, ""
        loop = asyncio.get_running_loop()
        self._hurry = loop.call_later(HURRY_CLOSE, self.abort, status)
        if self._drain_task is None:
            self.start_drain(CloseCode.GOING_AWAY)  # its closer starts hurried
        elif self._closer is not None:
            self._closer.hurry(self.drain_code, self.drain_reason)

    def abort(self, status: int) -> None:
        """Drop every connection without a closing handshake and stop."""
        self._abort_connections()
        self._finish(status)

    def _abort_connections(self) -> None:
        for server in self.servers:
            for connection in list(server.all_connections):
                if isinstance(connection, Connection):
                    connection.write_waiting()  # what the app sent last, as websockets would
                connection.transport.abort()

    def _count_changed(self) -> None:
        """--balance least-connections weighs new connections by the workers' counts: the
        first change after a quiet STEER_INTERVAL goes to the master at once (a few clients
        connecting one after another are each placed by the counts before them); then at
        most one report per STEER_INTERVAL, however many changes come meanwhile."""
        if self._count_due is None and self.channel is not None and self.steered:
            loop = asyncio.get_running_loop()
            wait = self._count_sent + STEER_INTERVAL - loop.time()
            if wait <= 0:
                self._report_count()
            else:
                self._count_due = loop.call_later(wait, self._report_count)

    def _report_count(self) -> None:
        self._count_due = None
        if len(self.connections) != self._reported and self.phase is Phase.SERVING:
            self._reported = len(self.connections)
            self._count_sent = asyncio.get_running_loop().time()
            self._send({"t": "hb", "conns": self._reported, "acc": self._accepted})

    def _report(self) -> None:
        """A heartbeat: the open connections, and with --metrics the totals so far."""
        self._reported = len(self.connections)
        message: channel.Message = {"t": "hb", "conns": self._reported, "acc": self._accepted}
        if self.config.metrics:
            message["n"] = COUNTS.report()
        self._send(message)

    def _finish(self, status: int) -> None:
        # One loop turn later: connections just aborted are lost (and counted) only then.
        asyncio.get_running_loop().call_soon(self._stop, status)

    def _stop(self, status: int) -> None:
        if self._stopped is not None and not self._stopped.done():
            if self.channel is not None:
                self._report()  # the last counts, which the master keeps
            self._stopped.set_result(status)
