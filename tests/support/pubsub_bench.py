r"""The pub/sub benchmarks' clients and measurements (scripts/bench-pubsub, scripts/bench-broker).

- The clients: raw sockets under a ``select.epoll`` loop in processes of their own, that parse
  frames and do nothing else (a websockets client would cost more CPU than the server it
  measures). :func:`subscribers` checks that each connection's sequence numbers follow each
  other; :func:`publisher` keeps a bounded window of messages in flight, or a rate.
  :class:`Clients` starts them and asks them what they counted.
- :data:`APP` and :class:`Fleet`: the app that ``wsfleet.subscribe``\s and ``wsfleet.publish``\es,
  served by ``wsfleet start``.
- :func:`settle`, :func:`saturation`, :func:`latency`: deliveries per second at saturation
  and publish-to-delivery latency at a rate, with the CPU of every group of processes.

Not part of the package, like the rest of tests/support/: the scripts import it from the
checkout.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import multiprocessing
import select
import socket
import statistics
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import psutil

from . import harness

APP = """
from urllib.parse import parse_qs, urlsplit

import wsfleet


def topic(websocket):
    return parse_qs(urlsplit(websocket.request.path).query).get("topic", ["bench"])[0]


async def app(websocket):
    path = urlsplit(websocket.request.path).path
    if path == "/sub":
        await wsfleet.subscribe(websocket, topic(websocket))
        await websocket.wait_closed()
    elif path == "/pub":
        name = topic(websocket)
        async for message in websocket:
            await wsfleet.publish(name, message)
    elif path == "/sink":  # messages taken as /pub takes them, not published
        async for message in websocket:
            pass
    elif path == "/fill":  # "TOPIC MESSAGE": many topics from one connection
        async for message in websocket:
            name, _, data = message.partition(b" ")
            await wsfleet.publish(name.decode(), data)
"""


STAMP = struct.Struct("!Qd")  # a message's sequence number and send time, then padding
CLOSED = 2**62  # a closed connection's "oldest received": it holds nobody back
LIFETIME = 3600.0  # seconds a client process lives at most, whatever the coordinator does

# The raw client: a handshake, then frames parsed by hand. Client frames are masked with the
# key 0 (valid, and the payload stays as it is).


def client_frame(payload: bytes, opcode: int = 2) -> bytes:
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


def connect(port: int, path: str, timeout: float = 30.0) -> tuple[socket.socket, bytes]:
    """An open WebSocket connection's socket (non-blocking) and what followed the 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    # No Nagle (as browsers and websockets do): a publisher's small frame is not held until
    # the server acknowledges the previous one (a delayed ACK: up to 40 ms of stall).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            raise ConnectionError(f"{path}: closed during the handshake")
        response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        status = head.split(b"\r\n")[0].decode()
        raise ConnectionError(f"{path}: {status}")
    sock.setblocking(False)
    return sock, rest


def server_header(size: int) -> bytes:
    """The header of a server's binary frame of `size` bytes (not masked)."""
    if size < 126:
        return bytes((0x82, size))
    return bytes((0x82, 126)) + size.to_bytes(2, "big")


def answer_pings(sock: socket.socket, buffer: bytes) -> bytes:
    """Pong every ping in what the server sent (not a subscriber's stream: a publisher's,
    which carries nothing else); what is left of an incomplete frame."""
    i = 0
    while len(buffer) - i >= 2:
        size, head = buffer[i + 1] & 127, 2
        if size == 126:
            size, head = int.from_bytes(buffer[i + 2 : i + 4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(buffer[i + 2 : i + 10], "big"), 10
        if len(buffer) - i < head + size:
            break
        if buffer[i] & 15 == 9:
            with contextlib.suppress(BlockingIOError):
                sock.send(client_frame(buffer[i + head : i + head + size], 10))
        i += head + size
    return buffer[i:]


def subscribers(
    targets: list[tuple[int, str]],
    index: int,
    shared: Any,
    size: int,
    check: bool,
    pipe: Connection,
) -> None:
    """A client process: its subscribers (a connection to each (port, path) of `targets`),
    reading every frame as it comes; answers the coordinator's commands on its pipe (count,
    record, pause, stop). Messages have `size` bytes; with `check`, each starts with its
    sequence number and send time."""
    header = server_header(size)
    skip, length = len(header), len(header) + size
    socks, buffers = [], []
    for port, path in targets:
        sock, rest = connect(port, path)
        socks.append(sock)
        buffers.append(rest)
    count = len(socks)
    by_fd = {sock.fileno(): k for k, sock in enumerate(socks)}
    receive = [sock.recv for sock in socks]
    lasts = [0] * count  # the sequence number each connection received last
    frames = gaps = closed = 0
    recording = False
    pause = 0.0
    samples = array.array("d")
    unpack = STAMP.unpack_from
    poll = select.epoll()
    for fd in by_fd:
        poll.register(fd, select.EPOLLIN)
    poll.register(pipe.fileno(), select.EPOLLIN)
    pipe.send(("open", count))
    next_share = 0.0
    deadline = time.monotonic() + LIFETIME
    try:
        while time.monotonic() < deadline:
            events = poll.poll(0.002)
            now = time.monotonic()  # (when these events were seen: each message's arrival)
            for fd, _ in events:
                k = by_fd.get(fd, -1)
                if k < 0:
                    command = pipe.recv()
                    if command[0] == "count":
                        pipe.send((frames, gaps, closed))
                    elif command[0] == "record":
                        recording = command[1]
                        pipe.send(samples.tobytes())  # (those of the last recording)
                        samples = array.array("d")
                    elif command[0] == "pause":
                        pause = command[1]
                        pipe.send(pause)
                    elif command[0] == "stop":
                        return
                    continue
                try:
                    data = receive[k](2**18)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    poll.unregister(fd)
                    closed += 1
                    lasts[k] = CLOSED
                    continue
                buffer = buffers[k] + data if buffers[k] else data
                end = len(buffer)
                i = 0
                last = lasts[k]
                whole = end // length
                if check and whole and not recording:
                    # The usual case, in O(1): whole messages and nothing else, in order (the
                    # first and the last in place, numbered first to first + whole - 1).
                    tail = (whole - 1) * length
                    first, tail_seq = unpack(buffer, skip)[0], unpack(buffer, tail + skip)[0]
                    if (
                        tail_seq - first == whole - 1
                        and (not last or first == last + 1)
                        and buffer.startswith(header)
                        and buffer.startswith(header, tail)
                    ):
                        frames += whole
                        lasts[k] = tail_seq
                        buffers[k] = buffer[whole * length :]
                        continue
                while end - i >= 2:
                    size = buffer[i + 1] & 127
                    head = 2
                    if size == 126:
                        if end - i < 4:
                            break
                        size, head = (buffer[i + 2] << 8) | buffer[i + 3], 4
                    elif size == 127:
                        if end - i < 10:
                            break
                        size, head = int.from_bytes(buffer[i + 2 : i + 10], "big"), 10
                    if end - i - head < size:
                        break
                    opcode = buffer[i] & 15
                    if opcode == 2 or opcode == 1:
                        frames += 1
                        if check:
                            seq, sent = unpack(buffer, i + head)
                            if last and seq != last + 1:
                                gaps += 1
                            last = seq
                            if recording:
                                samples.append(now - sent)
                    elif opcode == 9:
                        with contextlib.suppress(BlockingIOError):
                            socks[k].send(client_frame(buffer[i + head : i + head + size], 10))
                    i += head + size
                lasts[k] = last
                buffers[k] = buffer[i:] if i < end else b""
            if now >= next_share:  # the oldest message every connection has: the window's end
                shared[index] = min(lasts)
                next_share = now + 0.001
            if pause:
                time.sleep(pause)  # (data gathers meanwhile: fewer, larger reads)
    finally:
        for sock in socks:
            sock.close()


def publisher(port: int, path: str, size: int, shared: Any, pipe: Connection) -> None:
    """A client process: the publisher, idle, saturating (--window messages in flight) or at
    a rate; answers count (the messages sent) and stop."""
    sock, buffer = connect(port, path)
    pad = b"\0" * (size - STAMP.size)
    head = client_frame(b"\0" * size)[:-size]  # (every message has the same size)
    seq = 0
    mode, window, interval, next_at = "idle", 0, 0.0, 0.0
    out = bytearray()
    poll = select.epoll()
    poll.register(sock.fileno(), select.EPOLLIN)
    poll.register(pipe.fileno(), select.EPOLLIN)
    pipe.send(("open", 1))
    deadline = time.monotonic() + LIFETIME
    try:
        while (now := time.monotonic()) < deadline:
            if mode == "saturate" or out:
                timeout = 0.001
            elif mode == "rate":
                timeout = max(0.0, min(next_at - now, 0.001 if seq - min(shared) >= window else 1))
            else:
                timeout = 0.05
            for fd, _ in poll.poll(timeout):
                if fd == pipe.fileno():
                    command = pipe.recv()
                    if command[0] == "count":
                        pipe.send(seq)
                    elif command[0] == "stop":
                        return
                    else:
                        mode, window = command[0], command[1]
                        if mode == "rate":
                            interval, next_at = 1 / command[2], time.monotonic()
                    continue
                with contextlib.suppress(BlockingIOError):
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("the server closed the publisher's connection")
                    buffer = answer_pings(sock, buffer + data)
            now = time.monotonic()
            if not out and mode != "idle":
                allowed = min(shared) + window - seq
                if mode == "rate":
                    allowed = min(allowed, 1) if now >= next_at else 0
                    if allowed > 0:
                        next_at += interval
                for _ in range(max(0, allowed)):
                    seq += 1
                    out += head
                    out += STAMP.pack(seq, now)
                    out += pad
            if out:
                with contextlib.suppress(BlockingIOError):
                    del out[: sock.send(out)]
    finally:
        sock.close()


class Clients:
    """The client processes of one measurement, and what they are asked."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("fork")
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        self.shared = self.context.RawArray("q", 64)

    def start(self, target: Callable[..., None], *args: Any) -> Connection:
        ours, theirs = self.context.Pipe()
        proc = self.context.Process(target=target, args=(*args, theirs), daemon=True)
        proc.start()
        self.procs.append(proc)
        self.pipes.append(ours)
        deadline = time.monotonic() + 120
        while not ours.poll(0.1):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"client process {proc.pid} did not open its connections")
        ours.recv()
        return ours

    def subscribe(
        self, targets: list[tuple[int, str]], processes: int, size: int, check: bool = True
    ) -> None:
        """Subscribers to each (port, path) of `targets`, in `processes` processes: process
        k has targets[k::processes]."""
        self.subscriber_pipes = []
        for index in range(processes):
            self.shared[index] = 0
            mine = targets[index::processes]
            self.subscriber_pipes.append(
                self.start(subscribers, mine, index, self.shared, size, check)
            )
        for index in range(processes, len(self.shared)):
            self.shared[index] = CLOSED

    def ask(self, pipes: list[Connection], *command: Any) -> list[Any]:
        for pipe in pipes:
            pipe.send(command)
        return [pipe.recv() if pipe.poll(60) else None for pipe in pipes]

    def counts(self) -> list[tuple[int, int, int]]:
        """(frames, gaps, closed connections) of each subscriber process so far."""
        return self.ask(self.subscriber_pipes, "count")

    def received(self) -> tuple[int, int, int]:
        """(frames, gaps, closed connections) of every subscriber so far."""
        counts = self.counts()
        return (
            sum(c[0] for c in counts),
            sum(c[1] for c in counts),
            sum(c[2] for c in counts),
        )

    def oldest(self) -> int:
        return min(self.shared)

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(10)


def cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) of each group of processes so far."""
    total = {}
    for name, group in pids.items():
        seconds = 0.0
        for pid in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = psutil.Process(pid).cpu_times()
                seconds += times.user + times.system
        total[name] = seconds
    return total


# The servers


class Fleet:
    name = "fleet"

    def __init__(self, args: argparse.Namespace, directory: str, *options: str) -> None:
        Path(directory, "benchapp.py").write_text(APP)
        self.master = harness.Master(
            directory,
            "-w",
            str(args.workers),
            "--app",
            "benchapp:app",
            "--log-level",
            "warning",
            *options,
            timeout=60,
            cwd=directory,  # (the app's module, imported from the working directory)
        )
        self.master.wait_workers(args.workers, timeout=60)
        self.port = self.master.port
        workers = self.master.worker_pids()
        children = psutil.Process(self.master.proc.pid).children()
        hubs = [child.pid for child in children if child.pid not in workers]
        if len(hubs) != 1:
            raise RuntimeError(f"expected one hub among the master's children, found {hubs}")
        self.hub = hubs[0]
        self.workers = sorted(workers)

    def pids(self) -> dict[str, list[int]]:
        return {"workers": self.workers, "hub": [self.hub], "master": [self.master.proc.pid]}

    def spread(self, connections: int) -> list[int]:
        """Connections per worker (the workers' heartbeats say), once all are counted."""

        def counts() -> list[int]:
            return sorted(w["connections"] for w in self.master.status()["workers"])

        harness.wait_for(lambda: sum(counts()) >= connections, 30, "the workers' counts")
        return counts()

    def pubsub(self) -> dict[str, int]:
        figures: dict[str, int] = self.master.status()["pubsub"]
        return figures

    def stop(self) -> None:
        self.master.stop(timeout=30)


# 1 and 2: deliveries per second at saturation, latency at a rate


def settle(clients: Clients, pub: Connection, args: argparse.Namespace) -> None:
    """Publish 20 messages a second until every subscriber has received one: every
    subscription is live."""
    pub.send(("rate", args.window, 20.0))
    harness.wait_for(lambda: clients.oldest() > 0, 60, "every subscriber's first message")
    pub.send(("idle", 0))


class Server(Protocol):
    """A set-up under measure: its processes, by group (their CPU is reported)."""

    def pids(self) -> dict[str, list[int]]: ...


Groups = dict[str, list[int]]  # a name: the indexes of its subscriber processes


def saturation(
    clients: Clients,
    pub: Connection,
    server: Server,
    args: argparse.Namespace,
    groups: Groups | None = None,
) -> dict[str, Any]:
    """Deliveries per second with --window messages in flight (``by_group``: those of each
    group's subscriber processes)."""
    pids = {**server.pids(), "clients": clients.pids()}
    clients.ask(clients.subscriber_pipes, "pause", args.client_pause)
    pub.send(("saturate", args.window))
    time.sleep(args.warmup)  # the pace settles before the count
    before = clients.counts()
    sent = clients.ask([pub], "count")[0]
    cpu_before, started = cpu(pids), time.monotonic()
    time.sleep(args.duration)
    after = clients.counts()
    sent_after = clients.ask([pub], "count")[0]
    elapsed = time.monotonic() - started
    cpu_after = cpu(pids)
    pub.send(("idle", 0))
    clients.ask(clients.subscriber_pipes, "pause", 0.0)
    # Wait for the last messages to arrive: the next measurement starts from quiet.
    harness.wait_for(lambda: clients.oldest() >= sent_after, 30, "the window's last messages")
    grown = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    result = {
        "deliveries_per_s": round(sum(grown) / elapsed),
        "published_per_s": round((sent_after - sent) / elapsed, 1),
        "cpu": {k: round((cpu_after[k] - cpu_before[k]) / elapsed, 3) for k in pids},
        "gaps": sum(a[1] for a in after),
        "closed": sum(a[2] for a in after),
    }
    if groups:
        result["by_group"] = {
            name: {"deliveries_per_s": round(sum(grown[k] for k in members) / elapsed)}
            for name, members in groups.items()
        }
    return result


def latency(
    clients: Clients,
    pub: Connection,
    rate: float,
    args: argparse.Namespace,
    groups: Groups | None = None,
    server: Server | None = None,
) -> dict[str, Any]:
    """Deliveries per second `rate`: a message every subscribers/rate seconds; the times
    from publish to delivery of every delivery over --duration (``by_group``: those of each
    group's subscriber processes; with `server`, the CPU of its processes and the clients')."""
    pids = {**server.pids(), "clients": clients.pids()} if server is not None else {}
    pub.send(("rate", args.window, rate / args.subscribers))
    time.sleep(args.warmup)
    frames, _, _ = clients.received()
    clients.ask(clients.subscriber_pipes, "record", True)
    cpu_before, started = cpu(pids), time.monotonic()
    time.sleep(args.duration)
    recorded = []
    for data in clients.ask(clients.subscriber_pipes, "record", False):
        recorded.append(array.array("d", data))
    elapsed = time.monotonic() - started
    cpu_after = cpu(pids)
    frames_after, gaps, closed = clients.received()
    pub.send(("idle", 0))
    sent = clients.ask([pub], "count")[0]
    harness.wait_for(lambda: clients.oldest() >= sent, 30, "the last messages")
    result = {
        "rate": round(rate),
        "deliveries_per_s": round((frames_after - frames) / elapsed),
        **times([x for samples in recorded for x in samples]),
        "gaps": gaps,
        "closed": closed,
    }
    if pids:
        result["cpu"] = {k: round((cpu_after[k] - cpu_before[k]) / elapsed, 3) for k in pids}
    if groups:
        result["by_group"] = {
            name: times([x for k in members for x in recorded[k]])
            for name, members in groups.items()
        }
    return result


def times(samples: list[float]) -> dict[str, Any]:
    """p50, p99 and max (ms) of these times (s), and their count."""
    ordered = sorted(samples)
    return {
        "p50_ms": round(percentile(ordered, 0.5) * 1000, 2),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
        "samples": len(ordered),
    }


def percentile(ordered: list[float], share: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cell(values: list[float], digits: int = 0) -> str:
    shown = ", ".join(f"{v:,.{digits}f}" for v in values)
    return f"{median(values):,.{digits}f} [{shown}]"
