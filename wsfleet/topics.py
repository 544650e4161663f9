"""Publish/subscribe's core: each topic's offsets, epoch and history, recovery after a
reconnect, and the order of delivery to a subscriber; plain code over plain data.

Protocol logic only, no I/O (as websockets' Sans-I/O layer, and wsfleet/proxy.py): no socket,
no event loop, no process, no clock read. Time is passed in (``now``: seconds on one monotonic
clock, ``time.monotonic()`` for the processes of one host), and so is the source of epochs.
What carries messages between the workers (a hub, in the master or a process of its own) and
a broker wrap these and do the I/O:

- :class:`Topics`, the sequencer's side: :meth:`Topics.publish` gives a message its offset,
  :meth:`Topics.since` answers a subscriber that resumes from an ``(epoch, offset)`` with a
  :class:`Recovery`, :meth:`Topics.subscribe` and :meth:`Topics.unsubscribe` keep a topic
  while someone listens to it.
- :class:`Cursor`, the subscriber's side: one subscription's place in its topic. Fed the live
  stream of ``(epoch, offset, message)`` and the answers from the history, it returns what to
  do as data (:class:`Deliver`, :class:`Fetch`, :class:`Missed`, :class:`NewEpoch`), so that
  each message is delivered once, in the topic's order, or the miss is said.
- :func:`check_topic`, :func:`check_message`, :func:`check_since`: the API's validation, which
  raises at once, before anything is published.

Offsets of a topic grow by one per message, from 1 in each epoch. An epoch is a random string,
made when the store first sees a topic (a publish, a subscription, a question), and again when
it sees the topic after forgetting it: a new store (a new master, a replaced hub) or a topic
forgotten under the topics' bound has new epochs, and a subscriber that names an old one is
told it was not recovered. History is bounded by a count (``history_size``, per topic) and an
age (``history_ttl``), evicted lazily with the ``now`` of each call; losing messages to these
bounds keeps the epoch (the offsets go on), since what remains is still the same sequence.
"""

from __future__ import annotations

import enum
import secrets
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

Message: TypeAlias = bytes | str
# Defaults for the store made without options (the options' defaults are the command line's).
HISTORY_SIZE = 100
HISTORY_TTL = 300.0
MAX_IDLE_TOPICS = 10_000
MAX_TOPIC_LENGTH = 256  # characters
COMPACT_AFTER = 16  # expired entries at a history's head before its lists are compacted


class BrokerUnavailable(Exception):
    """``wsfleet.publish()`` (or ``subscribe()``) could not reach the fleet's broker (Redis,
    --broker) within --broker-timeout. The fleet keeps serving; try again later. A publish
    that failed while Redis was answering it may still have been published."""


# Validation for the API: each raises at once with what is wrong and nothing is published.


def check_topic(topic: object) -> str:
    """The topic, if it is one: a str of 1 to 256 characters (TypeError, ValueError)."""
    if not isinstance(topic, str):
        hint = ": decode it" if isinstance(topic, bytes | bytearray | memoryview) else ""
        raise TypeError(f"a topic is a str, not {type(topic).__name__}{hint}")
    if not topic:
        raise ValueError("a topic is a non-empty str, got ''")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise ValueError(
            f"a topic is at most {MAX_TOPIC_LENGTH} characters, got {len(topic)}: {topic[:40]!r}..."
        )
    return topic


def check_message(message: object, max_size: int) -> Message:
    """The message as the store keeps it: a str as it is, bytes, bytearray and memoryview as
    bytes (a copy: what the caller changes later is not what was published). Another type:
    TypeError; over ``max_size`` bytes (a str measured UTF-8 encoded): ValueError."""
    if isinstance(message, str):
        if message.isascii():  # (a flag of the str: no encoding to measure it)
            size = len(message)
        else:
            try:
                size = len(message.encode())
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"a str message must encode to UTF-8: {exc.reason} at index {exc.start}"
                ) from None
    elif isinstance(message, bytes | bytearray):
        size = len(message)
    elif isinstance(message, memoryview):
        size = message.nbytes
    else:
        raise TypeError(
            f"a message is str or bytes (bytearray, memoryview), not {type(message).__name__}"
        )
    if size > max_size:
        raise ValueError(f"the message is {size} bytes, over the limit of {max_size} (max size)")
    return message if isinstance(message, str | bytes) else bytes(message)


def check_since(since: object) -> tuple[str, int] | None:
    """None, or ``(epoch, offset)``: a 2-tuple of a str and an int >= 0 (TypeError for the
    wrong shape or types, ValueError for a negative offset)."""
    if since is None:
        return None
    if not isinstance(since, tuple) or len(since) != 2:
        raise TypeError(
            f"since is None or a tuple (epoch, offset), not {type(since).__name__}"
            + (f" of {len(since)}" if isinstance(since, tuple) else "")
        )
    epoch, offset = since
    if not isinstance(epoch, str):
        raise TypeError(f"since's epoch is a str, not {type(epoch).__name__}")
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"since's offset is an int, not {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"since's offset is an int >= 0, got {offset}")
    return epoch, offset


def new_epoch() -> str:
    """A random epoch: 12 URL-safe characters (72 bits), so that a store's epochs are not
    another's (a client that names one of a former master's epochs is not recovered by
    mistake)."""
    return secrets.token_urlsafe(9)


class Position(NamedTuple):
    """Where a topic, or a subscriber, stands: an offset in an epoch (0: before the first)."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Recovery:
    """The store's answer to a subscriber starting (or filling a gap) after
    ``(since_epoch, since_offset)``.

    ``epoch`` and ``offset`` are the topic's position at the answer (its last offset, 0 before
    its first message): the subscription's ``epoch`` and ``offset``. ``recovered`` is True only
    when nothing was missed: same epoch, the offset not beyond the last, and the history still
    holds every message after it, which ``messages`` then are (``(offset, message)`` in order;
    none when the subscriber had seen the last). Otherwise ``messages`` is empty: only the live
    messages after ``offset`` follow.
    """

    epoch: str
    offset: int
    recovered: bool
    messages: tuple[tuple[int, Message], ...] = ()


@dataclass(frozen=True, slots=True)
class Stats:
    """A store's figures, for the metrics and the status."""

    topics: int  # topics the store knows (with a subscriber or not)
    subscribed: int  # of which with at least one subscriber
    held: int  # messages in the histories (some maybe expired, not yet evicted)
    published: int  # messages published since the store began
    forgotten: int  # topics forgotten under the bound of idle topics
    lost: int  # of which with messages still in their history


class _Topic:
    """One topic: its epoch, last offset, subscriber count and history.

    The history is two parallel sequences, the messages (a list) and their publication times
    (an array of doubles: 8 bytes each, not a float object's 24), with a head index: entries
    before it have expired (their slots hold b"", freeing the messages), and are deleted in one
    slice once they are half the list and COMPACT_AFTER or more: amortized O(1) per message,
    and a topic with no history costs two empty containers, not a 64-slot deque's 760 bytes.
    """

    __slots__ = ("epoch", "head", "last", "messages", "subscribers", "times")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.last = 0
        self.subscribers = 0
        self.messages: list[Message] = []
        self.times = array("d")
        self.head = 0

    def held(self) -> int:
        return len(self.messages) - self.head

    def append(self, message: Message, now: float) -> None:
        self.messages.append(message)
        self.times.append(now)

    def drop(self, count: int) -> None:
        """Forget the ``count`` oldest held messages."""
        messages, head = self.messages, self.head + count
        if head == len(messages):
            self.messages, self.times, self.head = [], array("d"), 0
            return
        for index in range(self.head, head):
            messages[index] = b""
        self.head = head
        if head >= COMPACT_AFTER and 2 * head >= len(messages):
            del messages[:head], self.times[:head]
            self.head = 0

    def expired(self, horizon: float) -> int:
        """How many of the oldest held messages were published at or before ``horizon``."""
        times, count, end = self.times, 0, len(self.times)
        index = self.head
        while index < end and times[index] <= horizon:
            index += 1
            count += 1
        return count

    def after(self, offset: int) -> tuple[tuple[int, Message], ...] | None:
        """The held messages after ``offset``, or None when the history no longer holds
        offset + 1 (or offset is beyond the last)."""
        if offset > self.last:
            return None
        start = self.head + offset - (self.last - self.held())  # index of offset + 1
        if start < self.head:
            return None
        return tuple(enumerate(self.messages[start:], offset + 1))


class Topics:
    """The sequencer's store: every topic's epoch, last offset and history.

    Memory is bounded: each topic's history by ``history_size`` messages and ``history_ttl``
    seconds, and the topics by ``max_idle_topics``: the most topics kept without a subscriber
    (those with one are always kept; their number follows the subscriptions). Past it the
    store forgets the idle topic used least recently (created, published to, asked about,
    subscribed to or left). Expired messages are evicted first, with the ``now`` each call
    brings, so the forgotten topic holds no message unless more than ``max_idle_topics`` idle
    topics were all used within the last ``history_ttl`` seconds: then its history is lost
    with it (counted in :attr:`Stats.lost`). A topic seen again after being forgotten starts
    anew: a new epoch, offsets from 1.

    ``now`` must not go back between calls (a monotonic clock): the histories are evicted in
    order of publication.
    """

    def __init__(
        self,
        *,
        history_size: int = HISTORY_SIZE,
        history_ttl: float = HISTORY_TTL,
        max_idle_topics: int = MAX_IDLE_TOPICS,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        if history_size < 0:
            raise ValueError(f"history_size is an int >= 0, got {history_size}")
        if not history_ttl >= 0:  # (NaN too)
            raise ValueError(f"history_ttl is >= 0 (inf: no age bound), got {history_ttl}")
        if max_idle_topics < 1:
            raise ValueError(f"max_idle_topics is an int >= 1, got {max_idle_topics}")
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.max_idle_topics = max_idle_topics
        self._epochs = epochs
        self._keeps = history_size > 0 and history_ttl > 0
        self._topics: dict[str, _Topic] = {}
        # Topics without a subscriber, least recently used first: the next to be forgotten.
        self._idle: OrderedDict[str, None] = OrderedDict()
        # Topics holding messages, least recently published first: the next to expire whole.
        self._holding: OrderedDict[str, None] = OrderedDict()
        self._held = 0
        self._published = 0
        self._forgotten = 0
        self._lost = 0

    def configure(self, history_size: int, history_ttl: float, max_idle_topics: int) -> None:
        """New bounds (an upgrade's new hub takes the old store with its own options)."""
        self.history_size, self.history_ttl = history_size, history_ttl
        self.max_idle_topics = max_idle_topics
        self._keeps = history_size > 0 and history_ttl > 0

    def publish(self, topic: str, message: Message, now: float) -> Position:
        """Sequence ``message`` on ``topic``: its ``(epoch, offset)``."""
        self._expire(now)
        state = self._topic(topic)
        state.last += 1
        self._published += 1
        if self._keeps:
            self._trim(topic, state, now)
            if state.held() == self.history_size:
                state.drop(1)
                self._held -= 1
            state.append(message, now)
            self._held += 1
            self._holding[topic] = None
            self._holding.move_to_end(topic)
        return Position(state.epoch, state.last)

    def since(self, topic: str, epoch: str, offset: int, now: float) -> Recovery:
        """What a subscriber that had ``(epoch, offset)`` missed, and whether it missed
        nothing: see :class:`Recovery`."""
        self._expire(now)
        state = self._topic(topic)
        self._trim(topic, state, now)
        missed = state.after(offset) if epoch == state.epoch else None
        if missed is None:
            return Recovery(state.epoch, state.last, False)
        return Recovery(state.epoch, state.last, True, missed)

    def position(self, topic: str) -> Position:
        """The topic's ``(epoch, last offset)``; a topic not seen before gets its epoch."""
        state = self._topic(topic)
        return Position(state.epoch, state.last)

    def subscribe(self, topic: str, since: tuple[str, int] | None, now: float) -> Recovery:
        """A subscriber starts (from ``since``, or from now with None: not recovered); the
        topic is kept until it leaves (:meth:`unsubscribe`)."""
        if since is None:
            self._expire(now)
            state = self._topic(topic)
            recovery = Recovery(state.epoch, state.last, False)
        else:
            recovery = self.since(topic, since[0], since[1], now)
            state = self._topics[topic]
        state.subscribers += 1
        if state.subscribers == 1:
            del self._idle[topic]
        return recovery

    def unsubscribe(self, topic: str) -> None:
        """A subscriber of ``topic`` left (one :meth:`subscribe` each)."""
        state = self._topics.get(topic)
        if state is None or not state.subscribers:
            raise ValueError(f"topic {topic!r} has no subscriber to leave")
        state.subscribers -= 1
        if not state.subscribers:
            self._idle[topic] = None
            self._bound()

    def subscribers(self, topic: str) -> int:
        state = self._topics.get(topic)
        return state.subscribers if state else 0

    def __contains__(self, topic: object) -> bool:
        return topic in self._topics

    def stats(self) -> Stats:
        return Stats(
            topics=len(self._topics),
            subscribed=len(self._topics) - len(self._idle),
            held=self._held,
            published=self._published,
            forgotten=self._forgotten,
            lost=self._lost,
        )

    def _topic(self, topic: str) -> _Topic:
        """The topic's state, made (with a new epoch) when it is not known."""
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _Topic(self._epochs())
            self._idle[topic] = None
            self._bound()
        elif not state.subscribers:
            self._idle.move_to_end(topic)
        return state

    def _bound(self) -> None:
        while len(self._idle) > self.max_idle_topics:
            topic, _ = self._idle.popitem(last=False)
            state = self._topics.pop(topic)
            self._forgotten += 1
            if state.held():
                self._lost += 1
                self._held -= state.held()
                del self._holding[topic]

    def _expire(self, now: float) -> None:
        """Empty the histories whose newest message has expired, oldest first: the rest
        expire message by message as their topic is used (:meth:`_trim`)."""
        horizon = now - self.history_ttl
        holding = self._holding
        while holding:
            topic = next(iter(holding))
            state = self._topics[topic]
            if state.times[-1] > horizon:
                break
            self._held -= state.held()
            state.drop(state.held())
            del holding[topic]

    def _trim(self, topic: str, state: _Topic, now: float) -> None:
        """Evict the topic's expired messages."""
        count = state.expired(now - self.history_ttl)
        if count:
            state.drop(count)
            self._held -= count
            if not state.held():
                del self._holding[topic]


# The subscriber's side.


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send this message to the subscriber (through the envelope, which sees this epoch)."""

    epoch: str
    offset: int
    message: Message


@dataclass(frozen=True, slots=True)
class Fetch:
    """A gap: ask the history for what follows ``(epoch, offset)`` (:meth:`Topics.since`) and
    give its answer to :meth:`Cursor.filled`; the live messages wait meanwhile."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Missed:
    """The history no longer held what followed ``after``: the subscriber missed messages
    (report it not recovered). Delivery goes on after ``resume``, the topic's position."""

    after: Position
    resume: Position


@dataclass(frozen=True, slots=True)
class NewEpoch:
    """The topic's history was lost (a new store, or a broker that lost its data): delivery
    goes on in ``epoch`` from offset 1; ``after`` is where the old epoch's delivery ended."""

    after: Position
    epoch: str


Action: TypeAlias = Deliver | Fetch | Missed | NewEpoch
Live: TypeAlias = tuple[str, int, Message]  # (epoch, offset, message) as it arrives


class CursorState(enum.Enum):
    STARTING = "starting"  # subscribed; waiting for the store's answer; live messages wait
    LIVE = "live"  # delivering each message as it arrives
    FILLING = "filling"  # a gap: waiting for the history's answer; live messages wait


class Cursor:
    """One subscription's place in its topic: each message delivered once, in order.

    Made STARTING when the subscription is asked for; the store's answer (a
    :class:`Recovery`, from :meth:`Topics.subscribe`) given to :meth:`start` delivers what it
    recovered and makes it LIVE. Each live message given to :meth:`received` then is, in the
    cursor's epoch:

    - the next offset: delivered;
    - at or before the last delivered: a duplicate, dropped (counted in ``skipped``, as are
      the messages a :class:`Missed` passes over);
    - further on: a gap. The cursor asks for the missing ones (:class:`Fetch`) and is FILLING,
      holding the live messages, until :meth:`filled` gives it the history's answer: the
      missing ones are delivered, or, if the history no longer holds them, :class:`Missed`
      says so and delivery goes on from the topic's position. Then the held messages are
      taken in order, as if they arrived then.

    In another epoch: the topic's history was lost and its offsets began anew. The cursor
    says :class:`NewEpoch` and delivers the new epoch from offset 1 (a gap if it missed its
    first). A message of the epoch it left, arriving late, is stale and dropped, as are
    messages of another epoch than the store's answer that arrived before it (the answer is
    the topic's position after them).

    The messages held while STARTING or FILLING are in ``held``: what wraps the cursor bounds
    them (a subscriber that waits too long is closed, and can resume from the history).
    """

    __slots__ = ("epoch", "held", "offset", "previous", "skipped", "stale", "state")

    def __init__(self) -> None:
        self.state = CursorState.STARTING
        self.epoch = ""  # ("" until the store's answer)
        self.offset = 0  # the last offset delivered (or where the subscription began)
        self.previous = ""  # the epoch left at the last epoch change
        self.held: list[Live] = []  # live messages waiting (STARTING, FILLING)
        self.skipped = 0  # live messages at or before the offset: duplicates, or passed over
        self.stale = 0  # live messages of an epoch left behind, dropped

    def start(self, recovery: Recovery) -> list[Action]:
        """The store's answer to the subscription: deliver what it recovered, then what
        arrived meanwhile and follows it."""
        if self.state is not CursorState.STARTING:
            raise RuntimeError(f"start() of a cursor that is {self.state.value}")
        actions: list[Action] = [
            Deliver(recovery.epoch, offset, message) for offset, message in recovery.messages
        ]
        self.state = CursorState.LIVE
        self.epoch, self.offset = recovery.epoch, recovery.offset
        self.held, held = [], self.held
        for item in held:
            if item[0] != self.epoch:
                self.stale += 1
            elif self.state is CursorState.LIVE:
                self._live(item[0], item[1], item[2], actions)
            else:
                self.held.append(item)
        return actions

    def received(self, epoch: str, offset: int, message: Message) -> list[Action]:
        """A live message of the topic."""
        if self.state is not CursorState.LIVE:
            self.held.append((epoch, offset, message))
            return []
        if epoch == self.epoch and offset == self.offset + 1:  # (the usual case, first)
            self.offset = offset
            return [Deliver(epoch, offset, message)]
        actions: list[Action] = []
        self._live(epoch, offset, message, actions)
        return actions

    def filled(self, recovery: Recovery) -> list[Action]:
        """The history's answer to :class:`Fetch`: deliver the missing messages (or say they
        were missed), then the live ones that waited."""
        if self.state is not CursorState.FILLING:
            raise RuntimeError(f"filled() of a cursor that is {self.state.value}")
        actions: list[Action] = []
        if recovery.recovered and recovery.epoch == self.epoch:
            for offset, message in recovery.messages:
                if offset == self.offset + 1:
                    self.offset = offset
                    actions.append(Deliver(self.epoch, offset, message))
        else:
            resume = Position(recovery.epoch, recovery.offset)
            actions.append(Missed(Position(self.epoch, self.offset), resume))
            if recovery.epoch != self.epoch:
                self.previous, self.epoch = self.epoch, recovery.epoch
            self.offset = recovery.offset
        self.state = CursorState.LIVE
        self.held, held = [], self.held
        for item in held:
            if self.state is CursorState.LIVE:
                self._live(item[0], item[1], item[2], actions)
            else:
                self.held.append(item)
        return actions

    def heard(self, position: Position) -> list[Action]:
        """The topic's position, heard again after the stream was cut (a reconnect to the
        hub): what was published meanwhile is fetched, and a new epoch (the store was
        replaced) is said, with its messages fetched from the first."""
        if self.state is not CursorState.LIVE:
            return []  # (the answer awaited, or the live messages held, come anyway)
        epoch, offset = position
        actions: list[Action] = []
        if epoch != self.epoch:
            if epoch == self.previous:
                return []
            actions.append(NewEpoch(Position(self.epoch, self.offset), epoch))
            self.previous, self.epoch, self.offset = self.epoch, epoch, 0
        if offset > self.offset:
            self.state = CursorState.FILLING
            actions.append(Fetch(self.epoch, self.offset))
        return actions

    def _live(self, epoch: str, offset: int, message: Message, actions: list[Action]) -> None:
        if epoch != self.epoch:
            if epoch == self.previous:
                self.stale += 1
                return
            actions.append(NewEpoch(Position(self.epoch, self.offset), epoch))
            self.previous, self.epoch, self.offset = self.epoch, epoch, 0
        if offset == self.offset + 1:
            self.offset = offset
            actions.append(Deliver(epoch, offset, message))
        elif offset <= self.offset:
            self.skipped += 1
        else:
            self.state = CursorState.FILLING
            self.held.append((epoch, offset, message))
            actions.append(Fetch(epoch, self.offset))
