"""The two headline guarantees, under load: a rolling restart and a kill -9 of a worker lose
no connection attempt. Run them alone with `python -m pytest tests/test_headline.py`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .support.harness import gone, wait_for
from .support.helpers import VERSIONED_APP, Master, app_master, echo_once, write_app
from .support.loadtest import Load


def test_rolling_restart_under_load_fails_nothing(spawn, tmp_path: Path, loop: str) -> None:
    master = app_master(
        spawn, tmp_path, VERSIONED_APP.format(version="v1"), "-w", "2", "--loop", loop
    )
    assert echo_once(master.url, "version?") == "v1"
    old_workers = master.worker_pids()
    load = Load(master.url, rate=200, long_lived=100, duration=60).start()
    try:
        write_app(tmp_path, "v2-new")  # new code on disk before the SIGHUP
        time.sleep(0.5)  # load before the restart, for the record (not a wait for an event)
        master.proc.signal(signal.SIGHUP)
        master.proc.wait_line("rolling restart done", timeout=30)
        # Let the long-lived connections reconnect and the old workers finish draining.
        master.wait_workers(2, timeout=30)
        time.sleep(0.5)  # load after the restart, for the record
    finally:
        results = load.stop()
    summary = results.summary()
    assert results.failures() == [], summary
    assert summary["attempts"] >= 200, summary  # the load really ran
    # Every long-lived connection was closed by the restart with 1012 and nothing else.
    assert set(results.close_codes) == {"closed 1012"}, summary
    assert results.close_codes["closed 1012"] >= 100, summary
    new_workers = master.worker_pids()
    assert not new_workers & old_workers
    assert echo_once(master.url, "version?") == "v2-new"
    for pid in old_workers:
        master.proc.wait_line(rf"worker {pid} \(slot \d\) exited \(exit status 0\)")


def test_kill_9_under_load_fails_nothing(spawn, tmp_path: Path, loop: str) -> None:
    master = Master(spawn, tmp_path, "-w", "2", "--loop", loop)
    victim = min(master.worker_pids())
    load = Load(master.url, rate=200, long_lived=20, duration=60).start()
    try:
        time.sleep(0.5)  # load before the kill, for the record
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), what="the victim to die")
        killed = time.monotonic()
        master.proc.wait_line(r"worker \d+ \(slot \d\) is ready", timeout=5)
        ready = time.monotonic()
        time.sleep(1.0)  # load after the replacement, for the record
    finally:
        results = load.stop()
    assert ready - killed < 1.0  # (measured from its death: at most a few ms later)
    summary = results.summary()
    assert summary["attempts"] >= 200, summary
    # Connections the killed worker had already accepted die with it: kill -9 leaves it no
    # chance to answer. Every other attempt succeeds: those queued on its socket, which the
    # master keeps open, and every attempt made once it is dead.
    in_flight = [a for a in results.failures() if a.start < killed]
    assert results.failures(since=killed) == [], summary
    assert len(in_flight) <= 3, summary
    assert victim not in master.worker_pids()
