"""The wire between the workers and the hub that sequences their topics: frames, no I/O.

Each worker holds one stream connection (AF_UNIX) to the hub (wsfleet/hub.py); its pub/sub
client (wsfleet/pubsub.py) and the hub each feed what they read to a :class:`Reader` and write
what the ``encode_*`` functions return. A frame is a 5-byte header, the body's length (4
bytes) and its kind (1 byte), then the body, whose fields are fixed-size integers and
length-prefixed strings. Not JSON: a message's bytes go through as they are, and one
published message is encoded once however many workers it goes to.

A message travels as its *payload*: one byte for its kind (:data:`TEXT` or :data:`BINARY`)
and then its bytes (a str UTF-8 encoded). The hub stores payloads in its history as they
came: it never decodes a message.

Worker to hub: PUBLISH (a request id, the topic, the payload), SUBSCRIBE and UNSUBSCRIBE (the
worker's stream of a topic: one per worker, however many of its connections subscribe),
HISTORY (a request id, the topic, an epoch and an offset: what follows), STATS (JSON: the
worker's figures), TAKEOVER (from an upgrade's new hub: a token and its pid).
Hub to worker: ACK (a request id, the epoch and offset given), MESSAGE (the topic, epoch,
offset, payload), POSITION (the topic's epoch and last offset, answering SUBSCRIBE),
RECOVERY (a request id, the epoch, last offset, whether recovered, the messages),
FAILED (a request id and why: a publish the broker could not take), SNAPSHOT (to a new hub:
its state, pickled).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

TEXT = b"\x01"
BINARY = b"\x00"

PUBLISH, SUBSCRIBE, UNSUBSCRIBE, HISTORY, STATS, TAKEOVER = b"PSUHTK"
ACK, MESSAGE, POSITION, RECOVERY, SNAPSHOT, FAILED = b"AMORNF"

_HEADER = struct.Struct("!IB")
_Q = struct.Struct("!Q")
_QQ = struct.Struct("!QQ")
_QQB = struct.Struct("!QQB")
_QI = struct.Struct("!QI")
MAX_FRAME = 2**31  # a body's bound: a snapshot, the largest, is refused beyond it


class ProtocolError(ValueError):
    """A frame that does not follow the protocol: the connection is dropped."""


def payload(message: str | bytes) -> bytes:
    """A checked message (topics.check_message) as it travels."""
    if isinstance(message, str):
        return TEXT + message.encode()
    return BINARY + message


def message(data: bytes) -> str | bytes:
    """The message a payload carries, as it was published."""
    if data[:1] == TEXT:
        return data[1:].decode()
    return data[1:]


def _frame(kind: int, *parts: bytes) -> bytes:
    size = sum(len(part) for part in parts)
    return b"".join((_HEADER.pack(size, kind), *parts))


def _text(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def encode_publish(request: int, topic: str, data: bytes) -> bytes:
    return _frame(PUBLISH, _Q.pack(request), _text(topic), data)


def encode_subscribe(topic: str) -> bytes:
    return _frame(SUBSCRIBE, _text(topic))


def encode_unsubscribe(topic: str) -> bytes:
    return _frame(UNSUBSCRIBE, _text(topic))


def encode_history(request: int, topic: str, epoch: str, offset: int) -> bytes:
    return _frame(HISTORY, _QQ.pack(request, offset), _text(epoch), _text(topic))


def encode_stats(data: bytes) -> bytes:
    return _frame(STATS, data)


def encode_takeover(token: str, pid: int) -> bytes:
    return _frame(TAKEOVER, _Q.pack(pid), _text(token))


def encode_ack(request: int, epoch: str, offset: int) -> bytes:
    return _frame(ACK, _QQ.pack(request, offset), _text(epoch))


def encode_message(topic: str, epoch: str, offset: int, data: bytes) -> bytes:
    return _frame(MESSAGE, _Q.pack(offset), _text(epoch), _text(topic), data)


def encode_position(topic: str, epoch: str, offset: int) -> bytes:
    return _frame(POSITION, _Q.pack(offset), _text(epoch), _text(topic))


def encode_recovery(
    request: int, epoch: str, offset: int, recovered: bool, messages: tuple[tuple[int, bytes], ...]
) -> bytes:
    parts = [_QQB.pack(request, offset, recovered), _text(epoch)]
    for number, data in messages:
        parts.append(_QI.pack(number, len(data)))
        parts.append(data)
    return _frame(RECOVERY, *parts)


def encode_failed(request: int, reason: str) -> bytes:
    return _frame(FAILED, _Q.pack(request), reason.encode())


def encode_snapshot(data: bytes) -> bytes:
    if len(data) >= MAX_FRAME:
        raise ValueError(f"a snapshot of {len(data)} bytes is over the frame's bound")
    return _frame(SNAPSHOT, data)


class Frame(NamedTuple):
    kind: int
    body: memoryview


class Fields:
    """Reads a frame's body field by field (ProtocolError when it is too short)."""

    __slots__ = ("at", "body")

    def __init__(self, body: memoryview) -> None:
        self.body = body
        self.at = 0

    def _take(self, size: int) -> memoryview:
        start, end = self.at, self.at + size
        if end > len(self.body):
            raise ProtocolError("a frame shorter than its fields")
        self.at = end
        return self.body[start:end]

    def integer(self) -> int:
        value: int = _Q.unpack_from(self._take(8))[0]
        return value

    def flag(self) -> bool:
        return self._take(1)[0] != 0

    def text(self) -> str:
        size = int.from_bytes(self._take(2), "big")
        try:
            return str(self._take(size), "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("a string that is not UTF-8") from None

    def rest(self) -> bytes:
        data = bytes(self.body[self.at :])
        self.at = len(self.body)
        return data

    def messages(self) -> tuple[tuple[int, bytes], ...]:
        found = []
        while self.at < len(self.body):
            number, size = _QI.unpack_from(self._take(12))
            found.append((number, bytes(self._take(size))))
        return tuple(found)


class Reader:
    """Frames out of a byte stream, as it arrives in pieces."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> Iterator[Frame]:
        """The frames complete with ``data``; ProtocolError for a frame over the bound."""
        buffer = self.buffer
        buffer += data
        start, end = 0, len(buffer)
        view = memoryview(buffer)
        try:
            while end - start >= 5:
                size, kind = _HEADER.unpack_from(buffer, start)
                if size > self.max_frame:
                    raise ProtocolError(f"a frame of {size} bytes, over {self.max_frame}")
                if end - start - 5 < size:
                    break
                # (a copy: the buffer is resized below, which a view would forbid)
                yield Frame(kind, memoryview(bytes(view[start + 5 : start + 5 + size])))
                start += 5 + size
        finally:
            view.release()
            del buffer[:start]
