"""The chat example (wsfleet/chat.py) in a real browser: its page, served by the handler's
process_request, joins a room over two workers, and through a reload (1012) reconnects with
the last (epoch, offset) it saw and resumes: every message shown once, in order, none missed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from websockets.sync.client import connect

from .support.harness import Browser, wait_for
from .support.helpers import Master


def test_the_chat_page_resumes_across_a_reload(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    master = Master(spawn, tmp_path, "-w", "2", "--app", "wsfleet.chat:chat")
    http_url = f"http://127.0.0.1:{master.port}/?room=t"
    browser = Browser(tmp_path, width=800, height=900)
    sent: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def lines() -> list[str]:
        shown = browser.evaluate(
            "[...document.querySelectorAll('#log li')].map(e => e.textContent)"
        )
        return list(shown or [])

    def publish() -> None:
        """A client of the same room, writing 50 messages a second, reconnecting as a
        browser would after a 1012 (what it sends while closed is not counted)."""
        number = 0
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                # (it is subscribed too: an unbounded queue keeps it reading, closes included)
                with connect(master.url + "?room=t", open_timeout=5, max_queue=None) as ws:
                    ws.recv(timeout=5)  # its hello
                    while not stop.is_set() and time.monotonic() < deadline:
                        number += 1
                        ws.send(f"m{number}")
                        sent.append(f"m{number}")
                        time.sleep(0.02)
            except OSError:
                time.sleep(0.05)
            except Exception as exc:  # a 1012 ends the connection: reconnect
                if "1012" not in str(exc) and "1001" not in str(exc):
                    failures.append(exc)
                    return

    try:
        browser.open(http_url)
        wait_for(
            lambda: browser.evaluate("document.getElementById('state').textContent") == "connected",
            20,
            "the page to connect",
        )
        browser.evaluate(
            "window.codes = []; window.first = ws;"
            "ws.addEventListener('close', e => codes.push(e.code))"
        )
        writer = threading.Thread(target=publish)
        writer.start()
        wait_for(lambda: len(lines()) >= 20, 20, "messages in the page")
        old = master.worker_pids()
        master.rolling_restart()
        assert master.worker_pids().isdisjoint(old)
        wait_for(
            lambda: browser.evaluate("ws !== window.first && ws.readyState === 1"),
            20,
            "the page to reconnect",
        )
        seen = len(lines())
        wait_for(
            lambda: len(lines()) >= seen + 20 or failures,
            20,
            "more messages after the reload",
        )
        assert not failures, failures
        stop.set()
        writer.join(30)
        assert not failures, failures
        # The page joined the room before its first message: it shows offsets 1 to its last.
        wait_for(
            lambda: browser.evaluate("offset") == master.status()["pubsub"]["published"],
            20,
            "the page to show the last message",
        )
        shown = lines()
        assert browser.evaluate("codes") == [1012]  # closed once, by the reload
        assert "(some messages were missed)" not in shown
        published = [line for line in shown if line.startswith("m")]
        assert len(published) == len(set(published)), "a message shown twice"
        numbers = [int(line[1:]) for line in published]
        assert numbers == sorted(numbers), "out of order"
        # Every offset once: as many messages shown as the last offset says were published.
        assert (
            len(published) == browser.evaluate("offset") == master.status()["pubsub"]["published"]
        )
    finally:
        stop.set()
        browser.close()
