"""--max-worker-memory with real processes: a worker whose app grows past the bound is replaced
like one slot of a reload (its clients get 1012, no new connection fails, the other slot is
untouched), counted in the status and the metrics; bad values are refused. The decisions
themselves (one slot at a time, waiting for a reload, no loop) are tests/test_fleet.py's."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from websockets.asyncio.client import ClientConnection, connect

from .support.helpers import Master, run_wsfleet, scrape, total

MIB = 2**20
BOUND = 64  # MiB: a forked worker starts at about 5 (USS); two "grow" take it over

GROWING_APP = """
import os

GROWN = []


async def handler(websocket):
    async for message in websocket:
        if message == "grow":
            GROWN.append(b"\\x01" * (40 * 2**20))  # written: 40 MiB of the worker's own pages
            await websocket.send(str(len(GROWN)))
        else:
            await websocket.send(str(os.getpid()))
"""


async def settled(condition, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_a_worker_past_max_worker_memory_is_replaced_and_no_connection_fails(
    spawn, tmp_path
) -> None:
    (tmp_path / "app.py").write_text(GROWING_APP)
    master = Master(
        spawn,
        tmp_path,
        "-w",
        "2",
        "--max-worker-memory",
        str(BOUND),
        "--metrics",
        "127.0.0.1:0",
        "--app",
        "app:handler",
        cwd=tmp_path,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    master.wait_workers(2)
    metrics = master.status()["master"]["metrics"]

    def by_pid() -> dict[int, dict]:
        return {w["pid"]: w for w in master.status()["workers"]}

    async def ask(ws: ClientConnection, message: str) -> str:
        await ws.send(message)
        reply = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(reply, str)
        return reply

    async def scenario() -> None:
        first = by_pid()
        assert all(w["memory"] is not None and w["memory"] < BOUND * MIB for w in first.values())
        assert master.status()["master"]["max_worker_memory"] == BOUND
        clients: dict[int, list[ClientConnection]] = {pid: [] for pid in first}
        while min(len(c) for c in clients.values()) < 10 or sum(map(len, clients.values())) < 30:
            ws = await connect(master.url)
            clients[int(await ask(ws, "pid"))].append(ws)
        grower = clients[min(clients)][0]
        grown, other = min(clients), max(clients)
        slot = first[grown]["slot"]
        # One step of 40 MiB: read (every 5 s) and under the bound: nothing happens.
        assert await ask(grower, "grow") == "1"
        await settled(
            lambda: by_pid()[grown]["memory"] > first[grown]["memory"] + 35 * MIB,
            "the worker's reading to show its 40 MiB",
        )
        assert set(by_pid()) == set(first)
        # New connections all along: none may fail while the slot changes workers.
        attempts, failures, stop = [0], [], asyncio.Event()

        async def churn() -> None:
            while not stop.is_set():
                attempts[0] += 1
                try:
                    async with connect(master.url, open_timeout=10) as ws:
                        await ask(ws, "pid")
                except Exception as exc:  # (any: a refused or reset connection, a 503)
                    failures.append(repr(exc))
                await asyncio.sleep(0.01)

        churners = [asyncio.create_task(churn()) for _ in range(2)]
        assert await ask(grower, "grow") == "2"  # over the bound at the next reading
        grew = time.monotonic()

        def replaced() -> bool:
            workers = master.status()["workers"]
            serving = {w["slot"]: w for w in workers if w["state"] == "ready"}
            return len(workers) == 2 and slot in serving and serving[slot]["pid"] != grown

        await settled(replaced, "the grown worker to be replaced and gone")
        took = time.monotonic() - grew
        await asyncio.sleep(0.5)  # (new connections to the new worker too)
        stop.set()
        await asyncio.gather(*churners)
        print(
            f"grown worker replaced and gone {took:.1f}s after it passed the bound; "
            f"{attempts[0]} connection attempts meanwhile, {len(failures)} failed; "
            f"{len(clients[grown])} of its clients closed, {len(clients[other])} kept"
        )
        assert failures == [] and attempts[0] > 20, (failures, attempts)
        # Its clients were closed with 1012; the other worker's are open, on the same pid.
        for ws in clients[grown]:
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert (ws.close_code, ws.close_reason) == (1012, "service restart")
        now = by_pid()
        assert other in now and now[other]["memory"] < BOUND * MIB
        for ws in clients[other]:
            assert await ask(ws, "pid") == str(other)
            await ws.close()
        (new,) = [w for w in now.values() if w["slot"] == slot]
        assert new["memory"] is not None and new["memory"] < BOUND * MIB

    asyncio.run(scenario())
    status = master.status()["master"]
    assert status["restarts_by_reason"]["memory"] == 1
    assert status["restarts_by_reason"]["reload"] == 0 and status["restarts"] == 0
    assert status["reload"]["kind"] == "none"  # (wsfleet reload's outcome: untouched)
    samples = scrape(metrics)
    assert total(samples, "wsfleet_worker_restarts_total", reason="memory") == 1
    assert total(samples, "wsfleet_worker_restarts_total", reason="reload") == 0
    per_slot = {
        dict(labels)["slot"]: v
        for (name, labels), v in samples.items()
        if name == "wsfleet_worker_memory_bytes"
    }
    assert sorted(per_slot) == ["0", "1"] and all(0 < v < BOUND * MIB for v in per_slot.values())
    said = re.compile(
        rf"worker \d+ \(slot \d\) uses \d+\.\d MiB \(USS\), over --max-worker-memory {BOUND} "
        r"MiB: replacing it"
    )
    assert len([line for line in master.proc.lines if said.search(line)]) == 1
    text = run_wsfleet(["status", "--pidfile", master.pidfile])
    assert "MEMORY" in text.stdout and f"over {BOUND} MiB a worker is replaced" in text.stdout


@pytest.mark.parametrize(
    ("where", "value"),
    [("cli", "-1"), ("cli", "1.5"), ("env", "lots"), ("toml", "'512'"), ("toml", "-3")],
)
def test_bad_values_of_max_worker_memory_are_refused(tmp_path, where: str, value: str) -> None:
    args, env = ["start", "--port", "0"], {}
    if where == "cli":
        args += ["--max-worker-memory", value]
    elif where == "env":
        env["WSFLEET_MAX_WORKER_MEMORY"] = value
    else:
        (tmp_path / "w.toml").write_text(f"max_worker_memory = {value}\n")
        args += ["--config", str(tmp_path / "w.toml")]
    result = run_wsfleet(args, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    message = {
        "cli": "--max-worker-memory",
        "env": "WSFLEET_MAX_WORKER_MEMORY",
        "toml": "w.toml:1: max_worker_memory",
    }[where]
    assert message in result.stderr, result.stderr
    expected = "an integer" if value == "'512'" else "a whole number of MiB, 0 or more"
    assert expected in result.stderr, result.stderr
    assert "listening on" not in result.stdout + result.stderr


def test_a_lone_worker_has_no_max_worker_memory() -> None:
    """(Its supervisor restarts it: the bound is the master's, `start` only.)"""
    result = run_wsfleet(["worker", "--port", "0", "--max-worker-memory", "64"])
    assert result.returncode == 2 and "--max-worker-memory" in result.stderr, result.stderr


def test_the_status_reads_no_memory_without_the_bound(spawn, tmp_path) -> None:
    master = Master(spawn, tmp_path, "-w", "1")
    master.wait_workers(1)
    status = master.status()
    assert status["master"]["max_worker_memory"] == 0
    assert [w["memory"] for w in status["workers"]] == [None]
    text = run_wsfleet(["status", "--pidfile", master.pidfile])
    assert "MEMORY" not in text.stdout and "USS" not in text.stdout
