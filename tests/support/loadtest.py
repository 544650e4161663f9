"""A load that watches for failures: new connections at a steady rate, each doing one echo,
and long-lived connections echoing continuously. Used by the tests and by
``scripts/bench-restart`` to show what clients see during a restart or a crash.

Every connection attempt is recorded with its start time and outcome. An attempt fails when
the TCP connection is refused or reset, the handshake gets anything but 101 (websockets'
503 for one that completes while a server closes, say), or the echo never comes back. An
attempt whose connection is closed with 1012 (service restart) after its handshake is not a
failure: the server told the client to reconnect, which is what 1012 means.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


@dataclass
class Attempt:
    start: float  # time.monotonic()
    end: float = 0.0
    outcome: str = "pending"  # ok, closed 1012, or a failure description
    kind: str = "churn"  # churn: one echo; long: a long-lived connection's (re)connect


@dataclass
class Results:
    attempts: list[Attempt] = field(default_factory=list)
    close_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    echoes: int = 0

    def failures(self, since: float = 0.0) -> list[Attempt]:
        return [
            a
            for a in self.attempts
            if a.start >= since and a.outcome not in ("ok", "closed 1012", "pending")
        ]

    def summary(self) -> dict[str, Any]:
        outcomes = collections.Counter(a.outcome for a in self.attempts)
        return {
            "attempts": len(self.attempts),
            "outcomes": dict(outcomes),
            "failed": len(self.failures()),
            "long_lived_close_codes": dict(self.close_codes),
            "echoes": self.echoes,
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd else None
        return f"closed {code}" if code else "closed 1006"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


class Load:
    """Runs the load in a thread with its own event loop, until stop() (or ``duration``)."""

    def __init__(
        self,
        url: str,
        rate: float = 200.0,
        long_lived: int = 100,
        interval: float = 0.05,
        duration: float = 60.0,
        timeout: float = 5.0,
        ssl: Any = None,
        unix: str | None = None,
    ) -> None:
        self.url = url
        self.ssl = ssl  # the client's ssl.SSLContext for a wss:// URL (None: the system's)
        self.unix = unix  # connect to this Unix socket (url then gives the Host and path)
        self.rate = rate
        self.long_lived = long_lived
        self.interval = interval  # between two echoes on a long-lived connection
        self.duration = duration  # a hard bound, whatever the caller does
        self.timeout = timeout
        self.results = Results()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._warm = threading.Event()

    def start(self, warm_timeout: float = 30.0) -> Load:
        """Start, and return once every long-lived connection is open."""
        self._thread.start()
        if not self._warm.wait(warm_timeout):
            raise TimeoutError(f"the load did not warm up in {warm_timeout}s")
        return self

    def stop(self) -> Results:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.duration + 30)
        return self.results

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        holders = [asyncio.create_task(self._long_lived()) for _ in range(self.long_lived)]
        self._opened = 0
        while self._opened < self.long_lived and not self._stop.is_set():
            await asyncio.sleep(0.01)
        self._warm.set()
        churn: set[asyncio.Task[None]] = set()
        deadline = time.monotonic() + self.duration
        next_start = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._loop.time() + self.duration):
                while not self._stop.is_set() and time.monotonic() < deadline:
                    if self.rate > 0:
                        task = asyncio.create_task(self._one_echo())
                        churn.add(task)
                        task.add_done_callback(churn.discard)
                        next_start += 1 / self.rate
                    else:
                        next_start += 0.1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._stop.wait(), max(0.0, next_start - time.monotonic())
                        )
        self._stop.set()
        await asyncio.gather(*churn, *holders, return_exceptions=True)

    async def _open(self, kind: str) -> tuple[Attempt, ClientConnection | None]:
        attempt = Attempt(time.monotonic(), kind=kind)
        self.results.attempts.append(attempt)
        try:
            options: dict[str, Any] = {"ssl": self.ssl} if self.ssl is not None else {}
            if self.unix is not None:
                options.update(unix=True, path=self.unix)  # as websockets' unix_connect()
            ws = await connect(self.url, open_timeout=self.timeout, compression=None, **options)
        except Exception as exc:
            attempt.outcome, attempt.end = _describe(exc), time.monotonic()
            return attempt, None
        return attempt, ws

    async def _one_echo(self) -> None:
        attempt, ws = await self._open("churn")
        if ws is None:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await ws.send("ping")
                if await ws.recv() != "ping":
                    raise ValueError("wrong echo")
            attempt.outcome = "ok"
            self.results.echoes += 1
        except Exception as exc:
            attempt.outcome = _describe(exc)
        finally:
            attempt.end = time.monotonic()
            await ws.close()

    async def _long_lived(self) -> None:
        """Keep one connection echoing; when the server closes it, note the code and
        reconnect, as a client of a real service would."""
        assert self._stop is not None
        first = True
        while not self._stop.is_set():
            attempt, ws = await self._open("long")
            attempt.end = time.monotonic()
            if ws is None:
                await asyncio.sleep(0.1)  # a failure is recorded; don't spin on it
                continue
            attempt.outcome = "ok"
            if first:
                self._opened += 1
                first = False
            try:
                while not self._stop.is_set():
                    async with asyncio.timeout(self.timeout):
                        await ws.send("hello")
                        if await ws.recv() != "hello":
                            raise ValueError("wrong echo")
                    self.results.echoes += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.interval)
            except Exception as exc:
                self.results.close_codes[_describe(exc)] += 1
            finally:
                await ws.close()


# A reconnect storm: many idle connections that reconnect at once when the server closes them,
# as browsers and mobile clients do. Run in several processes (see run_storm_client), each
# from its own loopback source address, so that the client's handshakes are spread over cores
# and no process runs short of ports or descriptors. With a lifetime, a population with churn
# instead: each connection closes itself after a random (exponential) time and is replaced at
# once (scripts/bench-balance).


@dataclass
class StormResults:
    closes: list[int]  # per connection: how many times the server closed it
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    closed: list[float] = field(default_factory=list)  # when each close was seen
    # (when it was closed, when it was open again) for each reconnection
    reconnected: list[tuple[float, float]] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)  # (when, what) per failure
    ended: int = 0  # connections the client closed itself at the end of their lifetime


class StormClient:
    """count connections to url from source; each reconnects when closed, until stop().

    ``lifetime``: each connection closes itself (1000) after a random time, exponential with
    this mean, and a new one replaces it at once: about count / lifetime new connections a
    second (0: they live until the server closes them). ``rate``: the first connections open
    at most this many a second (0: as fast as ``opening`` allows).
    """

    def __init__(
        self,
        url: str,
        count: int,
        source: str,
        timeout: float = 30.0,
        lifetime: float = 0.0,
        rate: float = 0.0,
    ) -> None:
        self.url, self.count, self.source, self.timeout = url, count, source, timeout
        self.lifetime, self.rate = lifetime, rate
        self.results = StormResults(closes=[0] * count)
        self.open = 0  # connections open now
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, opening: int = 100) -> StormResults:
        """Open the connections at most `opening` at a time (no storm of our own at start),
        then keep them until stop()."""
        gate = asyncio.Semaphore(opening)
        await asyncio.gather(*(self._keep(i, gate) for i in range(self.count)))
        return self.results

    async def _connect(self) -> ClientConnection | None:
        try:
            return await connect(self.url, open_timeout=self.timeout, local_addr=(self.source, 0))
        except Exception as exc:
            self.results.failed.append((time.monotonic(), _describe(exc)))
            return None

    async def _keep(self, index: int, gate: asyncio.Semaphore) -> None:
        if self.rate:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), index / self.rate)
        async with gate:
            ws = await self._connect()
        closed_at = 0.0
        while not self._stop.is_set():
            if ws is None:  # a failure is recorded; retry, without spinning
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.1)
                ws = await self._connect()
                if ws is not None and self.results.closes[index]:
                    self.results.reconnected.append((closed_at, time.monotonic()))
                continue
            self.open += 1
            stopping = asyncio.create_task(self._stop.wait())
            closed = asyncio.create_task(ws.wait_closed())
            waits = [stopping, closed]
            if self.lifetime:
                life = random.expovariate(1 / self.lifetime)
                waits.append(asyncio.create_task(asyncio.sleep(life)))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in [*waits[2:], stopping]:
                waiting.cancel()
            self.open -= 1
            if not closed.done():
                closed.cancel()
                await ws.close()
                if self._stop.is_set():
                    return
                self.results.ended += 1  # its lifetime is over: a new one replaces it
                ws = await self._connect()
                continue
            closed_at = time.monotonic()
            self.results.closed.append(closed_at)
            self.results.closes[index] += 1
            self.results.codes[str(ws.close_code)] += 1
            ws = await self._connect()  # at once: the storm
            if ws is not None:
                self.results.reconnected.append((closed_at, time.monotonic()))


def run_storm_client(
    url: str, count: int, source: str, pipe: Any, lifetime: float = 0.0, rate: float = 0.0
) -> None:
    """A storm client process (multiprocessing): answers "status" on its pipe with (open
    connections, closes, reconnections, failures), and "stop" with its StormResults."""
    client = StormClient(url, count, source, lifetime=lifetime, rate=rate)

    async def main() -> StormResults:
        loop = asyncio.get_running_loop()

        def on_request() -> None:
            if pipe.recv() == "stop":
                loop.remove_reader(pipe.fileno())
                client.stop()
            else:
                r = client.results
                pipe.send((client.open, sum(r.closes), len(r.reconnected), len(r.failed)))

        loop.add_reader(pipe.fileno(), on_request)
        return await client.run()

    pipe.send(asyncio.run(main()))
