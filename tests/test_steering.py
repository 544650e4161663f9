"""wsfleet/steering.py: the BPF program, the group's numbering and the least-connections
weights, in milliseconds (the program run by a small interpreter of its four instructions);
then the kernel: a group numbered as :class:`~wsfleet.steering.Group` says, and connections
placed by the weights, on real sockets of 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import socket
import statistics
import struct
import time

import pytest
from websockets.asyncio.client import connect

from wsfleet import steering

from .support.harness import wait_for
from .support.helpers import Master


def run(code: bytes, random: int) -> int:
    """What the kernel would return for ``random`` (SKF_AD_RANDOM)."""
    instructions = [struct.unpack_from("=HBBI", code, i) for i in range(0, len(code), 8)]
    a, pc = 0, 0
    while True:
        op, jt, jf, k = instructions[pc]
        if op == 0x20:  # ld [k] (SKF_AD_RANDOM only)
            assert k == (-0x1000 + 56) & 0xFFFFFFFF
            a = random
        elif op == 0x94:  # a %= k
            a %= k
        elif op == 0x35:  # jge #k
            pc += jt if a >= k else jf
        elif op == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
        pc += 1


@pytest.mark.parametrize(
    "weights", [[1], [1, 1, 1, 1], [0, 0, 1, 3], [5, 0, 2], [0, 7], [3, 0, 0], [1] * 64]
)
def test_the_program_picks_each_socket_in_proportion_to_its_weight(weights) -> None:
    code = steering.program(weights)
    total = sum(weights)
    picks = collections.Counter(run(code, r) for r in range(3 * total))
    assert picks == collections.Counter({i: 3 * w for i, w in enumerate(weights) if w})


def test_no_weight_leaves_the_choice_to_the_kernels_hash() -> None:
    assert run(steering.program([0, 0, 0]), 12345) == steering.HASH
    assert run(steering.program([]), 0) == steering.HASH


def test_bad_weights_raise() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        steering.program([1, -1])
    with pytest.raises(ValueError, match="32 bits"):
        steering.program([2**31, 2**31])
    with pytest.raises(ValueError, match="at most"):
        steering.program([1] * (steering.MAX_SOCKETS + 1))


def test_a_group_fills_a_hole_with_its_last_member() -> None:
    group = steering.Group()
    for key in "abcd":
        group.join(key)
    group.leave("b")
    assert group.members == ["a", "d", "c"]
    group.leave("c")  # (the last: nothing moves)
    assert group.members == ["a", "d"]
    group.join("e")
    assert group.weights({"a": 1, "e": 5}) == [1, 0, 5]
    with pytest.raises(ValueError):
        group.join("a")


def test_a_slot_set_aside_keeps_its_place_while_its_index_serves_again() -> None:
    steerer = steering.Steerer(2)
    for slot in (0, 1, 2):
        steerer.join(slot)
    key = steerer.set_aside(2)  # TTOU: slot 2's sockets wait to close...
    steerer.join(2)  # ...while TTIN adds a new slot 2
    assert key < 0 and all(g.members == [0, 1, key, 2] for g in steerer.groups)
    assert steerer.groups[1].weights({0: 1, 1: 1, 2: 1}) == [1, 1, 0, 1]
    steerer.leave(key)
    assert all(g.members == [0, 1, 2] for g in steerer.groups)
    assert steerer.set_aside(1) == key - 1 and steerer.orders() == [[0, key - 1, 2]] * 2


def test_least_connections_weights_the_emptier_workers_more() -> None:
    top = steering.WEIGHT_MAX
    assert steering.least_connections([10, 10, 10]) == [top] * 3  # equal counts, equal weights
    # A trickle goes to the emptiest; the others keep a share.
    assert steering.least_connections([100, 100, 0, 0]) == [1, 1, top, top]
    assert steering.least_connections([40, None, 0, 30], arriving=1) == [1, 0, top, 1]
    # 100 arriving fill 0, 30 and 40 up to 56.7: each weighs what it lacks to that level.
    assert steering.least_connections([40, None, 0, 30], arriving=100) == [19275, 0, top, 30840]
    # A burst much larger than the workers' differences: nearly even.
    assert steering.least_connections([55, 45], arriving=300) == [61308, top]
    assert steering.least_connections([None, None]) == [0, 0]
    assert steering.least_connections([]) == []
    many = steering.least_connections([10**6] + [0] * (steering.MAX_SOCKETS - 1), 10**6)
    assert many[0] == 1 and sum(many) < 2**32


def simulate(start: list[int], new: int, every: int, seed: int) -> list[int]:
    """``new`` connections placed by least_connections' weights (a random pick, as the
    program makes it), the weights updated every ``every`` connections from the counts as
    they were one update before (a report's age), expecting the ``2 * every`` connections
    placed on that view."""
    rng = random.Random(seed)
    counts = list(start)
    views = [list(counts)]
    for placed in range(new):
        if placed % every == 0:
            views.append(list(counts))
            weights = steering.least_connections(views[-2], arriving=2 * every)
        (chosen,) = rng.choices(range(len(counts)), weights)
        counts[chosen] += 1
    return counts


def ratios(start: list[int], new: int, every: int) -> list[float]:
    return [max(c) / min(c) for c in (simulate(start, new, every, seed) for seed in range(20))]


def test_least_connections_spreads_a_burst() -> None:
    """1,000 connections at once on two empty workers, 100 placed per view of the counts:
    nearly even (max/min 1.02 median; weights from the deficits alone, squared, send each
    view's connections to whichever worker was behind: 1.37)."""
    assert statistics.median(ratios([0, 0], 1000, 100)) <= 1.05


def test_least_connections_fills_the_emptiest_first() -> None:
    """After a scale-up whose new connections cannot even everything out (1,200 new on
    535/665/0/0; at best 665/578/578/578, max/min 1.15), the weights fill the emptier
    workers up to the others' level (1.16 median; proportional weights leave each worker
    short by the same fraction of its deficit: 1.28)."""
    found = ratios([535, 665, 0, 0], 1200, 30)
    assert statistics.median(found) <= 1.18, found
    assert min(found) >= 1.15  # (none better than the best: a wrong count would be)


# The kernel


def group_of(count: int) -> tuple[list[socket.socket], int]:
    """``count`` SO_REUSEPORT listeners of one port on 127.0.0.1, bound, not listening."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", sockets[0].getsockname()[1] if sockets else 0))
        sock.setblocking(False)
        sockets.append(sock)
    return sockets, sockets[0].getsockname()[1]


def accepted_by(sockets: list[socket.socket], port: int, count: int) -> list[int]:
    """Open ``count`` connections; how many each socket accepted."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    got = []
    for sock in sockets:
        n = 0
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            conn.close()
            n += 1
        got.append(n)
    for client in clients:
        client.close()
    assert sum(got) == count, got  # (the backlogs hold them all: nothing lost)
    return got


def test_the_kernel_numbers_a_group_as_group_says() -> None:
    """Joined at listen() (here in the order c, a, b), and a closed socket's index goes to
    the last: a program that names one index reaches the socket Group says."""
    sockets, port = group_of(3)
    by_name = dict(zip("abc", sockets, strict=True))
    group = steering.Group()
    try:
        for name in "cab":
            by_name[name].listen(64)
            group.join(name)
        for name in list(by_name):
            steering.attach(by_name["a"], group.weights({name: 1}))
            got = accepted_by(list(by_name.values()), port, 5)
            assert dict(zip(by_name, got, strict=True))[name] == 5, (name, got)
        by_name.pop("c").close()
        group.leave("c")
        assert group.members == ["b", "a"]
        for name in by_name:
            steering.attach(by_name["a"], group.weights({name: 1}))
            got = accepted_by(list(by_name.values()), port, 5)
            assert dict(zip(by_name, got, strict=True))[name] == 5, (name, got)
    finally:
        for sock in sockets:
            sock.close()


def test_a_socket_leaves_its_group_only_with_its_last_descriptor() -> None:
    """The master closing its copy of a slot's socket while a worker holds another leaves
    the group as it was (a connection can still land there): why a slot scaled away
    closes only once its workers have closed theirs."""
    sockets, port = group_of(3)
    copy = None
    try:
        for sock in sockets:
            sock.listen(64)
        copy = sockets[1].dup()  # (a worker's)
        sockets[1].close()
        steering.attach(sockets[0], [0, 1, 0])
        assert accepted_by([sockets[0], copy, sockets[2]], port, 5) == [0, 5, 0]
        copy.close()  # now it leaves, and the last socket takes its index
        steering.attach(sockets[0], [0, 1])
        assert accepted_by([sockets[0], sockets[2]], port, 5) == [0, 5]
    finally:
        for sock in (*sockets, copy):
            if sock is not None:
                sock.close()


def test_the_kernel_places_connections_by_the_weights_and_detaches() -> None:
    sockets, port = group_of(4)
    try:
        for sock in sockets:
            sock.listen(512)
        steering.attach(sockets[0], [0, 0, 1, 3])
        got = accepted_by(sockets, port, 400)
        # (binomial, p = 1/4 of 400: sd 8.7; these bounds are over 4.5 sd away)
        assert got[:2] == [0, 0] and 60 <= got[2] <= 140, got
        steering.attach(sockets[0], [0, 0, 0, 0])  # the hash: every socket gets some
        assert all(accepted_by(sockets, port, 200))
        steering.attach(sockets[0], [1, 0, 0, 0])
        assert accepted_by(sockets, port, 20) == [20, 0, 0, 0]
        steering.detach(sockets[0])
        assert all(accepted_by(sockets, port, 200))
    finally:
        for sock in sockets:
            sock.close()


# The master steering its workers


def spread_after_scale_up(spawn, tmp_path, balance: str, before: int, after: int) -> list[int]:
    """``before`` long-lived connections on -w 2, TTIN twice, then ``after`` more: each of the
    4 workers' open connections, as their heartbeats report them."""
    tmp_path.mkdir()
    master = Master(spawn, tmp_path, "-w", "2", "--balance", balance)
    master.wait_workers(2)

    def counts() -> list[int]:
        return [w["connections"] for w in master.status()["workers"] if w["state"] == "ready"]

    async def scenario() -> list[int]:
        url = master.url
        clients = [await connect(url) for _ in range(before)]
        await settled(lambda: sum(counts()) == before, "the first connections")
        for workers in (3, 4):  # (one at a time: two signals at once may arrive as one)
            master.proc.signal(signal.SIGTTIN)
            await settled(lambda n=workers: len(counts()) == n, f"{workers} ready workers")
        if balance == "least-connections":  # (the new workers' counts heard, and weighed)
            await settled(lambda: len(master.status()["master"]["balance"]["weights"]) == 4, "")
        # In 4 waves, each counted (the workers' heartbeats) before the next: new
        # connections keep coming while the weights follow, as in life.
        for wave in range(1, 5):
            for _ in range(after // 4):
                clients.append(await connect(url))
            expected = before + wave * (after // 4)
            await settled(lambda n=expected: sum(counts()) == n, "the connections counted")
        spread = counts()
        for client in clients:
            await client.close()
        return spread

    return asyncio.run(scenario())


async def settled(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def placed(url: str, count: int, workers) -> list[int]:
    """Open ``count`` connections; each worker's (by slot) once all are counted in
    ``workers()`` (the status's); then close them."""
    clients = [await connect(url) for _ in range(count)]

    def counts() -> list[int]:
        return [w["connections"] for w in sorted(workers(), key=lambda w: w["slot"])]

    await settled(lambda: sum(counts()) == count, "the connections counted")
    spread = counts()
    for client in clients:
        await client.close()
    return spread


def test_least_connections_evens_the_workers_after_a_scale_up(spawn, tmp_path) -> None:
    """2,400 long-lived connections over 2 -> 4 workers: 1,200 on 2 workers, 2 more workers
    (TTIN), 1,200 new connections (in 4 waves): the new ones fill the new workers (max/min
    within 1.25); the hash leaves them about half the old ones' (printed, for comparison).
    (The issue's 2,000 then 1,000 cannot even out without closing healthy connections: the
    old workers keep 1,000 each, the new ones get 500 at best, 2.0; --max-connection-age is
    what evens that, docs/operations.md.)"""
    steered = spread_after_scale_up(spawn, tmp_path / "steered", "least-connections", 1200, 1200)
    hashed = spread_after_scale_up(spawn, tmp_path / "hashed", "hash", 1200, 1200)
    print(f"connections per worker, least-connections: {steered}; hash: {hashed}")
    assert len(steered) == 4 and max(steered) / min(steered) <= 1.25, steered
    assert max(hashed) / min(hashed) > 1.25, hashed  # (what steering is for: 2 in theory)


def test_an_upgrade_goes_on_steering_with_the_old_masters_numbering(spawn, tmp_path) -> None:
    """wsfleet upgrade of a steering master: the new one steers the groups as numbered by the
    old (handed over), keeps doing so for a slot added after (TTIN), and places connections
    by the weights: a slot whose weight is 0 gets none."""
    from wsfleet import control

    from .support.helpers import installed, new_masters, run_wsfleet

    site = installed(tmp_path)
    master = Master(
        spawn,
        tmp_path,
        "-w",
        "2",
        "--balance",
        "least-connections",
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    master.wait_workers(2)
    with new_masters(master):
        result = run_wsfleet(["upgrade", "--pidfile", master.pidfile], timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        new = control.read_pid(master.pidfile)
        os.kill(new, signal.SIGTTIN)

        def balance() -> dict:
            status = control.query_status(new)
            ready = [w for w in status["workers"] if w["state"] == "ready"]
            return status["master"]["balance"] if len(ready) == 3 else {}

        async def scenario() -> list[int]:
            await settled(lambda: len(balance().get("weights") or {}) == 3, "3 slots steered")
            assert balance()["mode"] == "least-connections"
            return await placed(master.url, 300, lambda: control.query_status(new)["workers"])

        spread = asyncio.run(scenario())
    # (equal weights, the kernel's random pick: 100 each, sd 8; a wrong numbering would
    # still spread, so the status's weights are what says the numbering was handed over)
    assert len(spread) == 3 and min(spread) >= 50, spread


def test_the_weights_follow_a_crash_restart(spawn, tmp_path) -> None:
    """kill -9 of a steered worker holding connections: once its replacement is ready, that
    slot (empty now) gets the most weight, and the new connections go mostly there."""
    master = Master(spawn, tmp_path, "-w", "2", "--balance", "least-connections")
    master.wait_workers(2)

    def weights() -> dict[str, int]:
        return master.status()["master"]["balance"]["weights"] or {}

    def by_slot() -> dict[int, dict]:
        return {w["slot"]: w for w in master.status()["workers"] if w["state"] == "ready"}

    async def scenario() -> None:
        clients = [await connect(master.url) for _ in range(200)]
        await settled(lambda: sum(w["connections"] for w in by_slot().values()) == 200, "200")
        victim = by_slot()[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        await settled(lambda: by_slot().get(0, {}).get("pid", victim) != victim, "a new worker")
        await settled(lambda: weights().get("0", 0) > 10 * weights().get("1", 1), "its weight")
        kept = by_slot()[1]["connections"]  # (the other worker's clients stay connected)
        fresh = [await connect(master.url) for _ in range(100)]
        counted = kept + 100
        await settled(lambda: sum(w["connections"] for w in by_slot().values()) == counted, "all")
        spread = {slot: w["connections"] for slot, w in by_slot().items()}
        # Most of the new ones go to the slot that lost its own: all 100 while it has fewer
        # than the other (kept, about 100), then half each; 20 off at most.
        placed = min(100, (kept + 100) / 2)
        assert spread[0] >= placed - 20, (spread, kept)
        for client in clients + fresh:
            await client.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("balance", ["least-connections", "hash"])
def test_a_worker_added_while_one_leaves_serves_beside_it(spawn, tmp_path, balance) -> None:
    """TTOU, then TTIN while the slot scaled away still empties its queue (its worker shown
    "leaving"): a new worker starts for that slot's index, and once the leaving one is gone,
    new connections reach all 3 workers (the kernel's numbering of the group followed)."""
    master = Master(spawn, tmp_path, "-w", "3", "--balance", balance)
    master.wait_workers(3)

    def states() -> list[str]:
        return [w["state"] for w in master.status()["workers"]]

    def seen_leaving() -> bool:
        try:
            wait_for(lambda: "leaving" in states(), 5, "a worker leaving")
        except AssertionError:
            return False
        return True

    for _ in range(20):  # (a TTIN that came after the slot closed would not test this)
        master.proc.signal(signal.SIGTTOU)
        leaving = seen_leaving()
        master.proc.signal(signal.SIGTTIN)
        wait_for(lambda: states() == ["ready"] * 3, 20, "3 ready workers")
        if leaving:
            break
    assert leaving, "never saw the worker leaving"
    got = asyncio.run(placed(master.url, 300, lambda: master.status()["workers"]))
    assert len(got) == 3 and min(got) >= 50, got  # (a third each, give or take)


@pytest.mark.parametrize("balance", ["least-connections", "hash"])
def test_scaling_down_under_load_fails_no_connection_attempt(spawn, tmp_path, balance) -> None:
    """TTOU, twice, twice over, under 150 new connections a second, with workers whose
    accept queues are seldom empty (each connection's start blocks its worker 10 ms): each
    slot scaled away gets no new connection from then on, and its socket closes only once its
    queue is empty, so no attempt is reset (the long-lived connections of its worker are
    closed with 1001, as a stop closes them, and reconnect)."""
    from .support.helpers import app_master
    from .support.loadtest import Load

    args = ("-w", "4", "--balance", balance, "--drain-window", "0.2")
    master = app_master(spawn, tmp_path, BUSY_ECHO, *args)
    master.wait_workers(4)

    def workers() -> list[dict]:
        return master.status()["workers"]

    def wait_for_workers(count: int) -> None:
        deadline = time.monotonic() + 20
        while not (len(workers()) == count and all(w["state"] == "ready" for w in workers())):
            assert time.monotonic() < deadline, f"timed out waiting for {count} workers"
            time.sleep(0.05)

    load = Load(master.url, rate=150, long_lived=40, duration=60).start()
    try:
        for cycle in range(2):
            for count in (3, 2):  # (one at a time: two signals at once may arrive as one)
                master.proc.signal(signal.SIGTTOU)
                wait_for_workers(count)  # (its worker exited: its socket is closed)
            if cycle == 0:
                for count in (3, 4):
                    master.proc.signal(signal.SIGTTIN)
                    wait_for_workers(count)
    finally:
        results = load.stop()
    summary = results.summary()
    print(f"--balance {balance}: {summary}")
    assert summary["attempts"] > 150 and summary["echoes"] > 0, summary
    assert results.failures() == [], summary


BUSY_ECHO = """
import time


async def handler(websocket):
    time.sleep(0.01)  # (the worker's loop, blocked: new connections queue meanwhile)
    async for message in websocket:
        await websocket.send(message)
"""
