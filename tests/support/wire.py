"""A raw WebSocket client, for what well-behaved client libraries refuse to send (bad
handshakes, bad UTF-8) and to control exactly when each byte goes out."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
from collections.abc import Iterator


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


@contextlib.contextmanager
def stuck_client(port: int) -> Iterator[socket.socket]:
    """A WebSocket client that completed its handshake and never reads or answers again:
    it keeps a drain waiting for its closing handshake."""
    with raw_connect(port) as sock:
        sock.sendall(upgrade_request())
        assert read_http_response(sock)[0] == 101
        yield sock
