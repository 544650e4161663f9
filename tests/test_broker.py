"""Pub/sub across hosts (--broker): two masters on two ports play two hosts sharing one real
redis-server (tests/support/redis.py), with the clients of tests/support/pubsub.py.

Order and exactly-once over both hosts, through a reload of one of them; Redis killed and
restarted mid-stream, with its data kept and with it lost; a client that resumes on the other
host, and a history that outlives every wsfleet process; the command line, the status and
the metrics while Redis is away; the password kept out of everything shown.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from .support.harness import free_port, wait_for
from .support.helpers import Master, run_wsfleet
from .support.pubsub import (
    Clients,
    Publisher,
    Subscriber,
    check,
    last_offsets,
    one_order,
    publishers_on,
    repeated,
    settle,
    subscribe_all,
    unseen_acks,
    write_app,
)
from .support.redis import RedisServer

TOPIC = "room"
TIMEOUT = "1"  # --broker-timeout: a publish fails after a second while Redis is away
SLOW = pytest.mark.timeout(120)


@pytest.fixture
def redis(tmp_path: Path):
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def host(spawn: Any, directory: Path, broker: str, *args: str) -> Master:
    """A master (one host) serving the pub/sub test app with --broker, in its own
    directory (its pidfile)."""
    directory.mkdir(exist_ok=True)
    app = write_app(directory)
    master = Master(
        spawn,
        directory,
        "-w",
        "2",
        "--broker",
        broker,
        "--broker-timeout",
        TIMEOUT,
        *args,
        "--app",
        app,
        cwd=directory,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    master.wait_workers(2)
    wait_for(lambda: broker_state(master) == "connected", 10, "the broker connected")
    return master


def broker_state(master: Master) -> str:
    return str(master.status()["broker"]["state"])


def acked(clients: Clients, publishers: list[Publisher]) -> int:
    return int(clients.call(lambda: sum(len(p.acked()) for p in publishers)))


def publish_for(clients: Clients, publishers: list[Publisher], count: int, timeout=30) -> None:
    """Wait until ``count`` more publishes than now are acknowledged (the load ran)."""
    target = acked(clients, publishers) + count
    wait_for(lambda: acked(clients, publishers) >= target, timeout, f"{count} more publishes")


def finish(clients: Clients, subscribers: list[Subscriber], publishers: list[Publisher]):
    """Stop publishing, publish a last message, wait until every subscriber has it: its
    offset, and the topic's messages as the subscribers received them."""

    async def last() -> int:
        for publisher in publishers:
            await publisher.stop()
        sent = await publishers[0].publish("last")
        assert sent.offset, f"the last message was not acknowledged: {sent}"
        await settle(subscribers, "last", timeout=40)
        return sent.offset

    offset = clients.run(last(), 60)
    return offset, clients.call(one_order, subscribers)


def two_hosts_under_load(spawn, tmp_path, redis, clients, rate=100.0, per_host=50):
    """Two hosts; ``per_host`` subscribers on each (on both of its workers); a publisher
    on each of the four workers, ``rate`` messages per second in all."""
    hosts = [host(spawn, tmp_path / name, redis.url) for name in ("a", "b")]
    subscribers: list[Subscriber] = []
    publishers: list[Publisher] = []
    for name, master in zip("ab", hosts, strict=True):
        workers = master.worker_pids()
        mine = clients.run(subscribe_all(master.url, TOPIC, per_host))
        assert {s.pid for s in mine} == workers
        subscribers += mine
        for publisher in clients.run(publishers_on(master.url, TOPIC, workers)):
            publisher.name = f"{name}{publisher.name}"  # (messages a-p0-1, b-p0-1...)
            publishers.append(publisher)
    for publisher in publishers:
        clients.call(publisher.start, rate / len(publishers))
    return hosts, subscribers, publishers


def checked(subscribers, publishers, found, last: dict[str, int]) -> None:
    """Every subscriber has each message once, in the one order; every acknowledged publish
    is where it was acknowledged."""
    assert repeated(found) == {}
    bad = [f"{s.pid}: {r}" for s in subscribers if not (r := check(s, last)).clean]
    assert not bad, f"{len(bad)} of {len(subscribers)}: {bad[:3]}"
    assert unseen_acks(publishers, found) == []


@SLOW
def test_two_hosts_one_order_through_a_reload_of_one(spawn, tmp_path, redis) -> None:
    """Publishers on both hosts, subscribers on both: each subscriber gets every message once,
    in one order; host a reloads meanwhile: its subscribers resume there, recovered, and host
    b's are not touched."""
    with Clients() as clients:
        (a, b), subscribers, publishers = two_hosts_under_load(spawn, tmp_path, redis, clients)
        (epoch,) = {s.sessions[0].epoch for s in subscribers}  # the same epoch on both hosts
        publish_for(clients, publishers, 100)
        old = a.worker_pids()
        result = run_wsfleet(["reload", "--wait", "--pidfile", a.pidfile], timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert not a.worker_pids() & old
        publish_for(clients, publishers, 100)
        last, found = finish(clients, subscribers, publishers)

    assert last_offsets(found) == {epoch: last} and len(found) == last > 200
    checked(subscribers, publishers, found, {epoch: last})
    on_a = [s for s in subscribers if s.sessions[0].pid in old]
    assert len(on_a) == 50
    for subscriber in subscribers:
        first, *resumed = subscriber.sessions
        if subscriber in on_a:
            assert first.close_code == 1012 and len(resumed) == 1, subscriber.sessions
            assert resumed[0].recovered is True, resumed
        else:
            assert first.close_code is None and not resumed, subscriber.sessions
    for publisher in publishers:  # (those of host a were closed by its reload: 1012)
        assert publisher.errors == [] and not [s for s in publisher.sent if s.error]
    # Each host counts what was published through it; together, every message.
    wait_for(lambda: sum(m.status()["pubsub"]["published"] for m in (a, b)) == last, 5, "figures")


@SLOW
@pytest.mark.parametrize("kept", [True, False], ids=["data-kept", "data-lost"])
def test_redis_killed_and_restarted_mid_stream(spawn, tmp_path, kept: bool) -> None:
    """kill -9 of Redis while both hosts publish: no wsfleet process dies and no client is
    closed; publishes fail with BrokerUnavailable within --broker-timeout; the status and
    metrics say so; when Redis returns, every subscriber goes on: with its data kept, in the
    same epoch with no gap; with it lost, in a new epoch from offset 1."""
    redis = RedisServer(tmp_path, persistent=kept)
    try:
        with Clients() as clients:
            hosts, subscribers, publishers = two_hosts_under_load(
                spawn, tmp_path, redis, clients, rate=50.0, per_host=20
            )
            (epoch,) = {s.sessions[0].epoch for s in subscribers}
            processes = {p for m in hosts for p in psutil.Process(m.proc.pid).children()}
            publish_for(clients, publishers, 50)
            redis.kill()
            for master in hosts:
                wait_for(lambda m=master: broker_state(m) == "unavailable", 10, "unavailable")

            def failed() -> int:
                return sum(1 for p in publishers for s in p.sent if s.error)

            wait_for(lambda: clients.call(failed) >= 4, 10, "publishes failing")
            redis.start()
            for master in hosts:
                wait_for(lambda m=master: broker_state(m) == "connected", 10, "connected")
            publish_for(clients, publishers, 50)
            last, found = finish(clients, subscribers, publishers)
    finally:
        redis.stop()

    alive = {p for m in hosts for p in psutil.Process(m.proc.pid).children()}
    assert alive == processes  # the same workers and hubs: nobody died of it
    errors = {s.error for p in publishers for s in p.sent if s.error}
    assert errors and all("BrokerUnavailable" in e for e in errors), errors
    assert repeated(found) == {}
    lasts = last_offsets(found)
    if kept:
        assert lasts == {epoch: last}
        checked(subscribers, publishers, found, {epoch: last})
    else:
        (new,) = set(lasts) - {epoch}
        assert lasts[new] == last
        for subscriber in subscribers:
            ended = max(o for e, o, _ in subscriber.received if e == epoch)
            report = check(subscriber, {epoch: ended, new: last})
            assert report.clean, f"{subscriber.pid}: {report}"
    for subscriber in subscribers:
        assert len(subscriber.sessions) == 1 and subscriber.sessions[0].close_code is None


@SLOW
def test_a_client_resumes_on_the_other_host_and_the_history_outlives_the_fleet(
    spawn, tmp_path, redis
) -> None:
    """Subscribers of host a, gone while 100 messages are published on host b, come back to
    host b with their last (epoch, offset): recovered, every message once. Then every wsfleet
    process stops; a new master finds the whole history in Redis."""
    a = host(spawn, tmp_path / "a", redis.url)
    b = host(spawn, tmp_path / "b", redis.url)
    with Clients() as clients:
        subscribers = clients.run(subscribe_all(a.url, TOPIC, 20))
        (publisher,) = clients.run(publishers_on(b.url, TOPIC, [min(b.worker_pids())]))

        async def publish(count: int, first: int) -> int:
            offset = 0
            for n in range(first, first + count):
                sent = await publisher.publish(f"m{n}")
                assert sent.offset, sent
                offset = sent.offset
            return offset

        clients.run(publish(50, 0))
        clients.run(settle(subscribers, "m49"))
        for subscriber in subscribers:
            clients.run(subscriber.drop())
        clients.run(publish(100, 50))
        for subscriber in subscribers:
            subscriber.url = b.url
            clients.run(subscriber.connect())
        last = clients.run(publish(1, 150))
        clients.run(settle(subscribers, "m150"))
        found = clients.call(one_order, subscribers)
        (epoch,) = last_offsets(found)
        for subscriber in subscribers:
            _, second = subscriber.sessions
            assert second.recovered is True and second.since == (epoch, 50), second
            assert check(subscriber, {epoch: last}).clean
            assert [t for _, _, t in subscriber.received] == [f"m{n}" for n in range(151)]
        clients.run(publisher.close())
    assert a.stop() == 0 and b.stop() == 0
    c = host(spawn, tmp_path / "c", redis.url)
    with Clients() as clients:
        probe = Subscriber(c.url, TOPIC, resume=False)
        clients.run(probe.connect(since=(epoch, 0)))
        clients.run(settle([probe], "m150"))
        assert probe.sessions[0].recovered is True
        assert [(e, o) for e, o, _ in probe.received] == [(epoch, n) for n in range(1, last + 1)]


def test_publish_command_status_and_secrets(spawn, tmp_path) -> None:
    """`wsfleet publish` through the broker, and exit 1 with the reason while it is away; the
    status and the metrics follow Redis's state; the password (in a file, or in the URL) is
    in no log, status, metrics page or process title; a wrong one: unavailable, served on."""
    password = "s3cr3t-pw-do-not-show"
    redis = RedisServer(tmp_path, password=password)
    try:
        secret = tmp_path / "password"
        secret.write_text(password + "\n")
        a = host(
            spawn,
            tmp_path / "a",
            redis.url,
            "--broker-password-file",
            str(secret),
            "--metrics",
            f"127.0.0.1:{free_port()}",
            "--log-file",
            str(tmp_path / "a.log"),
        )
        url = redis.url.replace("redis://", f"redis://default:{password}@")
        b = host(spawn, tmp_path / "b", url, "--log-file", str(tmp_path / "b.log"))
        published = run_wsfleet(["publish", "--pidfile", a.pidfile, TOPIC, "hello"])
        assert published.returncode == 0 and published.stdout.strip() == "1", published
        published = run_wsfleet(["publish", "--pidfile", b.pidfile, TOPIC, "again"])
        assert published.returncode == 0 and published.stdout.strip() == "2", published

        redis.kill()
        wait_for(lambda: broker_state(a) == "unavailable", 10, "unavailable")
        refused = run_wsfleet(["publish", "--pidfile", a.pidfile, TOPIC, "lost"], timeout=30)
        assert refused.returncode == 1 and "broker" in refused.stderr, refused
        assert broker_state(a) == "unavailable" and a.proc.popen.poll() is None
        metrics = scrape(a)
        assert re.search(r"^wsfleet_broker_up 0\.0$", metrics, re.M)
        redis.start()
        wait_for(lambda: broker_state(a) == "connected", 10, "connected again")
        published = run_wsfleet(["publish", "--pidfile", a.pidfile, TOPIC, "back"])
        assert published.returncode == 0, published

        secret.write_text("wrong\n")
        c = host_unavailable(spawn, tmp_path / "c", redis.url, str(secret))
        shown = [
            run_wsfleet(["status", "--pidfile", m.pidfile]).stdout
            + json.dumps(m.status())
            + "\n".join(" ".join(p.cmdline()) for p in _family(m))
            for m in (a, b, c)
        ]
        shown.append(scrape(a))
        shown += [(tmp_path / f"{n}.log").read_text() for n in ("a", "b")]
        assert all(password not in text for text in shown)
        assert "redis://127.0.0.1" in shown[1]  # (the address is shown, without the password)
    finally:
        redis.stop()


def test_the_hub_publishes_with_deprecation_warnings_as_errors(spawn, tmp_path, redis) -> None:
    """A fleet run with warnings turned into errors (PYTHONWARNINGS=error, as some CIs do)
    still publishes through the broker: the hub calls no deprecated redis-py API (redis-py 8
    warns at every call of can_read_destructive, and the warning, raised, ended the broker's
    command loop: every publish then failed after --broker-timeout)."""
    directory = tmp_path / "a"
    directory.mkdir()
    master = Master(
        spawn,
        directory,
        "-w",
        "1",
        "--broker",
        redis.url,
        "--broker-timeout",
        TIMEOUT,
        env={"PYTHONWARNINGS": "error::DeprecationWarning"},
    )
    master.wait_workers(1)
    wait_for(lambda: broker_state(master) == "connected", 10, "the broker connected")
    for offset in ("1", "2"):
        published = run_wsfleet(["publish", "--pidfile", master.pidfile, TOPIC, "hello"])
        assert published.returncode == 0 and published.stdout.strip() == offset, published


def scrape(master: Master) -> str:
    url = master.status()["master"]["metrics"] + "metrics"
    return str(urllib.request.urlopen(url, timeout=5).read().decode())


def host_unavailable(spawn, directory: Path, broker: str, password_file: str) -> Master:
    """A host whose password is wrong: it serves, and says the broker is unavailable."""
    directory.mkdir()
    master = Master(
        spawn,
        directory,
        "-w",
        "1",
        "--broker",
        broker,
        "--broker-password-file",
        password_file,
        cwd=directory,
    )
    master.wait_workers(1)
    wait_for(lambda: broker_state(master) == "unavailable", 10, "unavailable")
    assert master.status()["broker"]["since"] > 0
    return master


def _family(master: Master) -> list[psutil.Process]:
    parent = psutil.Process(master.proc.pid)
    return [parent, *parent.children()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "http://127.0.0.1:6379"], "redis://"),
        (["--broker", "redis://u:hunter2@127.0.0.1:port"], "redis://127.0.0.1:port"),
        (["--broker", "redis://127.0.0.1:6379/x"], "database"),
        (["--broker", "redis://127.0.0.1", "--broker-password-file", "/nonexistent"], "read"),
        (["--broker", "redis://127.0.0.1", "--broker-timeout", "0"], "positive"),
    ],
)
def test_bad_broker_options_exit_2(args: list[str], message: str) -> None:
    result = run_wsfleet(["start", "--port", "0", *args])
    assert result.returncode == 2, result
    assert message in result.stderr and "hunter2" not in result.stderr, result.stderr


def test_broker_without_redis_py_exits_2_saying_what_to_install(tmp_path) -> None:
    empty = tmp_path / "password"
    empty.write_text("  \n")
    code = "import sys; sys.modules['redis'] = None; from wsfleet.cli import main; main()"
    for extra, expected in (([], "pip install"), (["--broker-password-file", str(empty)], "")):
        command = [sys.executable, "-c", code] if not extra else [sys.executable, "-m", "wsfleet"]
        args = ["start", "--port", "0", "--broker", "redis://127.0.0.1:1/0", *extra]
        result = subprocess.run(command + args, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result
        if expected:
            assert "redis" in result.stderr and expected in result.stderr, result.stderr
        else:
            assert "empty" in result.stderr, result.stderr
