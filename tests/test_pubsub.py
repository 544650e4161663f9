"""Publish/subscribe across workers (wsfleet.publish, wsfleet.subscribe), end to end: real
masters and workers serving a test app (tests/support/pubsub_api.py), clients on every worker
(checked by the pid each one's hello gives). Each message once, in one order, for every
subscriber; a subscriber that stops reading closed with 1013 while the others and the publisher
keep their rate; bad calls answered with a clear exception; the envelope once per message per
worker; ``since``; the figures in status, /metrics and the status page; a lone worker.
(Restarts and faults: tests/test_pubsub_faults.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .support.harness import Browser, clean_env, free_port, wait_for
from .support.helpers import Master, app_master, start_worker
from .support.pubsub_api import (
    APP,
    Client,
    Stalled,
    open_client,
    path,
    settles,
    spread,
    until,
)


def fleet(spawn: Any, tmp_path: Path, *args: str, workers: int = 2) -> tuple[Master, set[int]]:
    """A master serving the test app with ``workers`` workers, all ready: it and their pids."""
    master = app_master(spawn, tmp_path, APP, "-w", str(workers), *args)
    master.wait_workers(workers)
    pids = master.worker_pids()
    assert len(pids) == workers
    return master, pids


def pubsub(master: Master, *keys: str) -> dict[str, int]:
    """The status's pub/sub figures (those named, or all)."""
    figures: dict[str, int] = master.status()["pubsub"]
    return {key: figures[key] for key in keys} if keys else figures


def run(coro: Any, timeout: float = 40) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def close_all(*groups: list[Client]) -> None:
    await asyncio.gather(*(client.close() for group in groups for client in group))


def described(message: str | bytes) -> dict[str, Any]:
    """What the app's "describe" envelope sent: topic, epoch, offset, type, message."""
    assert isinstance(message, str), f"the envelope's text came as {type(message).__name__}"
    found: dict[str, Any] = json.loads(message)
    return found


# Order and once


@pytest.mark.parametrize("compression", ["deflate", "none"])
def test_every_subscriber_on_every_worker_gets_each_message_once_in_one_order(
    spawn, tmp_path: Path, compression: str
) -> None:
    """Publishers on both workers publish at once to two topics (some awaiting each publish,
    some not); six subscribers over both workers, with and without an envelope, each receive
    every message of each topic once, at offsets 1..N without a gap, in the order of the
    offsets that publish() returned: the same order for all. With compression (each
    connection's frames its own) and without (one frame written to every subscriber)."""
    master, pids = fleet(spawn, tmp_path, "--compression", compression)
    per_publisher = 60  # per topic
    topics = ("a", "b")

    async def scenario() -> None:
        wrapped = await spread(master.url, path(*topics, envelope="describe"), 2, pids)
        plain = await spread(master.url, path(*topics), 1, pids)
        publishers = await spread(master.url, "/", 2, pids)
        epochs = {s["topic"]: s["epoch"] for s in wrapped[0].subscriptions}
        for client in wrapped + plain:
            assert [(s["topic"], s["offset"]) for s in client.subscriptions] == [
                ("a", 0),
                ("b", 0),
            ]
            assert {s["topic"]: s["epoch"] for s in client.subscriptions} == epochs
        sent = [
            [
                [topic, f"{topic}/p{number}/{index}"]
                for index in range(per_publisher)
                for topic in topics
            ]
            for number in range(len(publishers))
        ]
        answers = await asyncio.gather(
            *(
                publisher.call("publish_many", messages=messages, concurrent=number % 2 == 1)
                for number, (publisher, messages) in enumerate(zip(publishers, sent, strict=True))
            )
        )
        total = per_publisher * len(publishers)
        at: dict[str, dict[int, str]] = {topic: {} for topic in topics}  # offset -> message
        for number, (messages, offsets) in enumerate(zip(sent, answers, strict=True)):
            for (topic, text), offset in zip(messages, offsets, strict=True):
                assert offset not in at[topic], f"offset {offset} of {topic} given twice"
                at[topic][offset] = text
            if number % 2 == 0:  # each publish awaited: its offsets grow
                for topic in topics:
                    mine = [o for (t, _), o in zip(messages, offsets, strict=True) if t == topic]
                    assert mine == sorted(mine)
        for topic in topics:
            assert sorted(at[topic]) == list(range(1, total + 1))
        expected = {topic: [at[topic][o] for o in range(1, total + 1)] for topic in topics}
        # The workers' publishes were sequenced interleaved, not one worker's after the other's.
        workers = [publishers[int(text.split("/")[1][1:])].pid for text in expected["a"]]
        assert sum(a != b for a, b in itertools.pairwise(workers)) >= 2, workers

        async def received(client: Client) -> dict[str, list[Any]]:
            seen: dict[str, list[Any]] = {topic: [] for topic in topics}
            for message in await client.upto(total * len(topics)):
                if client in wrapped:
                    envelope = described(message)
                    assert envelope["epoch"] == epochs[envelope["topic"]]
                    assert at[envelope["topic"]].get(envelope["offset"]) == envelope["message"]
                    seen[envelope["topic"]].append(envelope["offset"])
                else:
                    assert isinstance(message, str)
                    seen[message.partition("/")[0]].append(message)
            return seen

        subscribers = wrapped + plain
        everything = await asyncio.gather(*map(received, subscribers))
        for client, seen in zip(subscribers, everything, strict=True):
            for topic in topics:
                where = f"a subscriber on worker {client.pid}, topic {topic}"
                if client in wrapped:
                    assert seen[topic] == list(range(1, total + 1)), where
                else:
                    assert seen[topic] == expected[topic], where
        # Nothing more follows (no late duplicate): the next message is the next one published.
        assert await publishers[0].call("publish", topic="a", text="last") == total + 1
        for client in wrapped + plain:
            (message,) = await client.messages(1)
            assert message == "last" or described(message)["offset"] == total + 1
        await close_all(wrapped, plain, publishers)

    run(scenario())


# Slow subscribers


def test_a_subscriber_that_stops_reading_is_closed_with_1013_and_slows_nobody(
    spawn, tmp_path: Path
) -> None:
    """With --max-backlog 256 KiB, 25 MiB published at 200 messages/s: a subscriber that
    stops reading is closed with 1013 (it reads the close frame when it wakes up) and counted
    in dropped_subscribers; the four others, two per worker (with the stalled one's), get
    every message within a second of its publication; the publisher keeps its rate; the
    stalled subscriber's worker does not hold what it was not sent (its memory grows by less
    than half of what was published)."""
    backlog = 256 * 1024
    master, pids = fleet(spawn, tmp_path, "--max-backlog", str(backlog))
    count, size, rate = 800, 32 * 1024, 200.0

    stalled = Stalled(master.port, path("feed"))
    try:
        worker = psutil.Process(stalled.pid)

        async def scenario() -> dict[str, Any]:
            fast = await spread(master.url, path("feed"), 2, pids, max_size=None)
            (publisher,) = await spread(master.url, "/", 1, [stalled.pid])
            await settles(lambda: pubsub(master, "subscriptions"), {"subscriptions": 5})
            before = worker.memory_info().rss
            peak = before

            async def watch_memory() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, worker.memory_info().rss)
                    await asyncio.sleep(0.05)

            async def arrivals(client: Client) -> list[tuple[int, float]]:
                """(index, arrival time) of each message, up to the last one (or a 5 s
                silence, so that a message missed shows as one)."""
                found: list[tuple[int, float]] = []
                with contextlib.suppress(TimeoutError):
                    while not found or found[-1][0] < count - 1:
                        message = await asyncio.wait_for(client.ws.recv(), 5)
                        assert isinstance(message, bytes)
                        found.append((int(message.partition(b":")[0]), time.monotonic()))
                return found

            async def wake_up() -> int | None:
                """Once the stalled subscriber is counted as dropped, it reads (before the
                close timeout) what it was sent: its close code."""
                await until(
                    lambda: asyncio.to_thread(lambda: pubsub(master)["dropped_subscribers"]),
                    what="a dropped subscriber",
                )
                return await asyncio.to_thread(stalled.read_to_end)

            watcher = asyncio.ensure_future(watch_memory())
            woken = asyncio.ensure_future(wake_up())
            readers = [asyncio.ensure_future(arrivals(client)) for client in fast]
            published = await publisher.call(
                "publish_paced", timeout=60, topic="feed", count=count, size=size, rate=rate
            )
            received = await asyncio.gather(*readers)
            watcher.cancel()
            code = await woken
            # Counted: one subscriber dropped, the four others still there.
            counted = {"published": count, "dropped_subscribers": 1, "subscriptions": 4}
            await settles(lambda: pubsub(master, *counted), counted)
            await close_all(fast, [publisher])
            return {
                "published": published,
                "received": received,
                "growth": peak - before,
                "code": code,
            }

        outcome = run(scenario(), 60)
    finally:
        stalled.close()
    published = outcome["published"]
    assert published["offsets"] == list(range(1, count + 1))
    assert published["end"] - published["start"] < count / rate * 1.25 + 0.5, published
    assert published["slowest"] < 0.5, published
    for found in outcome["received"]:
        indexes = [index for index, _ in found]
        assert indexes == list(range(count)), "a fast subscriber missed or repeated messages"
        lag = max(at - (published["start"] + index / rate) for index, at in found)
        assert lag < 1.0, f"a fast subscriber received a message {lag:.2f} s late"
    assert outcome["code"] == 1013
    assert stalled.received < count / 2  # (cut off early: what was sent before the close)
    assert outcome["growth"] < count * size / 2, f"the worker grew by {outcome['growth']} bytes"


# Bad input


def test_bad_calls_raise_a_clear_exception_at_once_and_break_nothing(spawn, tmp_path) -> None:
    """Wrong types and values for publish() and subscribe() raise TypeError or ValueError at
    once, naming what is wrong, and publish nothing; subscribe() of a closed (or closing)
    connection raises websockets' ConnectionClosed; the connection that made the calls and
    a subscriber on the other worker go on."""
    master, pids = fleet(spawn, tmp_path, "--max-size", "4096")

    async def scenario() -> None:
        caller = await open_client(master.url)
        (other,) = await spread(master.url, path("ok"), 1, pids - {caller.pid})
        bad = {
            "wsfleet.publish(123, 'x')": ("TypeError", "topic is a str, not int"),
            "wsfleet.publish(b't', 'x')": ("TypeError", "decode it"),
            "wsfleet.publish('', 'x')": ("ValueError", "non-empty"),
            "wsfleet.publish('t' * 257, 'x')": ("ValueError", "at most 256 characters"),
            "wsfleet.publish('t', 'x' * 4097)": (
                "ValueError",
                "4097 bytes, over the limit of 4096",
            ),
            "wsfleet.publish('t', b'x' * 4097)": ("ValueError", "over the limit of 4096"),
            "wsfleet.publish('t', 'é' * 2049)": ("ValueError", "4098 bytes"),  # UTF-8 encoded
            "wsfleet.publish('t', 123)": ("TypeError", "not int"),
            "wsfleet.publish('t', {'a': 1})": ("TypeError", "not dict"),
            "wsfleet.publish('t', None)": ("TypeError", "not NoneType"),
            "wsfleet.subscribe(websocket, 't', since=('e',))": ("TypeError", "tuple of 1"),
            "wsfleet.subscribe(websocket, 't', since=('e', -1))": ("ValueError", ">= 0"),
            "wsfleet.subscribe(websocket, 't', since=['e', 1])": ("TypeError", "not list"),
            "wsfleet.subscribe(websocket, 't', since=(1, 2))": ("TypeError", "epoch is a str"),
            "wsfleet.subscribe(websocket, 't', since=('e', '1'))": (
                "TypeError",
                "offset is an int",
            ),
            "wsfleet.subscribe(websocket, 't', since=('e', True))": ("TypeError", "not bool"),
            "wsfleet.subscribe(websocket, 7)": ("TypeError", "topic is a str"),
            "wsfleet.subscribe(websocket, '')": ("ValueError", "non-empty"),
            "wsfleet.subscribe(websocket, 't' * 257)": ("ValueError", "at most 256"),
            "wsfleet.subscribe('ws', 't')": ("TypeError", "websockets connection, not str"),
            "wsfleet.subscribe(websocket, 't', envelope=42)": ("TypeError", "envelope"),
        }
        for expr, (kind, words) in bad.items():
            error = await caller.raised(expr)
            assert (error["type"], words in error["message"]) == (kind, True), (expr, error)
        # At the bounds: accepted.
        assert await caller.call("eval", expr="wsfleet.publish('t' * 256, 'x' * 4096)") == 1
        assert await caller.call("eval", expr="wsfleet.publish('t', 'é' * 2048)") == 1
        assert await caller.call("eval", expr="wsfleet.publish('t', bytearray(4096))") == 2
        assert await caller.call("eval", expr="wsfleet.publish('t', memoryview(b'm'))") == 3

        # A connection closed, then one closing (its close frame sent): ConnectionClosed.
        gone = await open_client(master.url, path(name="gone"))
        (near,) = await spread(master.url, "/", 1, [gone.pid])
        await gone.close()
        error = await near.raised("subscribe_closed('gone', 'ok')")
        assert "ConnectionClosed" in error["mro"], error
        closing = await open_client(master.url, path(name="closing"))
        (beside,) = await spread(master.url, "/", 1, [closing.pid])
        error = await beside.raised("subscribe_closing('closing', 'ok')")
        assert "ConnectionClosed" in error["mro"], error
        await closing.ws.wait_closed()
        assert closing.ws.close_code == 1000

        # Nothing else broke: the callers and the subscriber go on; only the good publishes
        # were published (4, and these 2), and no bad call left a subscription.
        assert await caller.call("publish", topic="ok", text="still here") == 1
        assert await other.messages(1) == ["still here"]
        assert await near.call("publish", topic="ok", text="and here") == 2
        assert await other.messages(1) == ["and here"]
        figures = {"published": 6, "subscriptions": 1}
        await settles(lambda: pubsub(master, *figures), figures)
        await close_all([caller, other, gone, closing, near, beside])

    run(scenario())


def test_an_envelope_that_fails_closes_its_subscribers_with_1011_and_no_other(
    spawn, tmp_path: Path
) -> None:
    """An envelope that raises, or returns an int, closes its subscribers with 1011; the
    subscribers of the same topic and worker without an envelope receive every message."""
    master, pids = fleet(spawn, tmp_path)

    async def scenario() -> None:
        raising = await open_client(master.url, path("env", envelope="fail"))
        (wrong,) = await spread(master.url, path("env", envelope="int"), 1, [raising.pid])
        plain = await spread(master.url, path("env"), 2, pids)
        (publisher,) = await spread(master.url, "/", 1, pids - {raising.pid})
        assert await publisher.call("publish", topic="env", text="one") == 1
        for failed in (raising, wrong):
            await asyncio.wait_for(failed.ws.wait_closed(), 10)
            assert failed.ws.close_code == 1011, failed.ws.close_code
        for client in plain:
            assert await client.messages(1) == ["one"]
        assert await publisher.call("publish", topic="env", text="two") == 2
        for client in plain:
            assert await client.messages(1) == ["two"]
        # The app's error, not a slow subscriber: not counted as dropped.
        counted = {
            "published": 2,
            "delivered": 2 * len(plain),
            "dropped_subscribers": 0,
            "subscriptions": len(plain),
        }
        await settles(lambda: pubsub(master, *counted), counted)
        await close_all(plain, [publisher])

    run(scenario())


# The envelope


def test_the_envelope_is_called_once_per_message_per_worker_and_sees_what_was_published(
    spawn, tmp_path: Path
) -> None:
    """Three subscribers per worker share one envelope, one has another, one returns the
    message as it is, one has none: each worker calls each envelope function once per
    message, whatever its number of subscribers. The envelope sees the topic, the epoch, the
    offset, text as str and bytes as bytes; what it returns (str: a text frame, bytes: a
    binary one) is sent, and without it the message goes as published."""
    master, pids = fleet(spawn, tmp_path)
    messages = [("text", "hello"), ("hex", "00ff10"), ("text", "é")]

    async def scenario() -> None:
        shared = await spread(master.url, path("t", envelope="describe"), 3, pids)
        other = await spread(master.url, path("t", envelope="other"), 1, pids)
        same = await spread(master.url, path("t", envelope="same"), 1, pids)
        plain = await spread(master.url, path("t"), 1, pids)
        controls = await spread(master.url, "/", 1, pids)
        epoch = shared[0].subscriptions[0]["epoch"]
        for offset, (kind, value) in enumerate(messages, 1):
            assert await controls[offset % 2].call("publish", topic="t", **{kind: value}) == offset
        as_published = ["hello", bytes.fromhex("00ff10"), "é"]
        for client in shared + other:
            seen = [described(m) for m in await client.messages(len(messages))]
            assert seen == [
                {"topic": "t", "epoch": epoch, "offset": 1, "type": "str", "message": "hello"},
                {"topic": "t", "epoch": epoch, "offset": 2, "type": "bytes", "message": "00ff10"},
                {"topic": "t", "epoch": epoch, "offset": 3, "type": "str", "message": "é"},
            ]
        for client in same + plain:
            assert await client.messages(len(messages)) == as_published
        for control in controls:
            calls = await control.call("calls")
            assert calls == {"describe": 3, "other": 3, "same": 3}, (control.pid, calls)
        await close_all(shared, other, same, plain, controls)

    run(scenario())


# since


def test_since_replays_what_the_history_holds_and_says_when_it_cannot(
    spawn, tmp_path: Path
) -> None:
    """After three messages: since the last offset, recovered and nothing replayed; since an
    earlier one (or 0), recovered with what followed replayed; since an offset beyond the last,
    or an unknown epoch: not recovered, live messages only; without since: not recovered.
    Every subscription's epoch and offset are the topic's when it began."""
    master, pids = fleet(spawn, tmp_path)

    async def scenario() -> None:
        control = await open_client(master.url)
        assert [await control.call("publish", topic="s", text=f"m{n}") for n in (1, 2, 3)] == [
            1,
            2,
            3,
        ]
        fresh = await open_client(master.url, path("s", envelope="describe"))
        (start,) = fresh.subscriptions
        epoch = start["epoch"]
        assert (start["offset"], start["recovered"]) == (3, False)
        cases = {  # since -> (recovered, offsets received once "m4" is published)
            (epoch, 3): (True, [4]),
            (epoch, 1): (True, [2, 3, 4]),
            (epoch, 0): (True, [1, 2, 3, 4]),
            (epoch, 4): (False, [4]),  # beyond the last
            (epoch, 100): (False, [4]),
            ("no-such-epoch", 2): (False, [4]),
        }
        subscribers = {
            since: await open_client(master.url, path("s", since=since, envelope="describe"))
            for since in cases
        }
        # On both workers: a case is opened again (nothing is published meanwhile) until one
        # lands on the worker that has none, wherever the kernel put the first six.
        for since in itertools.islice(itertools.cycle(cases), 60):
            if {c.pid for c in subscribers.values()} == pids:
                break
            await subscribers[since].ws.close()
            subscribers[since] = await open_client(
                master.url, path("s", since=since, envelope="describe")
            )
        assert {c.pid for c in subscribers.values()} == pids
        for since, client in subscribers.items():
            (subscription,) = client.subscriptions
            assert subscription == {
                "topic": "s",
                "epoch": epoch,
                "offset": 3,
                "recovered": cases[since][0],
                "active": True,
            }, since
        assert await control.call("publish", topic="s", text="m4") == 4
        for since, client in [*subscribers.items(), (None, fresh)]:
            wanted = cases[since][1] if since is not None else [4]
            seen = [described(m) for m in await client.messages(len(wanted))]
            assert [(m["epoch"], m["offset"], m["message"]) for m in seen] == [
                (epoch, offset, f"m{offset}") for offset in wanted
            ], since
        await close_all([control, fresh], list(subscribers.values()))

    run(scenario())


# Observability


def test_unsubscribe_ends_one_subscription_and_leaves_the_others(spawn, tmp_path: Path) -> None:
    """A connection subscribed to two topics leaves one: it gets nothing more of it, the
    other goes on, and the fleet counts one subscription less; leaving twice does nothing."""
    master, _ = fleet(spawn, tmp_path)

    async def scenario() -> None:
        control = await open_client(master.url)
        client = await open_client(master.url, path("u", "v"))
        assert await control.call("publish", topic="u", text="u1") == 1
        assert await client.messages(1) == ["u1"]
        await settles(
            lambda: pubsub(master, "subscriptions", "topics"), {"subscriptions": 2, "topics": 2}
        )
        assert await client.call("unsubscribe", topic="u") == [True, False]
        await control.call("publish", topic="u", text="u2")
        await control.call("publish", topic="v", text="v1")
        assert await client.messages(1) == ["v1"]  # not u2, which came first
        await settles(
            lambda: pubsub(master, "subscriptions", "topics"), {"subscriptions": 1, "topics": 1}
        )
        await close_all([control, client])

    run(scenario())


def test_a_worker_back_on_a_new_hub_catches_up_on_a_topic_that_went_quiet(
    spawn, tmp_path: Path
) -> None:
    """A worker that reaches a replaced hub late (stopped meanwhile) asks each topic's
    position as it subscribes again, and fetches what was published while it was away, with
    no further message to reveal the gap: its subscriber gets the new epoch's first message."""
    master, pids = fleet(spawn, tmp_path, "--timeout", "30")
    hub = master.proc.hub()
    assert hub is not None

    async def scenario() -> None:
        subscribers = await spread(master.url, path("q"), 1, pids)
        (late,) = [c for c in subscribers if c.pid == min(pids)]
        (control,) = await spread(master.url, "/", 1, {max(pids)})
        assert await control.call("publish", topic="q", text="before") == 1
        for subscriber in subscribers:
            assert await subscriber.messages(1) == ["before"]
        os.kill(late.pid, signal.SIGSTOP)
        try:
            hub.kill()
            await until(
                lambda: asyncio.to_thread(
                    lambda: (master.status()["hub"]["pid"] or hub.pid) != hub.pid
                ),
                what="a new hub",
            )
            # The other worker reconnects and publishes in the new epoch; then silence.
            assert await control.call("publish", topic="q", text="while away") == 1
            (others,) = [c for c in subscribers if c is not late]
            assert await others.messages(1) == ["while away"]
        finally:
            os.kill(late.pid, signal.SIGCONT)
        assert await late.messages(1, timeout=10) == ["while away"]
        await close_all(subscribers, [control])

    run(scenario())


def publish_command(master: Master, *args: str, data: bytes | None = None) -> Any:
    """``wsfleet publish`` run as a user would, finding the master by its port."""
    return subprocess.run(
        [sys.executable, "-m", "wsfleet", "publish", *args, "--port", str(master.port)],
        input=data if data is not None else b"",
        capture_output=True,
        env=clean_env(),
        timeout=30,
    )


def test_wsfleet_publish_reaches_every_subscriber_from_outside(spawn, tmp_path: Path) -> None:
    """A script publishes with `wsfleet publish`: text from the command line, standard input
    as text when UTF-8 and as bytes otherwise; the offset printed; bad input refused (2), no
    master (1)."""
    master, pids = fleet(spawn, tmp_path, "--max-size", "1000")

    async def scenario() -> None:
        subscribers = await spread(master.url, path("news"), 1, pids)
        done = await asyncio.to_thread(publish_command, master, "news", "héllo")
        assert (done.returncode, done.stdout, done.stderr) == (0, b"1\n", b"")
        done = await asyncio.to_thread(publish_command, master, "news", data=b"from stdin\n")
        assert done.stdout == b"2\n"
        done = await asyncio.to_thread(publish_command, master, "news", "-", data=b"\xff\x00")
        assert done.stdout == b"3\n"
        for subscriber in subscribers:
            assert await subscriber.messages(3) == ["héllo", "from stdin\n", b"\xff\x00"]
        await close_all(subscribers)

    run(scenario())
    too_big = publish_command(master, "news", "x" * 1001)
    assert too_big.returncode == 2 and b"over the limit of 1000" in too_big.stderr
    bad_topic = publish_command(master, "t" * 257, "x")
    assert bad_topic.returncode == 2 and b"at most 256 characters" in bad_topic.stderr
    wait_for(lambda: pubsub(master, "published") == {"published": 3}, what="the figures")
    nobody = subprocess.run(
        [sys.executable, "-m", "wsfleet", "publish", "news", "x", "--port", str(free_port())],
        capture_output=True,
        env=clean_env(),
        timeout=30,
    )
    assert nobody.returncode == 1 and b"no wsfleet master" in nobody.stderr


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("wsfleet_pubsub_")
    }


def test_status_metrics_and_the_status_page_count_messages_and_subscribers(
    spawn, tmp_path: Path
) -> None:
    """After 10 messages to 4 subscribers over both workers (and one more subscriber on
    another topic): status --json's pubsub, /metrics and the status page say 10 published,
    40 delivered, 2 topics, 5 subscriptions, 10 in the history; closing subscribers lowers
    the gauges, not the counters."""
    master, pids = fleet(spawn, tmp_path, "--metrics", "127.0.0.1:0")
    url = master.status()["master"]["metrics"]
    first = {
        "published": 10,
        "delivered": 40,
        "dropped_subscribers": 0,
        "topics": 2,
        "subscriptions": 5,
        "history": 10,
    }

    async def scenario() -> None:
        subscribers = await spread(master.url, path("obs"), 2, pids)
        lone = await open_client(master.url, path("quiet"))
        control = await open_client(master.url)
        for number in range(10):
            assert await control.call("publish", topic="obs", text=f"n{number}") == number + 1
        for client in subscribers:
            assert len(await client.messages(10)) == 10
        await settles(lambda: pubsub(master), first)
        metrics = await asyncio.to_thread(scrape, url)
        assert metrics == {
            "wsfleet_pubsub_published_total": 10,
            "wsfleet_pubsub_delivered_total": 40,
            "wsfleet_pubsub_dropped_subscribers_total": 0,
            "wsfleet_pubsub_topics": 2,
            "wsfleet_pubsub_subscriptions": 5,
            "wsfleet_pubsub_history": 10,
        }
        await close_all([lone, subscribers[0]])
        then = {**first, "topics": 1, "subscriptions": 3}
        await settles(lambda: pubsub(master), then)
        await close_all(subscribers[1:], [control])

    run(scenario())
    metrics = scrape(url)
    assert metrics["wsfleet_pubsub_published_total"] == 10
    assert metrics["wsfleet_pubsub_topics"] == 1
    browser = Browser(tmp_path, width=390, height=844)
    try:
        browser.open(url)

        def shows() -> bool:
            text = browser.evaluate("document.getElementById('pubsub')?.innerText") or ""
            return "published\n10" in text and "delivered\n40" in text

        wait_for(shows, 15, "the status page to show the pub/sub figures")
        assert browser.evaluate("document.documentElement.scrollWidth") <= 390  # fits a phone
        assert browser.evaluate("document.getElementById('broker-card').hidden") is True
    finally:
        browser.close()


# A lone worker


def test_a_lone_worker_publishes_to_its_own_subscribers(spawn, tmp_path: Path, loop) -> None:
    """`wsfleet worker` without a master runs its own hub, on either event loop: publish()
    gives offsets from 1, its subscribers receive them, and since resumes from its history."""
    (tmp_path / "app.py").write_text(APP)
    _, port = start_worker(
        spawn,
        "--app",
        "app:handler",
        "--loop",
        loop,
        cwd=tmp_path,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    url = f"ws://127.0.0.1:{port}/"

    async def scenario() -> None:
        subscriber = await open_client(url, path("solo", envelope="describe"))
        control = await open_client(url)
        assert control.pid == subscriber.pid
        texts = [["solo", f"s{n}"] for n in range(5)]
        assert await control.call("publish_many", messages=texts, concurrent=True) == [
            1,
            2,
            3,
            4,
            5,
        ]
        seen = [described(m) for m in await subscriber.messages(5)]
        assert [(m["offset"], m["message"]) for m in seen] == [(n + 1, f"s{n}") for n in range(5)]
        epoch = seen[0]["epoch"]
        resumed = await open_client(url, path("solo", since=(epoch, 3), envelope="describe"))
        assert resumed.subscriptions[0]["recovered"] is True
        assert [described(m)["offset"] for m in await resumed.messages(2)] == [4, 5]
        await close_all([subscriber, control, resumed])

    run(scenario())
