"""Publish/subscribe's core (wsfleet/topics.py) without I/O: the store's offsets, epochs,
history and recovery with time passed in, the API's validation, and a subscriber's cursor fed
by hand. Each test runs in milliseconds; the randomized one is seeded and bounded."""

from __future__ import annotations

import array
import itertools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from wsfleet.topics import (
    COMPACT_AFTER,
    HISTORY_TTL,
    MAX_TOPIC_LENGTH,
    Action,
    Cursor,
    CursorState,
    Deliver,
    Fetch,
    Message,
    Missed,
    NewEpoch,
    Position,
    Recovery,
    Topics,
    check_message,
    check_since,
    check_topic,
    new_epoch,
)


def epochs() -> Callable[[], str]:
    """Epochs e1, e2, ... in the order topics are first seen (and stores share none)."""
    counter = itertools.count(1)
    return lambda: f"e{next(counter)}"


def store(**options: float) -> Topics:
    return Topics(epochs=epochs(), **options)


# Offsets and epochs.


def test_offsets_grow_by_one_from_1_in_each_topic() -> None:
    topics = store()
    assert [topics.publish("a", f"{i}", 0.0) for i in range(3)] == [
        ("e1", 1),
        ("e1", 2),
        ("e1", 3),
    ]
    assert topics.publish("b", b"x", 0.0) == ("e2", 1)
    assert topics.publish("a", "3", 0.0) == Position("e1", 4)
    assert topics.stats().published == 5


def test_a_topic_gets_its_epoch_when_first_seen_by_any_call_and_keeps_it() -> None:
    topics = store()
    assert topics.position("asked") == ("e1", 0)  # a topic with no message: offset 0
    assert topics.since("resumed", "old", 3, 0.0) == Recovery("e2", 0, False)
    assert topics.subscribe("subscribed", None, 0.0) == Recovery("e3", 0, False)
    assert topics.publish("asked", "m", 0.0) == ("e1", 1)
    assert topics.publish("resumed", "m", 0.0) == ("e2", 1)
    assert topics.publish("subscribed", "m", 0.0) == ("e3", 1)
    assert topics.position("asked") == ("e1", 1)


def test_the_default_epochs_are_random_url_safe_strings() -> None:
    made = {new_epoch() for _ in range(1000)}
    assert len(made) == 1000
    assert all(
        len(e) == 12 and set(e) <= set(string.ascii_letters + string.digits + "-_") for e in made
    )
    one, other = Topics(), Topics()  # two stores (two masters): two epochs for one topic
    assert one.position("t").epoch != other.position("t").epoch


# History: count and age.


def test_the_history_keeps_the_last_history_size_messages() -> None:
    topics = store(history_size=3)
    for i in range(1, 6):
        topics.publish("t", f"m{i}", 0.0)
    assert topics.since("t", "e1", 2, 0.0) == Recovery(
        "e1", 5, True, ((3, "m3"), (4, "m4"), (5, "m5"))
    )
    assert topics.stats().held == 3


def test_no_history_by_size_or_age_keeps_no_message_but_the_position() -> None:
    for topics in (store(history_size=0), store(history_ttl=0)):
        topics.publish("t", "m", 0.0)
        assert topics.stats().held == 0
        assert topics.since("t", "e1", 1, 0.0) == Recovery("e1", 1, True)
        assert topics.since("t", "e1", 0, 0.0) == Recovery("e1", 1, False)


def test_the_history_evicts_by_age_with_the_time_passed_in() -> None:
    topics = store(history_ttl=10)
    topics.publish("t", "at 0", 0.0)
    topics.publish("t", "at 5", 5.0)
    # A message is held while now - published < history_ttl.
    assert topics.since("t", "e1", 0, 9.99).messages == ((1, "at 0"), (2, "at 5"))
    assert topics.since("t", "e1", 0, 10.0) == Recovery("e1", 2, False)
    assert topics.since("t", "e1", 1, 10.0) == Recovery("e1", 2, True, ((2, "at 5"),))
    assert topics.stats().held == 1
    assert topics.since("t", "e1", 1, 15.0) == Recovery("e1", 2, False)
    assert topics.since("t", "e1", 2, 1000.0) == Recovery("e1", 2, True)  # nothing missed
    assert topics.stats().held == 0


def test_histories_that_expired_whole_are_emptied_by_any_call() -> None:
    topics = store(history_ttl=10)
    for i in range(50):
        topics.publish(f"t{i}", "m", i / 10)
    assert topics.stats().held == 50
    topics.position("other")  # no time: nothing evicted
    assert topics.stats().held == 50
    topics.publish("other", "m", 12.0)  # t0 .. t20 expired whole (published at or before 2)
    assert topics.stats().held == 50 - 21 + 1
    topics.since("other", "e1", 0, 100.0)
    assert topics.stats().held == 0


def test_a_history_grows_no_larger_than_its_bound_as_it_slides() -> None:
    for size, ttl in ((1, float("inf")), (5, float("inf")), (1000, 0.5)):
        topics = store(history_size=size, history_ttl=ttl)
        longest = 0
        for i in range(5000):
            topics.publish("t", "m", i / 1024)  # (exact in binary: 512 of them are 0.5 s)
            state = topics._topics["t"]
            longest = max(longest, len(state.messages))
            assert len(state.messages) == len(state.times)
            assert state.held() == topics.stats().held == min(size, i + 1, 512)
        assert longest <= 2 * min(size, 512) + COMPACT_AFTER
        assert topics.since("t", "e1", 4999, 5.0).recovered


def test_a_store_rejects_meaningless_bounds() -> None:
    for options in (
        {"history_size": -1},
        {"history_ttl": -1},
        {"history_ttl": float("nan")},
        {"max_idle_topics": 0},
    ):
        with pytest.raises(ValueError):
            Topics(**options)


# Recovery: each case of the contract.


def recovery_cases() -> Topics:
    """Topic "t" in epoch e1 at offset 5, holding 3 .. 5."""
    topics = store(history_size=3)
    for i in range(1, 6):
        topics.publish("t", f"m{i}", 0.0)
    return topics


def test_recovered_when_the_history_holds_every_message_after_the_offset() -> None:
    topics = recovery_cases()
    start = topics.subscribe("t", ("e1", 2), 0.0)
    assert start == Recovery("e1", 5, True, ((3, "m3"), (4, "m4"), (5, "m5")))


def test_recovered_with_no_message_when_the_subscriber_saw_the_last() -> None:
    topics = recovery_cases()
    assert topics.subscribe("t", ("e1", 5), 0.0) == Recovery("e1", 5, True)
    assert topics.since("t", "e1", 5, 1e9) == Recovery("e1", 5, True)  # history expired


def test_recovered_from_the_start_of_an_epoch_while_the_history_holds_it() -> None:
    topics = store()
    assert topics.subscribe("new", ("e1", 0), 0.0) == Recovery("e1", 0, True)
    topics.publish("new", "first", 0.0)
    assert topics.since("new", "e1", 0, 0.0) == Recovery("e1", 1, True, ((1, "first"),))


def test_not_recovered_when_the_history_no_longer_holds_them() -> None:
    topics = recovery_cases()
    assert topics.subscribe("t", ("e1", 1), 0.0) == Recovery("e1", 5, False)  # by count
    assert topics.since("t", "e1", 4, HISTORY_TTL + 1) == Recovery("e1", 5, False)  # by age


def test_not_recovered_when_the_epoch_differs() -> None:
    topics = recovery_cases()
    assert topics.subscribe("t", ("another", 4), 0.0) == Recovery("e1", 5, False)
    assert topics.subscribe("t", ("", 0), 0.0) == Recovery("e1", 5, False)


def test_not_recovered_when_the_offset_is_beyond_the_last() -> None:
    topics = recovery_cases()
    assert topics.subscribe("t", ("e1", 6), 0.0) == Recovery("e1", 5, False)
    assert topics.subscribe("t", ("e1", 10**30), 0.0) == Recovery("e1", 5, False)


def test_not_recovered_without_since_and_the_offset_is_the_topics_last() -> None:
    topics = recovery_cases()
    assert topics.subscribe("t", None, 0.0) == Recovery("e1", 5, False)
    assert topics.subscribe("empty", None, 0.0) == Recovery("e2", 0, False)


def test_not_recovered_by_another_store_the_history_being_lost() -> None:
    """A new master (or a replaced hub) has new epochs: a client's old position is not
    recovered, even at the same offset."""
    made = epochs()
    before, after = Topics(epochs=made), Topics(epochs=made)
    before.publish("t", "m", 0.0)
    after.publish("t", "m", 0.0)
    assert after.since("t", before.position("t").epoch, 1, 0.0) == Recovery("e2", 1, False)


# The topics' bound.


def test_idle_topics_past_the_bound_are_forgotten_least_recently_used_first() -> None:
    topics = store(max_idle_topics=3, history_ttl=10)
    for name in "abc":
        topics.publish(name, "m", 0.0)
    topics.position("a")  # used: c is now the least recently used after b
    topics.subscribe("b", None, 20.0)  # subscribed: never forgotten
    topics.publish("d", "m", 20.0)
    topics.position("e")
    assert [name for name in "abcde" if name in topics] == ["a", "b", "d", "e"]
    stats = topics.stats()
    assert (stats.topics, stats.subscribed, stats.forgotten, stats.lost) == (4, 1, 1, 0)
    # A forgotten topic seen again starts anew: a new epoch, offsets from 1.
    assert topics.publish("c", "again", 20.0) == ("e6", 1)
    assert topics.since("c", "e3", 1, 20.0) == Recovery("e6", 1, False)


def test_a_topic_is_forgotten_with_its_history_only_when_every_idle_one_is_fresh() -> None:
    topics = store(max_idle_topics=2, history_ttl=10)
    topics.publish("old", "m", 0.0)
    topics.publish("fresh", "m", 5.0)
    topics.publish("new", "m", 12.0)  # old expired before being forgotten
    assert topics.stats().lost == 0
    topics.publish("newer", "m", 13.0)  # fresh still held a message
    assert ("fresh" in topics, topics.stats().lost, topics.stats().held) == (False, 1, 2)


def test_a_topic_left_by_its_last_subscriber_becomes_idle_and_may_be_forgotten() -> None:
    topics = store(max_idle_topics=1)
    topics.subscribe("kept", None, 0.0)
    topics.subscribe("kept", None, 0.0)
    topics.position("other")
    topics.unsubscribe("kept")
    assert (topics.subscribers("kept"), "other" in topics) == (1, True)
    topics.unsubscribe("kept")  # idle, and the most recently used: "other" goes
    assert ("kept" in topics, "other" in topics, topics.subscribers("kept")) == (True, False, 0)
    with pytest.raises(ValueError, match="no subscriber"):
        topics.unsubscribe("kept")
    with pytest.raises(ValueError, match="no subscriber"):
        topics.unsubscribe("never seen")


# Validation for the API.


def test_a_topic_is_a_str_of_1_to_256_characters() -> None:
    assert check_topic("room:1") == "room:1"
    assert check_topic("é" * MAX_TOPIC_LENGTH) == "é" * 256  # characters, not bytes
    for wrong in (None, 1, ["a"]):
        with pytest.raises(TypeError, match="a topic is a str"):
            check_topic(wrong)
    with pytest.raises(TypeError, match="not bytes: decode it"):
        check_topic(b"room")
    with pytest.raises(ValueError, match="non-empty"):
        check_topic("")
    with pytest.raises(ValueError, match="at most 256 characters, got 257"):
        check_topic("x" * 257)


def test_a_message_is_str_or_bytes_like_and_bytes_like_is_copied_to_bytes() -> None:
    assert check_message("text", 10) == "text"
    assert check_message(b"data", 10) == b"data"
    buffer = bytearray(b"data")
    copied = check_message(buffer, 10)
    buffer[0] = ord("D")
    assert (copied, type(copied)) == (b"data", bytes)
    assert check_message(memoryview(b"abcdef")[1:3], 10) == b"bc"
    for wrong in (None, 1, ["a"], array.array("b", b"ab"), True):
        with pytest.raises(TypeError, match="a message is str or bytes"):
            check_message(wrong, 10)


def test_a_message_over_the_size_limit_is_refused_a_str_measured_utf8_encoded() -> None:
    assert check_message("x" * 4, 4) == "xxxx"
    assert check_message("é" * 2, 4) == "éé"  # 2 bytes each
    for over in ("x" * 5, "é" * 3, "€" * 2, b"x" * 5, bytearray(5), memoryview(b"x" * 5)):
        with pytest.raises(ValueError, match="bytes, over the limit of 4"):
            check_message(over, 4)
    ints = memoryview(array.array("i", [1, 2]))  # nbytes, not items
    with pytest.raises(ValueError, match="is 8 bytes"):
        check_message(ints, 4)
    with pytest.raises(ValueError, match="must encode to UTF-8"):
        check_message("\ud800", 10)  # a lone surrogate: no text frame can carry it


def test_since_is_none_or_a_tuple_of_an_epoch_and_an_offset() -> None:
    assert check_since(None) is None
    assert check_since(("e", 0)) == ("e", 0)
    assert check_since(("e", 10**20)) == ("e", 10**20)
    for wrong in (
        ["e", 1],
        ("e",),
        ("e", 1, 2),
        "e1",
        ("e", "1"),
        ("e", 1.0),
        ("e", True),
        (1, 1),
        (None, 1),
    ):
        with pytest.raises(TypeError):
            check_since(wrong)
    with pytest.raises(ValueError, match=">= 0, got -1"):
        check_since(("e", -1))


# The subscriber's cursor.


def deliveries(actions: list[Action]) -> list[tuple[str, int, Message]]:
    return [(a.epoch, a.offset, a.message) for a in actions if isinstance(a, Deliver)]


def test_a_cursor_delivers_what_was_recovered_then_the_live_messages_in_order() -> None:
    cursor = Cursor()
    assert cursor.state is CursorState.STARTING
    assert cursor.start(Recovery("e", 5, True, ((4, "m4"), (5, "m5")))) == [
        Deliver("e", 4, "m4"),
        Deliver("e", 5, "m5"),
    ]
    assert (cursor.state, cursor.epoch, cursor.offset) == (CursorState.LIVE, "e", 5)
    assert cursor.received("e", 6, "m6") == [Deliver("e", 6, "m6")]
    assert cursor.received("e", 6, "m6") == []  # a duplicate
    assert cursor.received("e", 2, "m2") == []
    assert cursor.received("e", 7, b"m7") == [Deliver("e", 7, b"m7")]
    assert (cursor.offset, cursor.skipped) == (7, 2)


def test_a_cursor_holds_the_live_messages_until_its_start_and_drops_what_it_covers() -> None:
    cursor = Cursor()
    for item in [("old", 9, "stale"), ("e", 3, "m3"), ("e", 4, "m4"), ("e", 5, "m5")]:
        assert cursor.received(*item) == []
    assert len(cursor.held) == 4
    actions = cursor.start(Recovery("e", 4, False))  # since=None at offset 4
    assert actions == [Deliver("e", 5, "m5")]
    assert (cursor.skipped, cursor.stale, cursor.held) == (2, 1, [])


def test_a_gap_fetches_the_missing_messages_and_delivers_them_before_the_held_ones() -> None:
    cursor = Cursor()
    cursor.start(Recovery("e", 1, False))
    assert cursor.received("e", 4, "m4") == [Fetch("e", 1)]
    assert cursor.state is CursorState.FILLING
    assert cursor.received("e", 5, "m5") == []  # held, no second fetch
    assert cursor.received("e", 3, "m3") == []
    actions = cursor.filled(Recovery("e", 4, True, ((2, "m2"), (3, "m3"), (4, "m4"))))
    assert deliveries(actions) == [("e", 2, "m2"), ("e", 3, "m3"), ("e", 4, "m4"), ("e", 5, "m5")]
    assert (cursor.state, cursor.offset, cursor.skipped) == (CursorState.LIVE, 5, 2)


def test_a_gap_the_history_cannot_fill_is_missed_and_delivery_goes_on_from_the_topic() -> None:
    cursor = Cursor()
    cursor.start(Recovery("e", 1, False))
    assert cursor.received("e", 5, "m5") == [Fetch("e", 1)]
    cursor.received("e", 7, "m7")
    assert cursor.filled(Recovery("e", 6, False)) == [
        Missed(Position("e", 1), Position("e", 6)),
        Deliver("e", 7, "m7"),
    ]
    assert (cursor.offset, cursor.skipped) == (7, 1)


def test_a_fill_answered_in_a_new_epoch_is_missed_and_goes_on_in_that_epoch() -> None:
    cursor = Cursor()
    cursor.start(Recovery("e1", 1, False))
    cursor.received("e1", 3, "m3")
    cursor.received("e2", 1, "n1")
    assert cursor.filled(Recovery("e2", 0, False)) == [
        Missed(Position("e1", 1), Position("e2", 0)),
        Deliver("e2", 1, "n1"),
    ]
    assert cursor.received("e1", 4, "late") == []
    assert (cursor.epoch, cursor.offset, cursor.stale) == ("e2", 1, 2)


def test_an_epoch_change_delivers_the_new_epoch_from_1_and_drops_the_old_ones_late() -> None:
    cursor = Cursor()
    cursor.start(Recovery("e1", 8, False))
    assert cursor.received("e2", 1, "n1") == [
        NewEpoch(Position("e1", 8), "e2"),
        Deliver("e2", 1, "n1"),
    ]
    assert cursor.received("e1", 9, "late") == []
    assert cursor.received("e2", 2, "n2") == [Deliver("e2", 2, "n2")]
    assert (cursor.stale, cursor.previous) == (1, "e1")


def test_an_epoch_change_that_missed_the_first_messages_fetches_them() -> None:
    cursor = Cursor()
    cursor.start(Recovery("e1", 8, False))
    assert cursor.received("e2", 3, "n3") == [NewEpoch(Position("e1", 8), "e2"), Fetch("e2", 0)]
    actions = cursor.filled(Recovery("e2", 3, True, ((1, "n1"), (2, "n2"), (3, "n3"))))
    assert deliveries(actions) == [("e2", 1, "n1"), ("e2", 2, "n2"), ("e2", 3, "n3")]


def test_a_position_heard_after_a_cut_fetches_what_was_published_meanwhile() -> None:
    """A worker reconnected to the hub hears each topic's position again (wsfleet/pubsub.py)."""
    cursor = Cursor()
    cursor.start(Recovery("e1", 4, False))
    assert cursor.heard(Position("e1", 4)) == []  # nothing was published meanwhile
    assert cursor.heard(Position("e1", 6)) == [Fetch("e1", 4)]
    assert cursor.state is CursorState.FILLING
    actions = cursor.filled(Recovery("e1", 6, True, ((5, "m5"), (6, "m6"))))
    assert deliveries(actions) == [("e1", 5, "m5"), ("e1", 6, "m6")]


def test_a_position_heard_in_a_new_epoch_says_so_and_fetches_it_from_the_first() -> None:
    """The hub was replaced: its topics have new epochs (and maybe messages already)."""
    cursor = Cursor()
    cursor.start(Recovery("e1", 4, False))
    assert cursor.heard(Position("e2", 0)) == [NewEpoch(Position("e1", 4), "e2")]
    assert cursor.received("e2", 1, "n1") == [Deliver("e2", 1, "n1")]
    other = Cursor()
    other.start(Recovery("e1", 4, False))
    assert other.heard(Position("e2", 2)) == [NewEpoch(Position("e1", 4), "e2"), Fetch("e2", 0)]
    assert other.heard(Position("e1", 9)) == []  # (an answer about the epoch it left: stale)


def test_a_position_heard_while_starting_or_filling_waits_for_the_answer() -> None:
    cursor = Cursor()
    assert cursor.heard(Position("e1", 3)) == []
    cursor.start(Recovery("e1", 1, False))
    cursor.received("e1", 3, "m3")  # a gap: filling
    assert cursor.heard(Position("e1", 5)) == []


def test_a_cursor_is_told_its_answers_in_its_states_only() -> None:
    cursor = Cursor()
    with pytest.raises(RuntimeError, match="filled\\(\\) of a cursor that is starting"):
        cursor.filled(Recovery("e", 0, True))
    cursor.start(Recovery("e", 0, False))
    with pytest.raises(RuntimeError, match="start\\(\\) of a cursor that is live"):
        cursor.start(Recovery("e", 0, False))


# Randomized: publishes, subscriptions, links that repeat, delay, reorder and lose.


@dataclass
class Client:
    """A client and its subscription's cursor (None while it is away); it comes back with
    the last position it saw, as a client closed by a reload does."""

    topic: str
    cursor: Cursor | None = None
    link: list[tuple[str, object]] = field(default_factory=list)  # what its worker receives
    seen: Position | None = None  # the last message it was given
    expected: Position | None = None  # the only one it may be given next
    not_recovered: int = 0  # resumptions from a position that were not recovered
    missed: int = 0


def simulate(seed: int, lossy: bool) -> int:
    """Publishes, clients leaving and coming back, links delivering late, a hub replaced now
    and then (its histories lost), and (lossy) links that repeat, swap and lose messages;
    every delivery is checked to be the one that follows, exactly. Returns the number of
    deliveries."""
    rng = random.Random(seed)
    made = epochs()
    history_size, history_ttl = rng.choice([0, 2, 8, 1000]), rng.choice([1.0, float("inf")])
    max_idle_topics = rng.choice([1, 3, 100])
    topics = Topics(
        history_size=history_size,
        history_ttl=history_ttl,
        max_idle_topics=max_idle_topics,
        epochs=made,
    )
    names = [f"t{i}" for i in range(rng.randint(1, 3))]
    published: dict[str, list[tuple[Position, Message]]] = {name: [] for name in names}
    log: dict[Position, Message] = {}  # (epochs are unique across topics and stores)
    clients = [Client(rng.choice(names)) for _ in range(rng.randint(1, 6))]
    now, replaced, delivered = 0.0, False, 0

    def act(client: Client, actions: list[Action]) -> None:
        nonlocal delivered
        for action in actions:
            if isinstance(action, Deliver):
                position = Position(action.epoch, action.offset)
                assert position == client.expected, (seed, client, position)
                assert log[position] == action.message
                client.seen = position
                client.expected = Position(action.epoch, action.offset + 1)
                delivered += 1
            elif isinstance(action, Fetch):  # the history answers after what is on its way
                answer = topics.since(client.topic, action.epoch, action.offset, now)
                client.link.append(("filled", answer))
            elif isinstance(action, Missed):
                assert action.after == (client.expected.epoch, client.expected.offset - 1)
                client.missed += 1
                client.expected = Position(action.resume.epoch, action.resume.offset + 1)
            else:
                client.expected = Position(action.epoch, 1)

    def take(client: Client) -> None:
        assert client.cursor is not None
        kind, item = client.link.pop(0)
        if kind == "live":
            epoch, offset, message = item
            act(client, client.cursor.received(epoch, offset, message))
        elif kind == "start":
            assert isinstance(item, Recovery)
            if not item.recovered:
                client.not_recovered += client.seen is not None
                client.expected = Position(item.epoch, item.offset + 1)
            act(client, client.cursor.start(item))
        else:
            assert isinstance(item, Recovery)
            act(client, client.cursor.filled(item))

    for _ in range(400):
        now += rng.random() * 0.2
        roll = rng.random()
        if roll < 0.3:
            topic = rng.choice(names)
            message: Message = rng.choice([f"{rng.random()}", rng.randbytes(3)])
            position = topics.publish(topic, message, now)
            published[topic].append((position, message))
            log[position] = message
            for client in clients:
                if client.cursor and client.topic == topic:
                    for _ in range(rng.choice([0, 1, 1, 1, 1, 2]) if lossy else 1):
                        client.link.append(("live", (*position, message)))
        elif roll < 0.75:  # a worker takes what arrived for one client
            client = rng.choice(clients)
            if client.cursor and client.link:
                if lossy and len(client.link) > 1 and rng.random() < 0.2:
                    client.link[0], client.link[1] = client.link[1], client.link[0]
                take(client)
        elif roll < 0.9:  # a client leaves (a reload's 1012), or comes back
            client = rng.choice(clients)
            if client.cursor:
                topics.unsubscribe(client.topic)
                client.cursor, client.link = None, []
                continue
            client.cursor = Cursor()
            # The worker may still be receiving the topic's earlier messages (for others).
            earlier = published[client.topic]
            for _ in range(rng.randint(0, 2) if earlier else 0):
                position, message = rng.choice(earlier)
                client.link.append(("live", (*position, message)))
            since = client.seen if rng.random() < 0.9 else None
            client.seen = since
            client.expected = None if since is None else Position(since.epoch, since.offset + 1)
            client.link.append(("start", topics.subscribe(client.topic, since, now)))
        elif roll < 0.91:  # the hub is replaced: every history is lost
            topics = Topics(
                history_size=history_size,
                history_ttl=history_ttl,
                max_idle_topics=max_idle_topics,
                epochs=made,
            )
            for client in clients:
                if client.cursor:
                    topics.subscribe(client.topic, None, now)
            replaced = True
    for client in clients:  # what is on its way arrives
        for _ in range(10_000):  # (a cursor that kept fetching would fail here, not hang)
            if not (client.cursor and client.link):
                break
            take(client)
        assert not (client.cursor and client.link), (seed, client)
        if not lossy and client.cursor:  # a reliable link: it has every message
            assert client.cursor.state is CursorState.LIVE
            epoch, last = topics.position(client.topic)
            if last:  # (a new epoch with no message yet: the client has not seen it)
                assert client.expected == (epoch, last + 1), (seed, client)
            assert client.missed == 0
        everything_kept = history_size == 1000 and history_ttl == float("inf")
        if not lossy and not replaced and everything_kept and max_idle_topics >= len(names):
            assert client.not_recovered == 0, (seed, client)
    return delivered


@pytest.mark.parametrize("lossy", [False, True], ids=["reliable", "lossy"])
def test_randomized_every_subscriber_gets_each_message_once_in_order(lossy: bool) -> None:
    assert sum(simulate(seed, lossy) for seed in range(100)) > 2000  # (they deliver)
