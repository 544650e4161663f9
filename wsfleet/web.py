"""The master's HTTP port (``--metrics HOST:PORT``): /metrics, /status.json and a status page.

It runs inside the master's selector loop, non-blocking, never in a thread: the master forks
workers, and a fork taken while another thread holds a lock (logging's, an allocator's) can
leave that lock held forever in the child. Nothing here can make the master wait:

- every socket is non-blocking; a request is read as it arrives, up to MAX_REQUEST bytes;
- a client has DEADLINE seconds to send its request and read the answer, then it is dropped
  (the master's loop wakes for the earliest deadline);
- at most MAX_CLIENTS at once: a new one beyond that replaces the oldest;
- answers are small (the fleet's state, rendered when asked), written as the client reads.

A slow or hostile client therefore costs a socket and a few kilobytes, for DEADLINE seconds.
"""

from __future__ import annotations

import contextlib
import http
import json
import selectors
import socket
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

MAX_REQUEST = 8192
MAX_CLIENTS = 128
DEADLINE = 5.0

Route = Callable[[], tuple[bytes, str]]  # () -> (body, content type)


class Client:
    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.deadline = now + DEADLINE
        self.received = b""
        self.answer = b""  # what is left to write, once the request is in


class WebServer:
    """Accepts on a listening socket; the master's loop calls on_ready() for each readiness
    event its selector reports, and expire() when next_deadline() has passed."""

    what = "the metrics port"  # (the master's log, if handling an event fails)

    def __init__(
        self, sock: socket.socket, routes: dict[str, Route], selector: selectors.BaseSelector
    ) -> None:
        self.sock = sock
        self.routes = routes
        self.selector = selector
        self.clients: dict[socket.socket, Client] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()

    def stop_listening(self) -> None:
        """Accept no more (another process serves the port now); clients in progress are
        answered."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()

    def close_in_child(self) -> None:
        """A worker must not hold the master's HTTP sockets."""
        for client in self.clients.values():
            client.sock.close()
        self.sock.close()

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self.clients.values()), default=None)

    def expire(self) -> None:
        now = time.monotonic()
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self._drop(client)

    def on_ready(self, sock: socket.socket) -> None:
        if sock is self.sock:
            self._accept()
        elif (client := self.clients.get(sock)) is not None:
            if client.answer:
                self._write(client)
            else:
                self._read(client)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: try at the next event
                return
            sock.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                self._drop(min(self.clients.values(), key=lambda c: c.deadline))
            self.clients[sock] = Client(sock, time.monotonic())
            self.selector.register(sock, selectors.EVENT_READ, self)

    def _read(self, client: Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.received += data
        head, found, _ = client.received.partition(b"\r\n\r\n")
        if not found:
            if len(client.received) >= MAX_REQUEST:
                self._answer(client, http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"", "")
            return
        method, _, rest = head.partition(b"\r\n")[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        route = self.routes.get(path)
        if method not in ("GET", "HEAD"):
            self._answer(client, http.HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n", "text/plain")
        elif route is None:
            self._answer(client, http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        else:
            try:
                body, content_type = route()
            except Exception:  # logged by the master's guarded step; the client gets an answer
                self._answer(client, http.HTTPStatus.INTERNAL_SERVER_ERROR, b"", "")
                raise
            self._answer(client, http.HTTPStatus.OK, body, content_type, head_only=method == "HEAD")

    def _answer(
        self,
        client: Client,
        status: http.HTTPStatus,
        body: bytes,
        content_type: str,
        head_only: bool = False,
    ) -> None:
        headers = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if content_type:
            headers.append(f"Content-Type: {content_type}")
        client.answer = ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head_only else body)
        self.selector.modify(client.sock, selectors.EVENT_WRITE, self)
        self._write(client)

    def _write(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.answer = client.answer[sent:]
        if not client.answer:
            self._drop(client)

    def _drop(self, client: Client) -> None:
        self.clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.sock)
        client.sock.close()


def status_page() -> tuple[bytes, str]:
    return resources.files(__package__).joinpath("status.html").read_bytes(), "text/html"


def as_json(status: dict[str, Any]) -> tuple[bytes, str]:
    return json.dumps(status).encode(), "application/json"
