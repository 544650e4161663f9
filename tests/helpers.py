"""Test helpers: real wsfleet processes with their stderr followed line by line, and a raw
WebSocket client for what well-behaved client libraries refuse to send."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on ws://(\S+):(\d+)")


class Proc:
    """A wsfleet process whose stderr (and stdout) is read by a thread into a line list, so
    tests can wait for a line (an event) instead of sleeping, and the pipe never fills."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        pass_fds: Sequence[int] = (),
        program: Sequence[str] = (sys.executable, "-m", "wsfleet"),
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("WSFLEET_")}
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.args = [*program, *args]
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            pass_fds=pass_fds,
            text=True,
        )
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self.lines.append("")  # EOF marker: wakes waiters
            self._new.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str | re.Pattern[str], timeout: float = 15) -> re.Match[str]:
        """Wait until a line matches; fail with the output so far if it never does."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.popen.poll() is not None and not self._reader.is_alive()
                ):
                    raise AssertionError(
                        f"no line matching {regex.pattern!r} within {timeout}s "
                        f"(exit status {self.popen.poll()}); output:\n{self.output}"
                    )
                self._new.wait(min(remaining, 0.5))

    def wait_ready(self, timeout: float = 15) -> int:
        """Wait for the readiness line; return the port."""
        return int(self.wait_line(READY, timeout).group(2))

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 15) -> int:
        status = self.popen.wait(timeout)
        self._reader.join(timeout)
        return status

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Make sure the process and every process it started are gone (the fixture's
        cleanup): children first, found by pid while the parent still exists."""
        children = self.children() if self.popen.poll() is None else []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        psutil.wait_procs(children, timeout=10)
        self._reader.join(5)


def run_wsfleet(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 20, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a wsfleet command that is expected to exit by itself."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WSFLEET_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "wsfleet", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        **kw,  # type: ignore[arg-type]
    )


# A raw WebSocket client, to send what client libraries refuse to (bad handshakes, bad UTF-8)
# and to control exactly when each byte goes out.


def raw_connect(port: int, host: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


def upgrade_request(path: str = "/", *, key: str | None = None, version: str = "13") -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
    ]
    if key:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_http_response(sock: socket.socket) -> tuple[int, bytes, bytearray]:
    """Read an HTTP response: (status, head and body, bytes after the head of a 101).

    For a status other than 101, the body is read until the server closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    head, _, rest = data.partition(b"\r\n\r\n")
    if status == 101:
        return status, head, bytearray(rest)
    while chunk := sock.recv(4096):
        data += chunk
    return status, data, bytearray()


def send_frame(sock: socket.socket, opcode: int, payload: bytes, fin: bool = True) -> None:
    """Send one masked client frame."""
    sock.sendall(client_frame(opcode, payload, fin))


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame, to send several in one system call."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def recv_frame(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """Receive one unmasked server frame: (opcode, payload)."""

    def need(n: int) -> None:
        while len(buffer) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before a whole frame arrived")
            buffer.extend(chunk)

    need(2)
    opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
    offset = 2
    if length == 126:
        need(4)
        length, offset = struct.unpack("!H", buffer[2:4])[0], 4
    elif length == 127:
        need(10)
        length, offset = struct.unpack("!Q", buffer[2:10])[0], 10
    need(offset + length)
    payload = bytes(buffer[offset : offset + length])
    del buffer[: offset + length]
    return opcode, payload


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


def wait_for(predicate: object, timeout: float = 10, what: str = "condition") -> None:
    """Poll a condition (a file's content, a process's state) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """Whether a process has exited. An orphan's zombie counts as gone: not every init
    reaps (this sandbox's does not)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def stuck_client(port: int) -> Iterator[socket.socket]:
    """A WebSocket client that completed its handshake and never reads or answers again:
    it keeps a drain waiting for its closing handshake."""
    with raw_connect(port) as sock:
        sock.sendall(upgrade_request())
        assert read_http_response(sock)[0] == 101
        yield sock
