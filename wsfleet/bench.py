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
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from . import logs, memory, notify

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

    def __init__(self, shared: _Shared, url: str, compression: str, proxy_header: bool) -> None:
        extensions = [ClientPerMessageDeflateFactory()] if compression == "deflate" else None
        self.protocol = ClientProtocol(parse_uri(url), extensions=extensions, max_size=None)
        self.shared = shared
        self.proxy_header = proxy_header
        self.sent: collections.deque[float] = collections.deque()
        self.open = False
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP connection's transport, always (uvloop's does not subclass asyncio.Transport,
        # so no isinstance check).
        self.transport = cast(asyncio.Transport, transport)
        if self.proxy_header:  # as a load balancer would, for a server with --proxy-protocol
            host, port = transport.get_extra_info("sockname")[:2]
            self.transport.write(f"PROXY TCP4 {host} {host} {port} {port}\r\n".encode())
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
        # One write for all the frames of one pass, so that the client spends its CPU time
        # (shared with the server under test) on messages rather than on system calls.
        chunks = self.protocol.data_to_send()
        eof = b"" in chunks
        if eof:
            chunks = [data for data in chunks if data]
        if chunks:
            self.transport.writelines(chunks)
        if eof and self.transport.can_write_eof():
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
    tls = ssl.create_default_context(cafile=args["cafile"]) if uri.secure else None
    clients = []
    for _ in range(count):
        client = _Client(shared, args["url"], args["compression"], args["proxy_header"])
        try:
            await loop.create_connection(
                lambda c=client: c,
                uri.host,
                uri.port,
                ssl=tls,
                server_hostname=uri.host if tls else None,
            )
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
    cafile: str | None = None,
    proxy_header: bool = False,
) -> Report:
    """Run the load and return its report (wss:// with cafile's CA, or the system's)."""
    processes = processes or max(1, min(connections, (os.cpu_count() or 1)))
    report = Report(url, connections, in_flight, size, duration, processes, compression)
    args = {
        "url": url,
        "size": size,
        "in_flight": in_flight,
        "duration": duration,
        "compression": compression,
        "cafile": cafile,
        "proxy_header": proxy_header,
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
        f"{report.url}: {report.connected}/{logs.plural(report.connections, 'connection')}, "
        f"{report.in_flight} x {report.size} B in flight each, "
        f"{logs.plural(report.processes, 'process', 'processes')}, "
        f"compression {report.compression}\n"
        f"{report.messages:,} message{'' if report.messages == 1 else 's'} in "
        f"{report.duration:g} s: "
        f"{report.messages_per_s:,.0f} msg/s; round trip p50 {p50}, p99 {p99}\n"
        f"connection errors: {report.connect_errors or 'none'}; "
        f"close codes: {report.close_codes or 'none'}"
    )


# `wsfleet bench memory`: what each compression setting costs per connection, and gains.

SETTINGS = ("15/8", "14/7", "13/6", "12/5", "11/4", "10/3", "9/2", "none")
PROBE = "__wsfleet_memory__"


async def memory_probe(websocket: Any) -> None:
    """The app `wsfleet bench memory` runs: an echo that also reports the worker's traced
    memory (tracemalloc) when asked."""
    import tracemalloc

    async for message in websocket:
        if message == PROBE:
            current = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else -1
            await websocket.send(str(current))
        else:
            await websocket.send(message)


def load_messages(path: str | None) -> list[bytes | str]:
    """Typical messages: one per line of a JSON-lines file, one per file of a directory, or
    (no path) a synthetic chat-like sample, the kind of JSON most WebSocket apps send."""
    if path is None:
        rng = random.Random(42)
        words = [
            "hello",
            "world",
            "meeting",
            "tomorrow",
            "lunch",
            "project",
            "update",
            "ok",
            "thanks",
            "see",
            "you",
        ]
        return [
            json.dumps(
                {
                    "type": "message",
                    "room": f"room-{rng.randrange(50)}",
                    "user": f"user-{rng.randrange(1000)}",
                    "text": " ".join(rng.choices(words, k=rng.randrange(3, 20))),
                    "ts": 1_764_000_000 + i,
                }
            )
            for i in range(20)
        ]
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        return [open(os.path.join(path, n), "rb").read() for n in names if not n.startswith(".")]
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def compression_table(
    messages: list[bytes | str], settings: list[str]
) -> dict[str, dict[str, float]]:
    """Per setting: compressed size and compression time relative to websockets' default
    (12/5), compressing the messages in order with context takeover, as a connection does."""
    import zlib

    raw = [m.encode() if isinstance(m, str) else m for m in messages]
    results: dict[str, dict[str, float]] = {}
    for setting in dict.fromkeys([*settings, "12/5"]):  # the default: what the rest compare to
        if setting == "none":
            results[setting] = {"bytes": float(sum(map(len, raw))), "seconds": 0.0}
            continue
        bits, level = map(int, setting.split("/"))
        best = float("inf")
        for _ in range(5):  # the fastest of five: the least disturbed by the machine
            compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits, level)
            size = 0
            started = time.perf_counter()
            for data in raw:
                size += len(compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)) - 4
            best = min(best, time.perf_counter() - started)
        results[setting] = {"bytes": float(size), "seconds": best}
    base = results["12/5"]
    for values in results.values():
        values["size_vs_default"] = round(values["bytes"] / base["bytes"], 3)
        values["time_vs_default"] = round(values["seconds"] / base["seconds"], 3)
    return results


async def _open_and_exchange(
    url: str, count: int, messages: list[bytes | str], compression: str
) -> tuple[list[Any], int]:
    from websockets.asyncio.client import connect

    connections, errors = [], 0
    for _ in range(count):
        try:
            ws = await connect(
                url, compression=None if compression == "none" else "deflate", max_size=None
            )
            for message in messages:
                await ws.send(message)
                await ws.recv()
            connections.append(ws)
        except Exception:
            errors += 1
    return connections, errors


def _worker(setting: str, trace: bool) -> tuple[Any, int]:
    import subprocess

    options = (
        ["--compression", "none"]
        if setting == "none"
        else [
            "--compression",
            "deflate",
            "--window-bits",
            setting.split("/")[0],
            "--memory-level",
            setting.split("/")[1],
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONTRACEMALLOC"}
    if trace:
        env["PYTHONTRACEMALLOC"] = "1"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wsfleet",
            "worker",
            "--port",
            "0",
            "--log-level",
            "warning",
            "--app",
            "wsfleet.bench:memory_probe",
            "--max-size",
            str(2**24),
            *options,
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := notify.READY.search(line):
            return proc, int(m.group(2))
    raise RuntimeError(f"the worker for {setting} did not start")


def rss_uss(pid: int) -> tuple[int, int]:
    """A process's resident and unique memory in bytes, read from /proc as psutil's
    memory_full_info() reads them (wsfleet/memory.py, which --max-worker-memory uses too), so
    that `wsfleet bench memory` needs nothing beyond wsfleet's own dependencies."""
    return memory.rss(pid), memory.uss(pid)


def measure_memory(setting: str, messages: list[bytes | str], count: int) -> dict[str, float]:
    """Memory per connection with this setting: tracemalloc inside one worker, RSS and USS
    from outside another (tracemalloc's own bookkeeping would inflate RSS)."""
    from websockets.sync.client import connect as sync_connect

    results: dict[str, float] = {}
    for trace in (True, False):
        proc, port = _worker(setting, trace)
        url = f"ws://127.0.0.1:{port}/"
        compression = "none" if setting == "none" else "deflate"
        try:
            with sync_connect(url, compression=None) as probe:

                def traced() -> int:
                    probe.send(PROBE)
                    return int(probe.recv(timeout=60))

                before = (traced(),) if trace else rss_uss(proc.pid)
                loop = asyncio.new_event_loop()
                try:
                    conns, errors = loop.run_until_complete(
                        _open_and_exchange(url, count, messages, compression)
                    )
                    opened = len(conns)
                    after = (traced(),) if trace else rss_uss(proc.pid)
                    for ws in conns:
                        loop.run_until_complete(ws.close())
                finally:
                    loop.close()
            kib = [round((a - b) / opened / 1024, 1) for a, b in zip(after, before, strict=True)]
            if trace:
                results["tracemalloc_kib"] = kib[0]
            else:
                results["rss_kib"], results["uss_kib"] = kib
            results["errors"] = results.get("errors", 0) + errors
        finally:
            proc.terminate()
            proc.wait(60)
    return results


def run_memory(
    path: str | None, count: int, settings: list[str], progress: bool = False
) -> dict[str, Any]:
    messages = load_messages(path)
    table = compression_table(messages, settings)
    rows = {}
    for number, setting in enumerate(settings, 1):
        if progress:  # each setting takes seconds: say where it is
            print(
                f"\r{setting}: {logs.plural(count, 'connection')} ({number} of {len(settings)})...",
                end="",
                file=sys.stderr,
                flush=True,
            )
        rows[setting] = {**table[setting], **measure_memory(setting, messages, count)}
    if progress:
        print(file=sys.stderr)
    return {"messages": len(messages), "connections": count, "settings": rows}


def format_memory(report: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(report, indent=2)
    lines = [
        f"{logs.plural(report['connections'], 'connection')}, each having exchanged "
        f"{logs.plural(report['messages'], 'message')}; compression relative to websockets' "
        "default (12/5)",
        "",
        "| window bits / memory level | compressed size | compression time "
        "| tracemalloc per connection | RSS per connection | USS per connection |",
        "|---|---|---|---|---|---|",
    ]
    for setting, row in report["settings"].items():
        time_ratio = "-" if setting == "none" else f"{row['time_vs_default']:.2f}x"
        lines.append(
            f"| {setting} | {row['size_vs_default']:.2f}x | {time_ratio} "
            f"| {row['tracemalloc_kib']:.1f} KiB | {row['rss_kib']:.1f} KiB "
            f"| {row['uss_kib']:.1f} KiB |"
        )
    return "\n".join(lines)
