"""A fleet under publish/subscribe load through a restart (a reload, an upgrade), with the
checks of what its subscribers and publishers saw: shared by tests/test_pubsub_faults.py and
tests/test_broker.py (the same restart, with the topics in Redis)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .helpers import Master
from .pubsub import (
    Clients,
    Subscriber,
    check,
    finish,
    last_offsets,
    publish_for,
    publishers_on,
    repeated,
    settle,
    subscribe_all,
    unseen_acks,
    write_app,
)

TOPIC = "room"
RATE = 200.0  # messages per second, over all the publishers
SUBSCRIBERS = 200
# A restart under load: its closes spread over a second; a history larger than the default
# (1,000 messages: 5 s at RATE), since what is tested here is the resume, not the bound
# (the last test is), and a client that reads late on a busy machine resumes late.
RESTART = ("-w", "2", "--drain-window", "1", "--history-size", "20000")


def start(spawn: Any, tmp_path: Path, *args: str, site: Path | None = None) -> Master:
    """A master serving the test app (tests/support/pubsub.py) with ``args``; from a copy of
    the package (``site``) for an upgrade."""
    app = write_app(tmp_path)
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    master = Master(spawn, tmp_path, *args, "--app", app, cwd=tmp_path, env=env)
    master.wait_workers(int(args[args.index("-w") + 1]) if "-w" in args else 1)
    return master


def restart_under_load(master: Master, restart: Callable[[Master], None]) -> int:
    """200 subscribers over both workers of a fleet and publishers on each worker at 200
    messages per second in all; ``restart`` (a reload, an upgrade) closes every connection
    with 1012: every subscriber resumes from its last position and ends with every message
    once, in order, and every acknowledged publish is where it was acknowledged. Returns
    the topic's last offset."""
    workers = master.worker_pids()
    with Clients() as clients:
        subscribers = clients.run(subscribe_all(master.url, TOPIC, SUBSCRIBERS))
        assert {s.pid for s in subscribers} == workers  # spread over both, checked by pid
        (epoch,) = {s.sessions[0].epoch for s in subscribers}
        publishers = clients.run(publishers_on(master.url, TOPIC, workers, per_worker=2))
        for publisher in publishers:
            clients.call(publisher.start, RATE / len(publishers))
        publish_for(clients, publishers, 100)
        restart(master)
        new_workers = master.worker_pids()  # (the pidfile names the master that serves)
        assert not new_workers & workers
        publish_for(clients, publishers, 100)  # (every connection was closed meanwhile)
        last, found = finish(clients, subscribers, publishers)

        for subscriber in subscribers:
            first, *resumed = subscriber.sessions
            assert first.close_code == 1012, first
            assert len(resumed) == 1, subscriber.sessions
            assert resumed[0].recovered is True, resumed
            assert resumed[0].close_code is None and resumed[0].epoch == epoch, resumed
        # They resumed on the new workers, on both.
        assert {s.pid for s in subscribers} == new_workers
        assert last_offsets(found) == {epoch: last}  # one epoch: the history was kept
        assert repeated(found) == {}  # (nothing sequenced twice)
        reports = [(s.pid, check(s, {epoch: last})) for s in subscribers]
        bad = [f"{pid}: {report}" for pid, report in reports if not report.clean]
        assert not bad, f"{len(bad)} of {len(reports)} subscribers: {bad[:3]}"
        assert unseen_acks(publishers, found) == []
        for publisher in publishers:
            assert publisher.errors == [], publisher.errors
            assert not [s for s in publisher.sent if s.error], publisher.sent
            assert publisher.close_codes == [1012], publisher.close_codes
        assert len(found) == last > 200  # (every offset was received by someone)
        # The whole history is there: a client that saw nothing of the epoch gets it all.
        probe = Subscriber(master.url, TOPIC, resume=False)
        clients.run(probe.connect(since=(epoch, 0)))
        clients.run(settle([probe], "last"))
        assert probe.sessions[0].recovered is True
        assert clients.call(lambda: list(probe.received)) == [
            (epoch, offset, found[epoch, offset]) for offset in range(1, last + 1)
        ]
    return last
