"""Observability (docs/observability.md): --metrics serves Prometheus metrics whose values
follow what the test did, a status page that a real browser shows and that updates itself, and
a port that a hostile client cannot use to stall the master."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .support.harness import Browser, gone, wait_for
from .support.helpers import Master, run_wsfleet, scrape, total


def metrics_master(spawn, tmp_path: Path, *args: str) -> tuple[Master, str]:  # type: ignore[no-untyped-def]
    master = Master(spawn, tmp_path, "--metrics", "127.0.0.1:0", *args)
    return master, master.status()["master"]["metrics"]


def test_metrics_follow_connections_messages_closes_a_kill_and_a_reload(spawn, tmp_path) -> None:
    master, url = metrics_master(
        spawn, tmp_path, "-w", "2", "--origins", "https://ok.example", "--drain-window", "0"
    )
    samples = scrape(url)
    assert total(samples, "wsfleet_workers", state="ready") == 2
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(master.url)) for _ in range(3)]
        for ws in clients:
            for i in range(5):
                ws.send(f"m{i}")
                assert ws.recv(timeout=5) == f"m{i}"
        try:
            connect(master.url, origin="https://bad.example")  # type: ignore[arg-type]
            raise AssertionError("a bad Origin was accepted")
        except InvalidStatus as exc:
            assert exc.response.status_code == 403
        for ws in clients[:2]:
            ws.close()  # code 1000, from the client
        kept = clients[2]

        def counted() -> bool:
            s = scrape(url)
            return (
                total(s, "wsfleet_handshakes_total", status="101") == 3
                and total(s, "wsfleet_handshakes_total", status="403") == 1
                and total(s, "wsfleet_messages_received_total") == 15
                and total(s, "wsfleet_messages_sent_total") == 15
                and total(s, "wsfleet_closes_total", code="1000") == 2
                and total(s, "wsfleet_connections") == 1
            )

        wait_for(counted, 10, "the metrics to count what the test did")
        before = scrape(url)
        # kill -9 of a worker: its counts so far stay (it reported them with its heartbeats).
        victim = min(master.worker_pids())
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), what="the victim to die")
        master.wait_workers(2)
        after = scrape(url)
        assert total(after, "wsfleet_worker_restarts_total", reason="crash") == 1
        for key, value in before.items():
            if key[0].endswith("_total"):
                assert after.get(key, 0) >= value, key  # counters never go back
        assert total(after, "wsfleet_handshakes_total", status="101") == 3
        # A reload: two workers replaced; the kept connection (if its worker survived the
        # kill) is closed with 1012.
        survived = kept.protocol.state.name == "OPEN"
        master.rolling_restart()
        wait_for(
            lambda: total(scrape(url), "wsfleet_worker_restarts_total", reason="reload") == 2,
            what="the reload's restarts",
        )
        if survived:
            wait_for(
                lambda: total(scrape(url), "wsfleet_closes_total", code="1012") == 1,
                what="the kept connection's 1012",
            )
    final = scrape(url)
    assert total(final, "wsfleet_drains_in_progress") == 0
    assert total(final, "wsfleet_messages_received_total") == 15


def test_status_json_is_what_status_prints(spawn, tmp_path: Path) -> None:
    master, url = metrics_master(spawn, tmp_path, "-w", "2")
    with urllib.request.urlopen(url + "status.json", timeout=5) as answer:
        served = json.load(answer)
    printed = run_wsfleet(["status", "--json", "--pidfile", master.pidfile])
    assert printed.returncode == 0
    expected = json.loads(printed.stdout)
    assert served.keys() == expected.keys()
    assert [w["pid"] for w in served["workers"]] == [w["pid"] for w in expected["workers"]]
    assert any("all 2 workers ready" in e["message"] for e in served["events"])


def test_a_hostile_client_on_the_metrics_port_cannot_stall_the_master(spawn, tmp_path) -> None:
    """50 connections each holding half a request: the master still scales, answers
    `wsfleet status` and serves /metrics; the half-open ones are dropped after 5 s."""
    master, url = metrics_master(spawn, tmp_path, "-w", "2")
    port = int(url.rstrip("/").rpartition(":")[2])
    with contextlib.ExitStack() as stack:
        hostile = []
        for _ in range(50):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the end
            hostile.append(sock)
        started = time.monotonic()
        master.proc.signal(signal.SIGTTIN)
        master.wait_workers(3)
        result = run_wsfleet(["status", "--pidfile", master.pidfile])
        assert result.returncode == 0 and result.stdout.count("\nworker ") == 3
        assert total(scrape(url), "wsfleet_workers", state="ready") == 3
        assert time.monotonic() - started < 5  # all of it while the 50 are held
        for sock in hostile:  # then each is dropped: end of stream, not an answer
            assert sock.recv(100) == b""
        assert time.monotonic() - started < 15


def test_bad_metrics_address_is_exit_2() -> None:
    for value in ("8080", "unix:/tmp/m.sock"):
        result = run_wsfleet(["start", "--metrics", value])
        assert result.returncode == 2 and "argument --metrics:" in result.stderr


def test_the_status_page_in_a_real_browser_shows_the_workers_and_updates_itself(
    spawn, tmp_path: Path
) -> None:
    """Headless Chromium at a phone's width: the page lists the workers with their memory
    (--max-worker-memory), fits the screen, and after a kill -9 shows the replacement without
    being reloaded."""
    master, url = metrics_master(spawn, tmp_path, "-w", "2", "--max-worker-memory", "4096")
    browser = Browser(tmp_path, width=390, height=844)
    try:
        browser.open(url)
        pids = master.worker_pids()

        def shows(*texts: str) -> bool:
            page = browser.evaluate("document.body.innerText") or ""
            return all(text in page for text in texts)

        wait_for(lambda: shows(*map(str, pids), "2 / 2"), 15, "the page to list the workers")

        def shows_memory() -> bool:  # (as last read: the readings change every 5 s)
            memory = [w["memory"] for w in master.status()["workers"]]
            return None not in memory and shows(*(f"{m / 2**20:.1f} MiB" for m in memory))

        wait_for(shows_memory, 15, "the page to show their memory")
        assert browser.evaluate("document.documentElement.scrollWidth") <= 390  # fits a phone
        browser.evaluate("window.sameDocument = true")
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), what="the victim to die")
        master.wait_workers(2)
        (replacement,) = master.worker_pids() - pids
        wait_for(
            lambda: shows(str(replacement), "crash 1") and not shows(f"\t{victim}\t"),
            15,
            "the page to show the replacement",
        )
        assert browser.evaluate("window.sameDocument") is True  # updated, not reloaded
        assert shows("died (signal SIGKILL)")  # a recent event
    finally:
        browser.close()


def test_a_worker_that_drains_hands_over_its_last_counts(spawn, tmp_path: Path) -> None:
    """Messages exchanged just before a reload are counted though no heartbeat followed them:
    the old worker sends its totals as it exits, and the master reads them before it reaps."""
    master, url = metrics_master(spawn, tmp_path, "-w", "1", "--drain-window", "0")
    with connect(master.url) as ws:
        for i in range(7):
            ws.send(str(i))
            assert ws.recv(timeout=5) == str(i)
        master.proc.signal(signal.SIGHUP)
        with contextlib.suppress(Exception):
            ws.recv(timeout=10)  # closed with 1012
    master.wait_workers(1)

    def counted() -> bool:
        s = scrape(url)
        return (
            total(s, "wsfleet_messages_received_total") == 7
            and total(s, "wsfleet_messages_sent_total") == 7
            and total(s, "wsfleet_closes_total", code="1012") == 1
        )

    wait_for(counted, 10, "the drained worker's last counts")


def test_application_close_codes_are_counted_in_ranges(spawn, tmp_path: Path) -> None:
    """Clients choose codes from 3000 to 4999: they are counted as 3xxx and 4xxx, so that a
    client cannot make the labels (and the worker's reports) grow."""
    master, url = metrics_master(spawn, tmp_path, "-w", "1")
    for code in (3001, 3999, 4321, 1000):
        with connect(master.url) as ws:
            ws.close(code)
    wait_for(
        lambda: (
            [total(scrape(url), "wsfleet_closes_total", code=c) for c in ("3xxx", "4xxx", "1000")]
            == [2, 1, 1]
        ),
        10,
        "the closes counted by range",
    )
