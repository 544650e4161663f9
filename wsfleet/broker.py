"""The broker: a fleet's topics in Redis (--broker), so that every host's hub shares them.

Without a broker, a host's hub sequences its topics itself (wsfleet/topics.py). With one, the
hub is a client of Redis: offsets, epochs and histories live there, the same for every master
that names it, and the hub relays to its workers what Redis sends. The workers do not change:
they speak to their hub as before, and their cursors close any gap from the history.

How the data sits in Redis (docs/pubsub.md explains the choice, measured against Streams
alone), per topic, under the prefix ``wsfleet:``:

- ``wsfleet:t:TOPIC``, a hash: ``e`` the epoch, ``o`` the last offset. Made with a new epoch
  when missing: by the first publish or question after Redis lost its data (or the topic
  went unused for :data:`META_TTL`), so that offsets never restart in an epoch.
- ``wsfleet:h:TOPIC``, a stream: the history, entry ``OFFSET-0`` = the message and the
  time Redis added it; bounded by --history-size (exact MAXLEN) and by --history-ttl (the
  age of its first needed entry is checked on reading; the whole key expires once the topic
  is quiet that long).
- ``wsfleet:m:TOPIC``, a PUB/SUB channel: each message as ``OFFSET EPOCH PAYLOAD``, published
  by the same Lua script that sequences and stores it, so the channel's order is the offsets'.

A hub subscribes to the channels of the topics its workers listen to. After a reconnect it
reads where each of them stands and tells its workers (the POSITION frame): their cursors
fetch what was missed from the stream, or hear the new epoch if Redis lost its data.

Redis unreachable: publishes wait for it at most --broker-timeout, then raise
:class:`~wsfleet.topics.BrokerUnavailable`; questions (a subscription's start, a cursor's
gap) wait until it returns, bounded by the workers; the hub logs the condition at most once
every :data:`LOG_INTERVAL` seconds and reports it (the status's ``broker``). Commands go out
in batches, one pipeline at a time on one connection: Redis runs them in arrival order, and
a burst of publishes costs one round trip.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Config, redact
from .topics import BrokerUnavailable, Position, Recovery, new_epoch

log = logging.getLogger("wsfleet.broker")

PREFIX = "wsfleet:"
META_TTL = 30 * 86400  # seconds a topic's epoch and offset outlive its last use
LOG_INTERVAL = 10.0  # seconds between two log lines of one unavailability
RETRY = (0.05, 1.0)  # first and longest wait between attempts to reach Redis
PING_INTERVAL = 1.0  # seconds without a command before the hub PINGs Redis
BATCH = 512  # commands in one pipeline at most

# Both scripts begin with the topic's epoch, made (with an empty history) when its hash is
# missing: KEYS[1] the hash, KEYS[2] the stream; ARGV[1] a new epoch, ARGV[5] the hash's age.
_PRELUDE = """
local function now_ms()
  local now = redis.call('TIME')
  return now[1] * 1000 + math.floor(now[2] / 1000)
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('DEL', KEYS[2])
end
"""

# KEYS: the topic's hash, stream, channel. ARGV: a new epoch, the payload, the history's
# size, its age (ms; 0: none), the hash's age (ms). {epoch, offset}.
PUBLISH = (
    _PRELUDE
    + """
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'm', ARGV[2], 't', now_ms())
  if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
end
redis.call('PUBLISH', KEYS[3], offset .. ' ' .. epoch .. ' ' .. ARGV[2])
return {epoch, offset}
"""
)

# KEYS: the topic's hash and stream. ARGV: a new epoch, the epoch and offset asked after
# (an empty epoch: the position only), the history's age (ms; 0: none), the hash's age (ms).
# {epoch, last offset, 1 if recovered, the messages after the offset...}.
SINCE = (
    _PRELUDE
    + """
local last = tonumber(redis.call('HGET', KEYS[1], 'o'))
local since = tonumber(ARGV[3])
if epoch ~= ARGV[2] or since > last then return {epoch, last, 0} end
if since == last then return {epoch, last, 1} end
local first = (since + 1) .. '-0'
local entries = redis.call('XRANGE', KEYS[2], first, '+')
if #entries == 0 or entries[1][1] ~= first then return {epoch, last, 0} end
local ttl = tonumber(ARGV[4])
if ttl > 0 and tonumber(entries[1][2][4]) <= now_ms() - ttl then return {epoch, last, 0} end
local answer = {epoch, last, 1}
for i = 1, #entries do answer[i + 3] = entries[i][2][2] end
return answer
"""
)


def keys(topic: str) -> tuple[str, str, str]:
    """The topic's hash, stream and channel."""
    return f"{PREFIX}t:{topic}", f"{PREFIX}h:{topic}", f"{PREFIX}m:{topic}"


def read_password(path: str) -> str:
    """--broker-password-file's content without surrounding whitespace (OSError, ValueError
    for an empty file)."""
    with open(path, encoding="utf-8") as file:
        password = file.read().strip()
    if not password:
        raise ValueError(f"--broker-password-file {path}: the file is empty")
    return password


def password(config: Config) -> str | None:
    """The broker's password from --broker-password-file, if given (read before a hub drops
    privileges: the file may be root's); None: the URL's, if any."""
    path = config.broker_password_file
    return read_password(path) if path else None


def attach(
    config: Config,
    deliver: Callable[[str, str, int, bytes], None],
    heard: Callable[[str, Position], None],
    password: str | None,
) -> Broker:
    """The broker of ``config`` (--broker, set), started, for a hub (``hub.deliver``,
    ``hub.heard``): in its event loop."""
    assert config.broker is not None
    broker = Broker(
        config.broker,
        password,
        config.broker_timeout,
        config.history_size,
        config.history_ttl,
        deliver,
        heard,
    )
    broker.start()
    return broker


@dataclass(eq=False)
class _Command:
    script: int  # 0: PUBLISH, 1: SINCE
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    sent: bool = False  # written to Redis (a publish's fate is then unknown until answered)


@dataclass
class State:
    """The broker as the status shows it: ``connected`` or ``unavailable``, since when
    (UNIX time), and why (the last error, for the log)."""

    state: str = "connecting"
    since: float = field(default_factory=time.time)
    reason: str = ""
    logged: float = 0.0  # (monotonic) the last log line of this unavailability
    failed: int = 0  # publishes that raised BrokerUnavailable (refused, or no answer in time)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "since": round(self.since, 3), "failed": self.failed}


class Broker:
    """One hub's client of Redis: a connection for commands, one for the channels."""

    def __init__(
        self,
        url: str,
        password: str | None,
        timeout: float,
        history_size: int,
        history_ttl: float,
        deliver: Callable[[str, str, int, bytes], None],
        heard: Callable[[str, Position], None],
    ) -> None:
        self.shown = redact(url)
        self.timeout = timeout
        self.history_size = history_size
        self.history_ms = 0 if history_size == 0 else round(history_ttl * 1000)
        if history_ttl == 0:
            self.history_size = 0
        self.meta_ms = max(META_TTL * 1000, self.history_ms)
        self.deliver = deliver
        self.heard = heard
        # (redis-py is imported here, not with the module: wsfleet imports without [redis])
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            # No retry inside redis-py: a publish sent again could be sequenced twice; this
            # module reconnects, and fails what it cannot know was done.
            "retry": Retry(NoBackoff(), 0),
        }
        if password is not None:
            options["password"] = password
        self.client = redis.Redis.from_url(url, **options)
        self.status = State()
        self.shas: list[str] = []
        self.connection: Any = None  # the commands' (redis.asyncio.Connection)
        self.queue: collections.deque[_Command] = collections.deque()
        self.work = asyncio.Event()
        self.watched: dict[str, asyncio.Future[None]] = {}  # topic: its channel confirmed
        self.channels: dict[bytes, str] = {}
        self.pubsub: Any = None
        self.listener: asyncio.Task[None] | None = None
        self.listened = 0.0  # (UNIX time) when the channels' connection last subscribed
        self.listening = asyncio.Event()  # set while a topic is watched
        self.tasks: list[asyncio.Task[None]] = []
        self.published = 0

    def start(self) -> None:
        self.work.set()  # (connect now: the status says at once whether Redis answers)
        self.listener = asyncio.ensure_future(self._listen())
        self.tasks = [asyncio.ensure_future(self._run_commands()), self.listener]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # What the hub asks

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[Position]:
        """Sequence ``payload`` on ``topic``, queued now (so in the order of the calls): the
        future is its position, or fails with BrokerUnavailable after --broker-timeout (the
        publish is dropped if not sent yet; if it was, Redis may still sequence it)."""
        args = (new_epoch(), payload, self.history_size, self.history_ms, self.meta_ms)
        command = self._queue(0, keys(topic), args)
        future: asyncio.Future[Position] = command.future
        deadline = future.get_loop().call_later(self.timeout, self._expire, command)
        future.add_done_callback(lambda _: deadline.cancel())
        return future

    def since(self, topic: str, epoch: str, offset: int) -> asyncio.Future[Recovery]:
        """What a subscriber at ``(epoch, offset)`` missed (epoch "": the position only),
        once the topic's channel is confirmed if it is being watched. No deadline: the
        worker that asks bounds its wait."""
        args = (new_epoch(), epoch, offset, self.history_ms, self.meta_ms)
        return self._queue(1, keys(topic)[:2], args).future

    def _expire(self, command: _Command) -> None:
        if command.future.done():
            return
        reason = f" ({self.status.reason})" if self.status.reason else ""
        fate = "it was sent, and may still be published" if command.sent else "not published"
        self._fail(
            command,
            f"the broker {self.shown} did not answer within {self.timeout:g} s{reason}: {fate}",
        )

    def _fail(self, command: _Command, reason: str) -> None:
        """A publish that raises BrokerUnavailable (counted: the status's ``failed``)."""
        self.status.failed += 1
        command.future.set_exception(BrokerUnavailable(reason))

    def watch(self, topic: str) -> asyncio.Future[None]:
        """Receive the topic's messages (:attr:`deliver`); done once its channel is
        confirmed. Questions about it (:meth:`since`) wait for that, so that an answer
        misses nothing the channel does not bring."""
        confirmed = self.watched.get(topic)
        if confirmed is None:
            confirmed = self.watched[topic] = asyncio.get_running_loop().create_future()
            channel = keys(topic)[2].encode()
            self.channels[channel] = topic
            if self.pubsub is not None:
                self._spawn(self.pubsub.subscribe(channel))
            self.listening.set()
        return confirmed

    def unwatch(self, topic: str) -> None:
        confirmed = self.watched.pop(topic, None)
        if confirmed is None:
            return
        confirmed.cancel()
        channel = keys(topic)[2].encode()
        del self.channels[channel]
        if self.pubsub is not None:
            self._spawn(self.pubsub.unsubscribe(channel))

    # The connections

    def _queue(self, script: int, keys: tuple[str, ...], args: tuple[Any, ...]) -> _Command:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        command = _Command(script, keys, args, future)
        self.queue.append(command)
        self.work.set()
        return command

    async def _run_commands(self) -> None:
        """Send what is queued, a batch at a time, on one connection; idle, PING every
        :data:`PING_INTERVAL` (so that the status says when Redis goes away, even with no
        traffic); while Redis is unreachable, try again every RETRY (connecting is the
        probe). A publish that was not sent waits for Redis (up to its caller's timeout)."""
        from redis.exceptions import ConnectionError, RedisError

        retry = RETRY[0]
        while True:
            if not self.work.is_set():  # (busy: no wait at all)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PING_INTERVAL):
                        await self.work.wait()
            self.work.clear()
            try:
                if self.connection is None:
                    await self._connect()
                if not self.shas:
                    await self._load()
                # Closed by Redis while idle (a restart): seen here, nothing was sent yet.
                if await _can_read(self.connection):
                    raise ConnectionError("Redis closed the connection")
                batch = self._batch()
                if batch:
                    await self._send(batch)
                    if self.queue:
                        self.work.set()
                else:
                    await self.connection.send_command("PING")
                    await self.connection.read_response()
                retry = RETRY[0]
            except Exception as exc:  # (a bug too: logged, and the loop goes on)
                if not isinstance(exc, RedisError | OSError):
                    log.exception("the broker's command loop failed: reconnecting")
                await self._disconnect()
                self._down(exc)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY[1])
                self.work.set()

    async def _connect(self) -> None:
        """The commands' connection (redis-py says AUTH and SELECT)."""
        pool = self.client.connection_pool
        self.connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        self.shas = []

    async def _load(self) -> None:
        """The scripts, loaded (again after a reconnect, or a SCRIPT FLUSH)."""
        shas = []
        for script in (PUBLISH, SINCE):
            await self.connection.send_command("SCRIPT", "LOAD", script)
            shas.append((await self.connection.read_response()).decode())
        self.shas = shas
        self._up()

    async def _disconnect(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()
            with contextlib.suppress(Exception):
                await self.client.connection_pool.release(connection)

    def _batch(self) -> list[_Command]:
        """The next commands to send, in order; a question about a topic whose channel is
        not confirmed yet stays queued (the confirmation sets work again)."""
        batch: list[_Command] = []
        waiting: list[_Command] = []
        queue = self.queue
        while queue and len(batch) < BATCH:
            command = queue.popleft()
            if command.future.done():  # (a publish that timed out, a question no one awaits)
                continue
            if command.script == 1 and not self._confirmed(command.keys[0]):
                waiting.append(command)
            else:
                batch.append(command)
        queue.extendleft(reversed(waiting))
        return batch

    def _confirmed(self, key: str) -> bool:
        confirmed = self.watched.get(key[len(PREFIX) + 2 :])
        return confirmed is None or confirmed.done()

    async def _send(self, batch: list[_Command]) -> None:
        from redis.exceptions import RedisError, ResponseError

        connection = self.connection
        assert connection is not None
        packed = connection.pack_commands(
            ("EVALSHA", self.shas[c.script], len(c.keys), *c.keys, *c.args) for c in batch
        )
        results: list[Any] = []
        for command in batch:
            command.sent = True
        try:
            await connection.send_packed_command(packed, check_health=False)
            for _ in batch:
                try:
                    results.append(await connection.read_response())
                except ResponseError as exc:  # (this command's: the next ones follow)
                    results.append(exc)
        except (RedisError, OSError) as exc:
            # Sent, and the answer lost: questions are asked again; publishes fail, since
            # Redis may have sequenced them (sending one again could sequence it twice).
            for command in reversed(batch[len(results) :]):
                if command.script == 1:
                    self.queue.appendleft(command)
                elif not command.future.done():
                    self._fail(
                        command,
                        f"the broker {self.shown} failed while publishing ({_reason(exc)}): "
                        "the message may or may not have been published",
                    )
            batch = batch[: len(results)]
            self._settle(batch, results)
            raise
        self._settle(batch, results)

    def _settle(self, batch: list[_Command], results: list[Any]) -> None:
        from redis.exceptions import NoScriptError, ResponseError

        again: list[_Command] = []
        for command, result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):  # (SCRIPT FLUSH: not run)
                again.append(command)
            elif command.future.done():
                continue
            elif isinstance(result, ResponseError):
                if command.script == 0:
                    self._fail(command, f"the broker {self.shown} refused: {result}")
                else:
                    command.future.set_exception(
                        BrokerUnavailable(f"the broker {self.shown} refused: {result}")
                    )
            elif command.script == 0:
                self.published += 1
                command.future.set_result(Position(result[0].decode(), int(result[1])))
            else:
                messages = tuple(
                    (int(result[1]) - len(result) + 3 + i, data)
                    for i, data in enumerate(result[3:], start=1)
                )
                command.future.set_result(
                    Recovery(result[0].decode(), int(result[1]), bool(result[2]), messages)
                )
        if again:  # (loaded again before the next batch)
            self.queue.extendleft(reversed(again))
            self.shas = []

    async def _listen(self) -> None:
        """The channels' connection: (re)subscribe, then relay; after a reconnect, where each
        topic stands goes to the workers, whose cursors fetch what they missed."""
        from redis.exceptions import RedisError

        retry = RETRY[0]
        while True:
            await self.listening.wait()
            if not self.channels:
                self.listening.clear()
                continue
            pubsub = self.client.pubsub()
            try:
                await self._subscribe_all(pubsub)
                retry = RETRY[0]
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None:
                        self._on_message(message)
            except Exception as exc:  # (a bug too: logged, and the loop goes on)
                if not isinstance(exc, RedisError | OSError):
                    log.exception("the broker's channels failed: subscribing again")
                self._down(exc)
            finally:
                self.pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(retry)
            retry = min(retry * 2, RETRY[1])

    async def _subscribe_all(self, pubsub: Any) -> None:
        """Subscribe to every watched channel; once each is confirmed, ask where its topic
        stands (the answers go to the workers: :attr:`heard`)."""
        channels = list(self.channels)
        await pubsub.subscribe(*channels)
        waiting = set(channels)
        while waiting:
            message = await pubsub.get_message(timeout=self.timeout)
            if message is None:
                raise TimeoutError("no answer to SUBSCRIBE")
            if message["type"] == "subscribe":
                waiting.discard(message["channel"])
            else:
                self._on_message(message)
        self.pubsub = pubsub
        self.listened = time.time()
        self._up()
        for channel in channels:
            topic = self.channels.get(channel)
            if topic is not None:
                self._confirm(topic)
                self._spawn(self._tell(topic))
        # Watched meanwhile (not in the snapshot): subscribed now, confirmed as they come.
        known = set(channels)
        later = [channel for channel in self.channels if channel not in known]
        if later:
            await pubsub.subscribe(*later)

    async def _tell(self, topic: str) -> None:
        recovery = await self.since(topic, "", 0)
        if topic in self.watched:
            self.heard(topic, Position(recovery.epoch, recovery.offset))

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        topic = self.channels.get(message["channel"])
        if topic is None:
            return
        if kind == "subscribe":
            self._confirm(topic)
        elif kind == "message":
            offset, epoch, payload = message["data"].split(b" ", 2)
            self.deliver(topic, epoch.decode(), int(offset), payload)

    def _confirm(self, topic: str) -> None:
        confirmed = self.watched.get(topic)
        if confirmed is not None and not confirmed.done():
            confirmed.set_result(None)
            self.work.set()

    # The state

    def _up(self) -> None:
        status = self.status
        if status.state != "connected":
            if status.state == "unavailable":
                log.warning(
                    "the broker %s is back after %.1f s", self.shown, time.time() - status.since
                )
                if self.listened < status.since and self.listener is not None:
                    # Back for commands, and the channels' connection not renewed since the
                    # outage began: it may have died silently (a partition): a new one, and
                    # the workers hear where each topic stands.
                    self.listener.cancel()
                    self.tasks.remove(self.listener)
                    self.listener = asyncio.ensure_future(self._listen())
                    self.tasks.append(self.listener)
            else:
                log.info("the broker %s is connected", self.shown)
            self.status = State("connected", failed=status.failed)

    def _down(self, exc: BaseException) -> None:
        reason = _reason(exc)
        status, now = self.status, time.monotonic()
        if status.state != "unavailable":
            self.status = State("unavailable", reason=reason, logged=now, failed=status.failed)
            log.error(
                "the broker %s is unavailable (%s): the fleet serves on; publishes fail "
                "after %g s, subscribers resume once it returns",
                self.shown,
                reason,
                self.timeout,
            )
            return
        status.reason = reason
        if now - status.logged >= LOG_INTERVAL:
            status.logged = now
            log.error(
                "the broker %s is still unavailable (%s), for %.0f s",
                self.shown,
                reason,
                time.time() - status.since,
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self.tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("broker task: %s", task.exception())


def _can_read(connection: Any) -> Awaitable[bool]:
    """Whether Redis sent something unasked (or closed): ``can_read`` from redis-py 8 on,
    where ``can_read_destructive`` is deprecated and warns at every call (a warning that,
    with ``python -W error``, raised out of the command loop and stopped every publish)."""
    check = getattr(connection, "can_read", None) or connection.can_read_destructive
    result: Awaitable[bool] = check()
    return result


def _reason(exc: BaseException) -> str:
    """An error as one short phrase (redis-py's messages name the host, not the password)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
