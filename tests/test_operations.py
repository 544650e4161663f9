"""WebSocket-aware operations (docs/operations.md, docs/restart.md): drains spread over a
window, one close per client per reload, and connection age, with real masters and workers and
real clients.

Each scenario runs its clients in one asyncio loop and records, per connection, when and how
the server closed it, measured from the signal that caused it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from wsfleet import config as cfg
from wsfleet.fleet import RETIRE_SETTLE

from .support.harness import gone
from .support.helpers import Master, app_master, run_wsfleet, start_worker
from .support.wire import close_code, recv_frame, stuck_client

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


def test_term_paces_the_closes_by_the_drain_rate_in_random_order(spawn) -> None:
    """40 connections at 20 closes a second: ~10 closes in each half second for 2 s, in an
    order unrelated to the connections' own; the graceful timeout (0.5 s) counts from the
    last close, so the last connections still get their 1001 instead of being aborted."""
    proc, port = start_worker(spawn, "--drain-rate", "20", "--graceful-timeout", "0.5")

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
    """40 connections at 10 closes a second per worker would take 2 s or more: the 2 s
    window bounds it, and the closes are spread evenly over the window instead."""
    options = ("--drain-window", "2", "--drain-rate", "5")
    master = Master(spawn, tmp_path, "-w", "2", *options)

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


def test_bad_drain_window_rate_or_age_is_exit_2() -> None:
    for option in ("--drain-window", "--max-connection-age"):
        result = run_wsfleet(["worker", option, "-1"])
        assert result.returncode == 2 and f"argument {option}: expected a non-negative" in (
            result.stderr
        )
    for value in ("0", "-3", "fast"):
        result = run_wsfleet(["worker", "--drain-rate", value])
        assert result.returncode == 2
        assert f"argument --drain-rate: expected a positive number, got '{value}'" in result.stderr


def test_scaling_down_spreads_the_removed_workers_closes(spawn, tmp_path: Path) -> None:
    """TTOU: the removed slot's worker closes its connections (1001) over the window (at 10
    a second, its 10 or more take the whole window); the other worker's stay open."""
    master = Master(spawn, tmp_path, "-w", "2", "--drain-window", "1", "--drain-rate", "10")

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
    # (its closes begin once its socket's queue is empty: RETIRE_SETTLE after the TTOU)
    settle = RETIRE_SETTLE
    assert settle < times[0] < settle + 0.3 and settle + 0.6 < times[-1] < settle + 1.5, times


def test_stop_closes_a_few_idle_connections_at_once(spawn, tmp_path: Path) -> None:
    """4 idle clients over 4 workers: at 250 closes a second each is closed at once (1001),
    and `wsfleet stop` returns once the master has exited: well under a second, where a
    drain spread over the whole 10 s window took 6.9 s."""
    master = Master(spawn, tmp_path, "-w", "4")
    stop = [sys.executable, "-m", "wsfleet", "stop", "--pidfile", master.pidfile]

    async def scenario() -> tuple[float, list[Closed], float]:
        connections = await open_all(master.url, 4)
        stopping: list[asyncio.Task[int]] = []

        async def run_stop() -> int:
            process = await asyncio.create_subprocess_exec(*stop)
            return await process.wait()

        started, closes = await closes_of(
            connections, lambda: stopping.append(asyncio.create_task(run_stop()))
        )
        assert await stopping[0] == 0
        return started, closes, time.monotonic()

    started, closes, stopped = asyncio.run(scenario())
    assert [c.code for c in closes] == [1001] * 4
    assert max(c.at for c in closes) - started < 1.0
    assert stopped - started < 2.0  # the command's own start-up included
    assert master.proc.wait() == 0


def test_a_second_term_closes_every_remaining_connection_at_once(spawn, tmp_path: Path) -> None:
    """A drain paced at 1 close a second, one client that never answers a close: the second
    TERM sends every remaining connection its close frame (1001, not a reset) at once, and
    the master exits without waiting for the silent client beyond the short bound."""
    options = ("--drain-rate", "1", "--graceful-timeout", "60")
    master = Master(spawn, tmp_path, "-w", "1", *options)

    async def scenario() -> tuple[float, list[Closed], int]:
        connections = await open_all(master.url, 6)
        with stuck_client(master.port) as silent:
            silent_close = asyncio.create_task(asyncio.to_thread(close_frame, silent))
            closed: list[Closed] = []
            master.proc.signal(signal.SIGTERM)
            second: list[float] = []

            def again() -> None:  # once the first close is out: the rest are paced
                master.proc.signal(signal.SIGTERM)
                second.append(time.monotonic())

            async with asyncio.timeout(10):
                while not any(ws.close_code for ws in connections) and not silent_close.done():
                    await asyncio.sleep(0.01)
                _, closed = await closes_of(
                    [ws for ws in connections if ws.close_code is None], again
                )
                code = await silent_close
            exit_status = await asyncio.to_thread(master.proc.wait, 10)
            assert time.monotonic() - second[0] < cfg.hurry_limit()
        return second[0], closed, code if exit_status == 0 else -1

    hurried, closed, silent_code = asyncio.run(scenario())
    assert len(closed) >= 5 and {c.code for c in closed} == {1001}
    assert max(c.at for c in closed) - hurried < 0.5
    assert silent_code == 1001


def close_frame(sock: socket.socket) -> int:
    """The close code of the next frame a raw client receives (it must be a close frame)."""
    opcode, payload = recv_frame(sock, bytearray())
    assert opcode == 8, f"expected a close frame, got opcode {opcode}"
    return close_code(payload)


def test_workers_close_at_once_when_the_master_is_killed(spawn, tmp_path: Path) -> None:
    """600 connections over 2 workers and one client that never answers; kill -9 of the
    master: every connection gets 1001 at once, not paced (300 at 250 a second would take
    over a second each), and both workers are gone within 2 s."""
    master = Master(spawn, tmp_path, "-w", "2")
    workers = master.worker_pids()

    async def scenario() -> tuple[float, list[Closed], float]:
        connections = await open_all(master.url, 600)
        with stuck_client(master.port):
            started, closes = await closes_of(connections, master.proc.popen.kill)
            while not all(gone(pid) for pid in workers) and time.monotonic() - started < 10:
                await asyncio.sleep(0.01)
            return started, closes, time.monotonic()

    try:
        started, closes, ended = asyncio.run(scenario())
        assert {c.code for c in closes} == {1001}
        assert max(c.at for c in closes) - started < 1.0
        assert ended - started < 2.0
    finally:
        for pid in workers:  # orphans are nobody's children: end them by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


LINGERING_APP = """
import asyncio
import os


async def handler(websocket):
    try:
        async for message in websocket:
            await websocket.send(str(os.getpid()) if message == "pid?" else message)
    finally:
        while True:  # ignores its cancellation: only the process's end stops it
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
"""


def test_twenty_hups_with_lingering_handlers_settle(spawn, tmp_path: Path) -> None:
    """20 SIGHUPs 50 ms apart with 40 reconnecting clients, on an app whose handlers ignore
    their cancellation: the fleet settles (two ready workers of the last generation, every
    other worker gone) within graceful timeout + close timeout + 10 s of the last HUP."""
    graceful, close = 2.0, 1.0
    options = ("--graceful-timeout", str(graceful), "--close-timeout", str(close))
    master = app_master(spawn, tmp_path, LINGERING_APP, "-w", "2", *options)
    seen: set[int] = set()
    codes: list[int | None] = []

    def settled() -> bool:
        status = master.status()
        workers = status["workers"]
        seen.update(w["pid"] for w in workers)
        return (
            status["master"]["last_restart"] == "done"
            and [w["state"] for w in workers] == ["ready", "ready"]
            and all(gone(pid) for pid in seen - {w["pid"] for w in workers})
        )

    async def client(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with connect(master.url, open_timeout=10) as ws:
                    await ws.send("pid?")
                    await ws.recv()
                    stopped = asyncio.ensure_future(stop.wait())
                    closed = asyncio.ensure_future(ws.recv())  # (the close, as an exception)
                    try:
                        await asyncio.wait([stopped, closed], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stopped.cancel()
                        closed.cancel()
                    error = closed.exception() if closed.done() and not closed.cancelled() else None
                    if error is not None:
                        raise error  # ConnectionClosed: its code is counted below
            except ConnectionClosed as exc:
                codes.append(exc.rcvd.code if exc.rcvd else None)

    async def scenario() -> float:
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(stop)) for _ in range(40)]
        try:
            async with asyncio.timeout(60):
                while sum(w["connections"] for w in master.status()["workers"]) < 40:
                    await asyncio.sleep(0.05)
                for _ in range(20):
                    master.proc.signal(signal.SIGHUP)
                    await asyncio.sleep(0.05)
                last = time.monotonic()
                while not settled():
                    await asyncio.sleep(0.1)
                return time.monotonic() - last
        finally:
            stop.set()
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

    took = asyncio.run(scenario())
    assert took < graceful + close + 10, took
    assert len(seen) > 2 and codes and set(codes) == {1012}, (seen, codes)
