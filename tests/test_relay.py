"""The wire between the workers and the hub (wsfleet/relay.py), without I/O: each frame read
back as written, from a stream cut anywhere, and what does not follow the protocol refused."""

from __future__ import annotations

import random
import struct

import pytest

from wsfleet import relay
from wsfleet.relay import Fields, ProtocolError, Reader


def read_all(data: bytes, cuts: list[int]) -> list[relay.Frame]:
    """The frames of ``data`` fed in pieces cut at these places."""
    reader, frames, start = Reader(), [], 0
    for cut in [*sorted(cuts), len(data)]:
        frames.extend(reader.feed(data[start:cut]))
        start = cut
    assert not reader.buffer
    return frames


def test_every_frame_reads_back_as_written_however_the_stream_is_cut() -> None:
    payload = relay.payload("héllo")
    stream = b"".join(
        [
            relay.encode_publish(7, "room:é", payload),
            relay.encode_subscribe("t"),
            relay.encode_unsubscribe("t"),
            relay.encode_history(9, "t", "EPOCH", 41),
            relay.encode_ack(7, "EPOCH", 42),
            relay.encode_message("room:é", "EPOCH", 42, payload),
            relay.encode_position("t", "EPOCH", 3),
            relay.encode_recovery(
                9, "EPOCH", 43, True, ((42, payload), (43, relay.payload(b"\0")))
            ),
            relay.encode_takeover("token", 123),
            relay.encode_stats(b"{}"),
        ]
    )
    randomly = random.Random(22)
    for _ in range(50):
        cuts = randomly.sample(range(1, len(stream)), randomly.randint(0, 12))
        frames = read_all(stream, cuts)
        kinds = bytes(frame.kind for frame in frames)
        assert kinds == b"PSUHAMORKT"
        publish = Fields(frames[0].body)
        assert (publish.integer(), publish.text(), publish.rest()) == (7, "room:é", payload)
        assert relay.message(payload) == "héllo"
        history = Fields(frames[3].body)
        assert (history.integer(), history.integer(), history.text(), history.text()) == (
            9,
            41,
            "EPOCH",
            "t",
        )
        message = Fields(frames[5].body)
        assert (message.integer(), message.text(), message.text(), message.rest()) == (
            42,
            "EPOCH",
            "room:é",
            payload,
        )
        recovery = Fields(frames[7].body)
        assert (recovery.integer(), recovery.integer(), recovery.flag(), recovery.text()) == (
            9,
            43,
            True,
            "EPOCH",
        )
        assert recovery.messages() == ((42, payload), (43, b"\x00\x00"))


def test_a_payload_keeps_text_as_text_and_bytes_as_bytes() -> None:
    assert relay.message(relay.payload("text")) == "text"
    assert relay.message(relay.payload(b"text")) == b"text"
    assert relay.payload("é") == relay.TEXT + "é".encode()


def test_a_frame_over_the_bound_or_a_short_one_is_refused() -> None:
    with pytest.raises(ProtocolError, match="over"):
        list(Reader(max_frame=10).feed(relay.encode_stats(b"x" * 11)))
    body = bytes(16) + b"\x00\x05e"  # an ACK whose epoch says 5 bytes and has 1
    (frame,) = Reader().feed(struct.pack("!IB", len(body), relay.ACK) + body)
    fields = Fields(frame.body)
    assert (fields.integer(), fields.integer()) == (0, 0)
    with pytest.raises(ProtocolError, match="shorter"):
        fields.text()
    (frame,) = Reader().feed(relay.encode_subscribe("t")[:-1] + b"\xff")
    with pytest.raises(ProtocolError, match="UTF-8"):
        Fields(frame.body).text()
