"""WebSocket-aware operations (docs/operations.md, docs/restart.md): drains spread over a
window, one close per client per reload, and connection age, with real masters and workers and
real clients.

Each scenario runs its clients in one asyncio loop and records, per connection, when and how
the server closed it, measured from the signal that caused it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .helpers import run_wsfleet
from .test_master import Master, app_master
from .test_worker import start_worker

PID_APP = """
import os


async def handler(websocket):
    async for message in websocket:
        await websocket.send(str(os.getpid()) if message == "pid?" else message)
"""


@dataclass
class Closed:
    index: int  # in the order the connections were opened
    at: float  # time.monotonic()
    code: int | None
    reason: str


async def open_all(url: str, count: int) -> list[ClientConnection]:
    return [await connect(url, open_timeout=10) for _ in range(count)]


async def closes_of(
    connections: list[ClientConnection], cause: Callable[[], object], timeout: float = 20
) -> tuple[float, list[Closed]]:
    """Call cause(); wait until the server has closed every connection. Returns the time of
    the cause and each connection's close."""

    async def watch(index: int, ws: ClientConnection) -> Closed:
        try:
            await ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return Closed(
                index, time.monotonic(), rcvd.code if rcvd else None, rcvd.reason if rcvd else ""
            )
        raise AssertionError("the server sent a message instead of closing")

    watchers = [asyncio.create_task(watch(i, ws)) for i, ws in enumerate(connections)]
    await asyncio.sleep(0)  # every watcher waits in recv() before the cause
    started = time.monotonic()
    cause()
    async with asyncio.timeout(timeout):
        return started, list(await asyncio.gather(*watchers))


def spread(closes: list[Closed], since: float, window: float) -> list[int]:
    """How many closes fell in each quarter of the window (from since)."""
    quarters = [0, 0, 0, 0]
    for c in closes:
        quarters[min(3, int((c.at - since) / window * 4))] += 1
    return quarters


def test_term_spreads_the_closes_over_the_drain_window_in_random_order(spawn) -> None:
    """40 connections, window 2 s: ~10 closes in each half second, in an order unrelated to
    the connections' own; the graceful timeout (0.5 s) counts from the window's end, so the
    last connections still get their 1001 instead of being aborted."""
    proc, port = start_worker(spawn, "--drain-window", "2", "--graceful-timeout", "0.5")

    async def scenario() -> tuple[float, list[Closed]]:
        connections = await open_all(f"ws://127.0.0.1:{port}/", 40)
        return await closes_of(connections, lambda: proc.signal(signal.SIGTERM))

    started, closes = asyncio.run(scenario())
    assert {c.code for c in closes} == {1001}
    delays = sorted(c.at - started for c in closes)
    assert delays[0] < 0.3 and 1.7 < delays[-1] < 2.5, delays
    assert all(5 <= n <= 15 for n in spread(closes, started, 2.0)), spread(closes, started, 2.0)
    order = [c.index for c in sorted(closes, key=lambda c: c.at)]
    assert order != sorted(order) and order != sorted(order, reverse=True)
    assert proc.wait() == 0


def test_a_reload_spreads_its_closes_over_the_drain_window(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2", "--drain-window", "2")

    async def scenario() -> tuple[float, list[Closed]]:
        connections = await open_all(master.url, 40)
        return await closes_of(connections, lambda: master.proc.signal(signal.SIGHUP))

    started, closes = asyncio.run(scenario())
    assert {c.code for c in closes} == {1012}
    first = min(c.at for c in closes)
    # The old workers hold their connections until both slots have new workers (a fork and
    # an import: well under a second), then close them over the window.
    assert first - started < 1.0
    assert all(5 <= n <= 15 for n in spread(closes, first, 2.0)), spread(closes, first, 2.0)
    assert 1.7 < max(c.at for c in closes) - first < 2.5


@dataclass
class Client:
    """A client that asks which worker serves it, and reconnects whenever it is closed."""

    pids: list[int] = field(default_factory=list)  # the worker of each connection, in order
    closes: list[int | None] = field(default_factory=list)


async def reconnecting(url: str, client: Client, stop: asyncio.Event) -> None:
    while not stop.is_set():
        async with connect(url, open_timeout=10) as ws:
            await ws.send("pid?")
            client.pids.append(int(await ws.recv()))
            done = asyncio.create_task(stop.wait())
            closed = asyncio.create_task(ws.wait_closed())
            await asyncio.wait([done, closed], return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            if closed.done():
                client.closes.append(ws.close_code)
            else:
                closed.cancel()


async def during(
    clients: list[Client],
    url: str,
    ready: Callable[[], bool],
    action: Callable[[], Awaitable[None]],
) -> None:
    """Run the clients; once ready() holds (every one connected), do the action; stop them
    once every client that was closed has reconnected."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(reconnecting(url, c, stop)) for c in clients]
    try:
        async with asyncio.timeout(30):
            while not ready():
                await asyncio.sleep(0.05)
            await action()
            while any(len(c.pids) != len(c.closes) + 1 for c in clients):
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def test_a_reload_closes_each_client_once_and_it_lands_on_a_new_worker(spawn, tmp_path) -> None:
    """200 clients that reconnect at once when closed, a rolling restart of 4 workers: each
    client is closed exactly once, with 1012, and its new connection is served by a new
    worker. (Without the hold, a client closed by a slot's old worker could reconnect to a
    slot not restarted yet, and be closed again.)"""
    master = app_master(spawn, tmp_path, PID_APP, "-w", "4", "--drain-window", "1")
    old = master.worker_pids()
    clients = [Client() for _ in range(200)]
    done: list[bool] = []

    async def reload() -> None:
        process = await asyncio.create_subprocess_exec(
            *reload_command(master.pidfile), stdout=asyncio.subprocess.DEVNULL
        )
        done.append(await process.wait() == 0)
        while master.worker_pids() & old:  # the old workers close over the window, then exit
            await asyncio.sleep(0.05)

    asyncio.run(during(clients, master.url, lambda: all(c.pids for c in clients), reload))
    assert done == [True]
    new = master.worker_pids() - old
    assert len(new) == 4
    assert [c.closes for c in clients] == [[1012]] * 200
    assert all(c.pids[0] in old and c.pids[1] in new for c in clients)


def reload_command(pidfile: str) -> list[str]:
    return [sys.executable, "-m", "wsfleet", "reload", "--wait", "--pidfile", pidfile]


BREAKING_APP = """
import os

# Every import is counted; once the file 'broken' says how many may succeed, the later ones
# fail, as new code would that breaks after the first slot of a rolling restart.
with open("imports", "a") as f:
    f.write("x")
if os.path.exists("broken"):
    if os.path.getsize("imports") > int(open("broken").read()):
        raise RuntimeError("this code is broken")


async def handler(websocket):
    async for message in websocket:
        await websocket.send(str(os.getpid()) if message == "pid?" else message)
"""


def test_an_aborted_reload_closes_only_what_it_held_and_every_slot_serves(spawn, tmp_path) -> None:
    """3 workers; the reload's first new worker starts, the second fails: the held old worker
    of slot 0 closes its clients (once, 1012), slots 1 and 2 keep their old workers and
    clients, and nothing is left held or draining."""
    master = app_master(spawn, tmp_path, BREAKING_APP, "-w", "3", "--drain-window", "0.5")
    (tmp_path / "broken").write_text("4")  # 3 imports at boot, one more may succeed
    old = master.worker_pids()
    clients = [Client() for _ in range(60)]
    results: list[int] = []

    async def reload() -> None:
        process = await asyncio.create_subprocess_exec(
            *reload_command(master.pidfile),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        results.append(await process.wait())
        # The held worker's clients come back; wait until its drain has ended.
        while len(master.status()["workers"]) != 3:
            await asyncio.sleep(0.05)

    asyncio.run(during(clients, master.url, lambda: all(c.pids for c in clients), reload))
    assert results == [1]
    assert master.status()["master"]["last_restart"].startswith("failed")
    status = master.status()["workers"]
    assert [w["state"] for w in status] == ["ready"] * 3
    (new,) = {w["pid"] for w in status} - old
    served = {w["slot"]: w["pid"] for w in status}
    assert served[0] == new and {served[1], served[2]} <= old
    held = [c for c in clients if c.closes]
    assert held and all(c.closes == [1012] and c.pids[1] != c.pids[0] for c in held)
    assert all(c.pids[0] in old for c in clients)
    assert all(c.pids[0] in (served[1], served[2]) for c in clients if not c.closes)


def test_max_connection_age_closes_each_connection_with_jitter(spawn) -> None:
    proc, port = start_worker(spawn, "--max-connection-age", "1")

    async def scenario() -> tuple[list[float], list[Closed]]:
        connections, opened = [], []
        for _ in range(30):
            connections.append(await connect(f"ws://127.0.0.1:{port}/"))
            opened.append(time.monotonic())
        _, closes = await closes_of(connections, lambda: None)
        return opened, closes

    opened, closes = asyncio.run(scenario())
    assert {(c.code, c.reason) for c in closes} == {(1012, "max connection age")}
    ages = [c.at - opened[c.index] for c in closes]
    # 1 s +-10%, and a little for the client's own scheduling; jittered, not all alike.
    assert all(0.88 < age < 1.2 for age in ages), ages
    assert max(ages) - min(ages) > 0.05, ages
    assert proc.popen.poll() is None  # the worker goes on serving


def test_bad_drain_window_or_age_is_exit_2() -> None:
    for option in ("--drain-window", "--max-connection-age"):
        result = run_wsfleet(["worker", option, "-1"])
        assert result.returncode == 2 and f"argument {option}: expected a non-negative" in (
            result.stderr
        )


def test_scaling_down_spreads_the_removed_workers_closes(spawn, tmp_path: Path) -> None:
    """TTOU: the removed slot's worker closes its connections (1001) over the window; the
    other worker's stay open."""
    master = Master(spawn, tmp_path, "-w", "2", "--drain-window", "1")

    async def run() -> tuple[float, list[Closed], int]:
        """Watch every connection; stop once the removed worker has exited."""
        connections = await open_all(master.url, 40)
        closed: list[Closed] = []

        async def watch(index: int, ws: ClientConnection) -> None:
            try:
                await ws.recv()
            except ConnectionClosed as exc:
                assert exc.rcvd is not None
                closed.append(Closed(index, time.monotonic(), exc.rcvd.code, exc.rcvd.reason))

        watchers = [asyncio.create_task(watch(i, ws)) for i, ws in enumerate(connections)]
        await asyncio.sleep(0)
        started = time.monotonic()
        master.proc.signal(signal.SIGTTOU)
        async with asyncio.timeout(20):
            while len(master.status()["workers"]) != 1:
                await asyncio.sleep(0.05)
        still_open = sum(not w.done() for w in watchers)
        for w in watchers:
            w.cancel()
        for ws in connections:
            await ws.close()
        return started, closed, still_open

    started, closed, still_open = asyncio.run(run())
    assert closed and still_open and len(closed) + still_open == 40
    assert {c.code for c in closed} == {1001}
    times = sorted(c.at - started for c in closed)
    assert times[0] < 0.3 and 0.6 < times[-1] < 1.5, times
