"""`wsfleet bench`: a load client that is not the bottleneck.

Each client process runs asyncio (uvloop when installed) with websockets' Sans-I/O protocol
driven directly by an asyncio Protocol: no per-message task, future or lock, which is most
of a client's cost with the asyncio API. Every connection keeps K messages of S bytes in
flight against an echo server, sending the next one as each echo returns, and records the
round-trip time of each.

Results: messages per second, p50/p99 round trip, connection errors and close codes, as text
or JSON; a progress line per second on stderr when it is a terminal.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

SAMPLE = 50_000  # round-trip times each process sends back for the percentiles


@dataclass
class Report:
    url: str
    connections: int
    in_flight: int
    size: int
    duration: float
    processes: int
    compression: str
    connected: int = 0
    messages: int = 0
    messages_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    connect_errors: dict[str, int] = field(default_factory=dict)
    close_codes: dict[str, int] = field(default_factory=dict)


class _Client(asyncio.Protocol):
    """One connection: handshake, then K echoes in flight until told to stop."""

    def __init__(self, shared: _Shared, url: str, compression: str) -> None:
        extensions = [ClientPerMessageDeflateFactory()] if compression == "deflate" else None
        self.protocol = ClientProtocol(parse_uri(url), extensions=extensions, max_size=None)
        self.shared = shared
        self.sent: collections.deque[float] = collections.deque()
        self.open = False
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        shared = self.shared
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if self.protocol.handshake_exc is not None:
                    self._finish(f"HTTP {event.status_code}")
                    return
                self.open = True
                shared.connected += 1
                for _ in range(shared.in_flight):
                    self._send()
            elif isinstance(event, Frame) and event.opcode in (Opcode.TEXT, Opcode.BINARY):
                now = time.perf_counter()
                rtt = now - self.sent.popleft()
                shared.messages += 1
                if shared.measuring:
                    shared.record(rtt)
                if not shared.stopping:
                    self._send()
                elif not self.sent:
                    self.protocol.send_close(1000)
            elif isinstance(event, Frame) and event.opcode == Opcode.CLOSE:
                pass  # the protocol answers it; the close code is read at the end
        self._flush()

    def _send(self) -> None:
        self.sent.append(time.perf_counter())
        self.protocol.send_binary(self.shared.payload)

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        code = self.protocol.close_rcvd.code if self.protocol.close_rcvd else 1006
        self._finish(None if self.open else f"closed before the handshake ({code})", code)

    def _finish(self, error: str | None, code: int | None = None) -> None:
        if self.done.done():
            return  # a failed handshake is counted once, not again when the TCP closes
        if error is not None:
            self.shared.errors[error] += 1
            self.transport.abort()
        if code is not None and self.open:
            self.shared.codes[str(code)] += 1
        self.done.set_result(None)


class _Shared:
    """What a process's connections share: settings and counters (one event loop, no lock)."""

    def __init__(self, size: int, in_flight: int) -> None:
        self.payload = random.randbytes(size)
        self.in_flight = in_flight
        self.connected = 0
        self.messages = 0
        self.measuring = False
        self.stopping = False
        self.rtts = array.array("d")
        self.seen = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()

    def record(self, rtt: float) -> None:
        """Keep a uniform sample of at most SAMPLE round trips (reservoir sampling)."""
        self.seen += 1
        if len(self.rtts) < SAMPLE:
            self.rtts.append(rtt)
        else:
            slot = random.randrange(self.seen)
            if slot < SAMPLE:
                self.rtts[slot] = rtt


def _process(args: dict[str, Any], count: int, pipe: Connection) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_process_main(args, count, pipe))


async def _process_main(args: dict[str, Any], count: int, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    shared = _Shared(args["size"], args["in_flight"])
    uri = parse_uri(args["url"])
    clients = []
    for _ in range(count):
        client = _Client(shared, args["url"], args["compression"])
        try:
            await loop.create_connection(lambda c=client: c, uri.host, uri.port)  # type: ignore[misc]
            clients.append(client)
        except OSError as exc:
            shared.errors[type(exc).__name__] += 1
    while shared.connected + sum(shared.errors.values()) < count:
        await asyncio.sleep(0.01)  # the handshakes complete in data_received
        if all(c.done.done() or c.open for c in clients):
            break
    pipe.send(("ready", shared.connected))
    pipe.recv()  # the go: every process measures over the same interval
    shared.messages = 0
    shared.measuring = True
    started = time.perf_counter()
    deadline = started + args["duration"]
    while (now := time.perf_counter()) < deadline:
        await asyncio.sleep(min(1.0, deadline - now))
        pipe.send(("progress", shared.messages))
    elapsed = time.perf_counter() - started
    messages = shared.messages
    shared.measuring = False
    shared.stopping = True
    for client in clients:
        if client.open and not client.sent:
            client.protocol.send_close(1000)
            client._flush()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*(c.done for c in clients))
    for client in clients:
        if not client.done.done():
            client.transport.abort()
    pipe.send(
        ("result", messages, elapsed, list(shared.rtts), dict(shared.errors), dict(shared.codes))
    )


def run(
    url: str,
    connections: int = 50,
    in_flight: int = 4,
    size: int = 64,
    duration: float = 10.0,
    processes: int | None = None,
    compression: str = "none",
    progress: bool = False,
) -> Report:
    """Run the load and return its report."""
    processes = processes or max(1, min(connections, (os.cpu_count() or 1)))
    report = Report(url, connections, in_flight, size, duration, processes, compression)
    args = {
        "url": url,
        "size": size,
        "in_flight": in_flight,
        "duration": duration,
        "compression": compression,
    }
    context = multiprocessing.get_context("fork")
    pipes, workers = [], []
    for i in range(processes):
        share = connections // processes + (1 if i < connections % processes else 0)
        ours, theirs = context.Pipe()
        proc = context.Process(target=_process, args=(args, share, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        workers.append(proc)
    try:
        report.connected = sum(pipe.recv()[1] for pipe in pipes)
        for pipe in pipes:
            pipe.send("go")
        started = time.monotonic()
        counts = [0] * processes
        results: list[tuple[Any, ...]] = [()] * processes
        while any(not r for r in results):
            for i, pipe in enumerate(pipes):
                while not results[i] and pipe.poll(0.05):
                    message = pipe.recv()
                    if message[0] == "progress":
                        counts[i] = message[1]
                    else:
                        results[i] = message
            if progress:
                elapsed = time.monotonic() - started
                rate = sum(counts) / elapsed if elapsed else 0
                print(
                    f"\r{elapsed:5.1f}s  {sum(counts):>12,} messages  {rate:>10,.0f} msg/s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        if progress:
            print(file=sys.stderr)
    finally:
        for proc in workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    rtts: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    elapsed = 0.0
    for _, messages, seconds, sample, errs, closes in results:
        report.messages += messages
        elapsed = max(elapsed, seconds)
        rtts.extend(sample)
        errors.update(errs)
        codes.update(closes)
    report.messages_per_s = round(report.messages / elapsed, 1) if elapsed else 0.0
    if rtts:
        rtts.sort()
        report.p50_ms = round(rtts[len(rtts) // 2] * 1000, 3)
        report.p99_ms = round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1000, 3)
    report.connect_errors = dict(errors)
    report.close_codes = dict(codes)
    return report


def format_report(report: Report, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(report), indent=2)
    p50 = f"{report.p50_ms:.2f} ms" if report.p50_ms is not None else "-"
    p99 = f"{report.p99_ms:.2f} ms" if report.p99_ms is not None else "-"
    return (
        f"{report.url}: {report.connected}/{report.connections} connections, "
        f"{report.in_flight} x {report.size} B in flight each, {report.processes} processes, "
        f"compression {report.compression}\n"
        f"{report.messages:,} messages in {report.duration:g} s: "
        f"{report.messages_per_s:,.0f} msg/s; round trip p50 {p50}, p99 {p99}\n"
        f"connection errors: {report.connect_errors or 'none'}; "
        f"close codes: {report.close_codes or 'none'}"
    )
