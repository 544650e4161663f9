"""Configuration: every serving option defined once, merged from four sources.

Each option is a field of :class:`Config`; its metadata (help text, short flag, which commands
take it, how to read it) drives the command line, the TOML file and the environment alike, so
adding an option is one field here and nothing else.

Precedence, lowest first: default < TOML file (``--config``) < ``WSFLEET_*`` environment <
command line. Every value goes through the same parser, whichever source it came from, so a bad
value gets the same message naming where it came from (``--port``, ``WSFLEET_PORT``, or
``wsfleet.toml:3: port``).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

ENV_PREFIX = "WSFLEET_"
DRAIN_WINDOW = 10.0  # --drain-window's default (docs/restart.md measures why)
DRAIN_RATE = 250.0  # --drain-rate's default: closes per second per worker (docs/restart.md)
MEMORY_INTERVAL = 5.0  # seconds between two readings of the workers' USS (--max-worker-memory)
HURRY_CLOSE = 1.0  # how long a drain told to hurry waits for the clients' close answers
SERVE_COMMANDS = frozenset({"start", "worker"})


class ConfigError(Exception):
    """A bad option value, environment variable or config file (the CLI exits 2)."""


# Parsers take a value as it comes (a string from the command line or the environment, a
# native value from TOML) and return it typed, or raise ValueError with a message that says
# what was expected.


def _integer(lo: int | None = None, hi: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            number = value
        elif isinstance(value, str):
            try:
                number = int(value.strip(), 10)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        else:
            raise ValueError(f"expected an integer, got {value!r}")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"expected an integer {bounds}, got {number}")
        return number

    return parse


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    try:
        number = float(value) if isinstance(value, int | float | str) else float("nan")
    except ValueError:
        number = float("nan")
    if not number >= 0 or number == float("inf"):  # also rejects NaN
        raise ValueError(f"expected a non-negative number of seconds, got {value!r}")
    return number


def _positive_seconds(value: object) -> float:
    number = _seconds(value)
    if number == 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


def _positive_number(value: object) -> float:
    try:
        number = _seconds(value)
    except ValueError:
        number = 0.0
    if number == 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


def _mebibytes(value: object) -> int:
    """A whole number of MiB, 0 or more (0: off)."""
    try:
        return _integer(0)(value)
    except ValueError:
        raise ValueError(
            f"expected a whole number of MiB, 0 or more (such as 512; 0: off), got {value!r}"
        ) from None


def _list(value: object, what: str) -> tuple[str, ...]:
    """Items given comma-separated (command line, environment) or as a TOML list."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected a comma-separated list of {what}, got {value!r}")
    return tuple(item.strip() for item in items)


def _origins(value: object) -> tuple[str, ...]:
    """Origin values: scheme://host[:port] each."""
    origins = _list(value, "origins")
    for origin in origins:
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s,]+", origin):
            raise ValueError(
                f"expected origins such as 'https://example.com', got {origin!r} in {value!r}"
            )
    return origins


def _networks(value: object) -> tuple[str, ...]:
    """IP addresses or networks (CIDR), or * for any."""
    networks = _list(value, "IP addresses")
    for network in networks:
        if network != "*":
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"expected IP addresses or networks (or *), got {network!r} in {value!r}"
                ) from None
    return networks


@dataclasses.dataclass(frozen=True)
class Address:
    """One place to listen: a TCP host and port, or a Unix socket's path (``path`` set)."""

    host: str = ""
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, the last one a NUL


def parse_address(text: str) -> Address:
    """``HOST:PORT``, ``[V6ADDR]:PORT`` or ``unix:PATH``; ValueError says what is wrong."""
    expected = f"expected HOST:PORT, [V6ADDR]:PORT or unix:PATH, got {text!r}"
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path or "\0" in path:
            raise ValueError(f"{expected}: the path is empty")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(f"unix socket path longer than {UNIX_PATH_MAX} bytes: {path!r}")
        return Address(path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{expected}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{expected}: put an IPv6 address in brackets, as [::1]:8765")
    elif not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise ValueError(f"{expected}: {host!r} is not a host name or address")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{expected}: the port must be a number from 0 to 65535")
    return Address(host=host, port=int(port_text))


def _binds(value: object) -> tuple[str, ...]:
    """Addresses, each checked; repeated on the command line, comma-separated in the
    environment, a list in TOML."""
    binds = _list(value, "addresses")
    seen: set[Address] = set()
    for text in binds:
        address = parse_address(text)
        if address in seen:
            raise ValueError(f"{text} is given twice")
        seen.add(address)
    return binds


def _metrics_address(value: object) -> str | None:
    """HOST:PORT or [V6ADDR]:PORT for --metrics ('' for none)."""
    text = _text(value).strip()
    if text and parse_address(text).path is not None:
        raise ValueError(f"expected HOST:PORT or [V6ADDR]:PORT, got {value!r}")
    return text or None


BROKER_SCHEMES = ("redis", "rediss")


def redact(url: str) -> str:
    """A broker URL as it may be shown (logs, status, errors): without its user information,
    so that a password never appears."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _broker_url(value: object) -> str | None:
    """redis://[USER:PASSWORD@]HOST[:PORT][/DB] or rediss://... ('' for none); an error never
    repeats the password."""
    text = _text(value).strip()
    if not text:
        return None
    shown = redact(text)
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # (ValueError when not a number)
    except ValueError:
        raise ValueError(
            f"expected redis://[USER:PASSWORD@]HOST[:PORT][/DB], got {shown!r}"
        ) from None
    if parts.scheme not in BROKER_SCHEMES or not parts.hostname:
        raise ValueError(
            f"expected redis://[USER:PASSWORD@]HOST[:PORT][/DB] (rediss:// for TLS), got {shown!r}"
        )
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database is a number (redis://HOST:PORT/0), got {shown!r}")
    if port == 0:
        raise ValueError(f"expected a port from 1 to 65535, got {shown!r}")
    return text


def _admin_address(value: object) -> str | None:
    """HOST:PORT or [V6ADDR]:PORT for --admin, a bare PORT meaning 127.0.0.1:PORT (bound to
    the loopback unless told otherwise); '' for none."""
    text = _text(value).strip()
    if not text:
        return None
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    expected = f"expected PORT, HOST:PORT or [V6ADDR]:PORT, got {value!r}"
    try:
        address = parse_address(text)
    except ValueError as exc:  # (with what is wrong, when it says)
        raise ValueError(expected + str(exc).partition(f"got {text!r}")[2]) from None
    if address.path is not None:
        raise ValueError(expected)
    return text


def _umask(value: object) -> int:
    """An octal mode mask: 0o117, 0117 or 117 (a TOML integer such as 0o117 too)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an octal mask such as 0o117, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ValueError(f"expected an octal mask such as 0o117, got {value!r}")
        value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError(f"expected an octal mask from 0o000 to 0o777, got {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _text(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _app(value: object) -> str:
    text = _text(value).strip()
    module, sep, attr = text.partition(":")
    ident = r"[A-Za-z_]\w*"
    if not (
        sep
        and re.fullmatch(rf"{ident}(\.{ident})*", module)
        and re.fullmatch(rf"{ident}(\.{ident})*", attr)
    ):
        raise ValueError(f"expected MODULE:ATTR such as 'myapp:handler', got {value!r}")
    return text


def _health_path(value: object) -> str:
    text = _text(value).strip()
    if text and not text.startswith("/"):
        raise ValueError(f"expected a path starting with '/' (or '' to disable), got {value!r}")
    return text


def _optional_path(value: object) -> str | None:
    text = _text(value).strip()
    return text or None


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    parse: Callable[[object], Any],
    short: str | None = None,
    commands: frozenset[str] = SERVE_COMMANDS,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    shown: str | None = None,
) -> Any:
    """Declare an option: a dataclass field whose metadata the CLI, TOML and env readers use."""
    metadata = {
        "help": help,
        "parse": parse,
        "short": short,
        "commands": commands,
        "metavar": metavar,
        "shown": shown,  # the default as --help shows it, when repr would not do
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """The serving options of ``wsfleet start`` and ``wsfleet worker``.

    Each field's help text is what ``--help`` prints and what docs/options.md says
    (``scripts/gen-docs`` writes that page from these fields): say everything an operator
    needs there, once.
    """

    workers: int = option(
        help="number of workers the master keeps running",
        parse=_integer(1, 1024),
        short="-w",
        commands=frozenset({"start"}),
        metavar="N",
        default_factory=lambda: os.cpu_count() or 1,
        shown="the number of CPUs",
    )
    host: str = option("127.0.0.1", "address to listen on", parse=_text, metavar="HOST")
    port: int = option(
        8765,
        "port to listen on; 0 picks any free port, shared by all workers (the listening line "
        "names it)",
        parse=_integer(0, 65535),
        metavar="PORT",
    )
    bind: tuple[str, ...] = option(
        (),
        "listen on HOST:PORT, [V6ADDR]:PORT or unix:PATH instead of --host/--port; repeat it "
        "for more addresses (comma-separated in the environment, a list in TOML). Each TCP "
        "address gets one SO_REUSEPORT socket per worker; [::] is IPv6 only, so 0.0.0.0:P "
        "and [::]:P can both be bound. A Unix socket is one for the fleet (the kernel does "
        "not spread connections over Unix sockets), every worker accepts on it; a file left "
        "by a server that is gone is replaced, one a server answers on is exit 1; it is "
        "removed at exit. One listening line per address",
        parse=_binds,
        metavar="ADDR",
    )
    umask: int = option(
        0o117,
        "mask of the Unix sockets' file mode (0o117: read and write for the owner and the "
        "group, so a proxy in that group can connect); with --user/--group they own it",
        parse=_umask,
        metavar="MODE",
        shown="0o117",
    )
    fd: int | None = option(
        None,
        "serve on this inherited listening socket instead of binding host:port",
        parse=_integer(0),
        commands=frozenset({"worker"}),
        metavar="N",
    )
    app: str = option(
        "wsfleet.echo:echo",
        "connection handler, an 'async def handler(websocket)', as MODULE:ATTR; imported by "
        "each worker after fork (the module looked up from the current directory first), so "
        "a reload serves the code on disk then",
        parse=_app,
        metavar="MODULE:ATTR",
    )
    graceful_timeout: float = option(
        30.0,
        "seconds a draining worker may take to close its connections, counted from the end "
        "of its drain; then it aborts the rest, and the master kills it if it is still there "
        "--close-timeout + 1 s later",
        parse=_seconds,
        metavar="S",
    )
    drain_window: float = option(
        DRAIN_WINDOW,
        "the longest a drain (stop, reload, scale-down, upgrade) may take to send its closes: "
        "when --drain-rate would need longer, the closes are spread evenly over S seconds "
        "instead; the graceful timeout counts from the end of the closes; 0: all at once",
        parse=_seconds,
        metavar="S",
    )
    drain_rate: float = option(
        DRAIN_RATE,
        "connections a draining worker closes per second at most, in random order, so that "
        "clients do not all reconnect at once: a few close at once, 10,000 over 4 workers are "
        "spread over 10 s (bounded by --drain-window; docs/restart.md measures the default)",
        parse=_positive_number,
        metavar="N",
    )
    max_connection_age: float = option(
        0.0,
        "close a connection with 1012 (reason 'max connection age') this many seconds, plus "
        "or minus 10 percent at random, after it opened: long-lived connections move to new "
        "workers after a scale-up, and none lives forever; 0: never",
        parse=_seconds,
        metavar="S",
    )
    timeout: float = option(
        30.0,
        "seconds a worker's event loop may go without answering the master before it is "
        "killed and replaced; also the most a new worker may take to become ready",
        parse=_positive_seconds,
        commands=frozenset({"start"}),
        metavar="S",
    )
    start_seconds: float = option(
        1.0,
        "a worker that exits before it is ready, or within S seconds after, is crashing at "
        "start: only a run of such exits is restarted with a backoff (0.5 s doubling to 30 "
        "s); any other exit is replaced at once",
        parse=_seconds,
        commands=frozenset({"start"}),
        metavar="S",
    )
    max_worker_memory: int = option(
        0,
        "recycle a worker whose own memory passes MIB mebibytes: its USS (the pages only it "
        "holds, which its exit would free; not RSS, which counts the pages shared with the "
        f"master and the other workers), read from /proc every {MEMORY_INTERVAL:g} s. It is "
        "replaced like one slot of a reload: a new worker starts for its slot, then the old "
        "one stops accepting and closes its connections with 1012 over the drain; one slot at "
        "a time, none during a reload or an upgrade; counted as restarts for the reason "
        "memory; 0: off",
        parse=_mebibytes,
        commands=frozenset({"start"}),
        metavar="MIB",
    )
    certfile: str | None = option(
        None,
        "serve TLS (wss://, the listening line and the health path too) with this "
        "certificate chain (PEM). The master loads it and its workers inherit it; a HUP "
        "re-reads it, so rotating the files and reloading serves the new certificate, and "
        "files that do not load keep the old one (reload --wait says so). A missing, "
        "unreadable or mismatched file: exit 2 naming it",
        parse=_optional_path,
        metavar="FILE",
    )
    keyfile: str | None = option(
        None,
        "the private key of --certfile (PEM), unless that file holds it",
        parse=_optional_path,
        metavar="FILE",
    )
    user: str | None = option(
        None,
        "workers switch to this user (name or uid) once the sockets are bound, before the app "
        "is imported; the master keeps its identity, to bind new slots. Unknown, or not "
        "permitted: exit 2",
        parse=_optional_path,
        metavar="USER",
    )
    group: str | None = option(
        None,
        "and to this group (name or gid; default: the user's own group)",
        parse=_optional_path,
        metavar="GROUP",
    )
    max_connections: int = option(
        10_000,
        "connections per worker; at the limit a new handshake gets 503 with Retry-After at "
        "once, open connections untouched; 0: no limit (docs/memory.md says why 10,000)",
        parse=_integer(0),
        metavar="N",
    )
    origins: tuple[str, ...] | None = option(
        None,
        "comma-separated Origin values allowed; a handshake with another Origin gets 403; one "
        "without Origin (not a browser) is accepted",
        parse=_origins,
        metavar="LIST",
    )
    forwarded_allow_ips: tuple[str, ...] = option(
        ("127.0.0.1",),
        "peers trusted to set X-Forwarded-For (IPs or networks, comma-separated; * for any); "
        "from them the client address is the header's last entry (access log, "
        "wsfleet.client_address); a peer on a Unix socket is always trusted",
        parse=_networks,
        metavar="LIST",
    )
    proxy_protocol: bool = option(
        False,
        "every connection starts with a PROXY protocol v1 or v2 header (HAProxy send-proxy, "
        "L4 load balancers): its source is the client address; a connection without a valid "
        "header is closed, the worker untouched",
        parse=_boolean,
    )
    open_timeout: float = option(
        10.0, "seconds a client may take to complete its handshake", parse=_seconds, metavar="S"
    )
    ping_interval: float = option(
        20.0, "seconds between keepalive pings; 0 turns pings off", parse=_seconds, metavar="S"
    )
    ping_timeout: float = option(
        20.0,
        "seconds to wait for a pong before closing with 1011; 0: wait forever",
        parse=_seconds,
        metavar="S",
    )
    close_timeout: float = option(
        10.0,
        "seconds to wait for the client's answer to a close frame before dropping it",
        parse=_seconds,
        metavar="S",
    )
    server_header: str | None = option(
        None,
        "the Server header of every response; '' omits it (default: websockets')",
        parse=_text,
        metavar="TEXT",
    )
    health_path: str = option(
        "/health/",
        "plain HTTP GET path on the serving port(s), answering 200 while serving and 503 "
        "while draining; '' disables",
        parse=_health_path,
        metavar="PATH",
    )
    compression: str = option(
        "deflate",
        "permessage-deflate compression: deflate or none",
        parse=_choice("deflate", "none"),
        metavar="deflate|none",
    )
    window_bits: int = option(
        12,
        "permessage-deflate window bits (9-15); more compresses better and costs memory "
        "(12 is websockets' default; docs/memory.md measures each setting)",
        parse=_integer(9, 15),
        metavar="N",
    )
    memory_level: int = option(
        5,
        "permessage-deflate memory level (1-9); more is faster and costs memory (5 is "
        "websockets' default; docs/memory.md)",
        parse=_integer(1, 9),
        metavar="N",
    )
    max_size: int = option(
        2**20,
        "largest incoming message in bytes; a larger one closes its connection with 1009",
        parse=_integer(1),
        metavar="BYTES",
    )
    history_size: int = option(
        1000,
        "pub/sub: messages each topic keeps, so that a client that reconnects (after a "
        "reload, say) resumes from its last offset; 0: none (docs/pubsub.md measures the "
        "memory and the default)",
        parse=_integer(0, 10**7),
        metavar="N",
    )
    history_ttl: float = option(
        300.0,
        "pub/sub: seconds a topic keeps each message at most; 0: none",
        parse=_seconds,
        metavar="S",
    )
    max_backlog: int = option(
        2**20,
        "pub/sub: a subscriber with more unsent bytes than this is closed with 1013 (try "
        "again later; it can resume from the history), so that it slows nobody else",
        parse=_integer(1),
        metavar="BYTES",
    )
    broker: str | None = option(
        None,
        "pub/sub across hosts: keep the topics (offsets, epochs, history) in this Redis, "
        "redis://[USER:PASSWORD@]HOST[:PORT][/DB] or rediss:// for TLS, shared by every "
        "master that names it; prefer --broker-password-file to a password here. Needs "
        "redis-py: pip install '.[redis]' from the checkout (docs/pubsub.md)",
        parse=_broker_url,
        metavar="URL",
    )
    broker_password_file: str | None = option(
        None,
        "pub/sub: the broker's password, read from this file (its content without "
        "surrounding whitespace; a systemd credential or a Kubernetes secret), instead of "
        "one in --broker's URL",
        parse=_optional_path,
        metavar="FILE",
    )
    broker_timeout: float = option(
        5.0,
        "pub/sub: how long a publish waits for an unreachable broker before it raises "
        "wsfleet.BrokerUnavailable (subscribe too); the fleet keeps serving meanwhile",
        parse=_positive_seconds,
        metavar="S",
    )
    max_queue: int = option(
        16,
        "incoming frames buffered per connection before reading from the network pauses",
        parse=_integer(1),
        metavar="N",
    )
    write_limit: int = option(
        2**15,
        "bytes buffered for writing per connection before a send waits (backpressure)",
        parse=_integer(0),
        metavar="BYTES",
    )
    backlog: int = option(
        1024,
        "listen backlog: connections the kernel queues before the worker accepts them",
        parse=_integer(1, 65535),
        metavar="N",
    )
    loop: str = option(
        "auto",
        "event loop: uvloop, asyncio, or auto (uvloop when installed, as it is by default; "
        "asyncio with TLS, measured faster there: docs/performance.md)",
        parse=_choice("auto", "uvloop", "asyncio"),
        metavar="auto|uvloop|asyncio",
    )
    balance: str = option(
        "least-connections",
        "how new connections are placed among the workers: least-connections (the master "
        "steers the slots' SO_REUSEPORT group with a BPF program weighted by each worker's "
        "open connections: the emptier ones get more, starting or replaced ones none; "
        "docs/performance.md measures it) or hash (the kernel's, blind to load)",
        parse=_choice("least-connections", "hash"),
        commands=frozenset({"start"}),
        metavar="least-connections|hash",
    )
    metrics: str | None = option(
        None,
        "serve /metrics (Prometheus), /status.json and a status page (/) on HOST:PORT, from "
        "the master's own loop; workers count handshakes, closes and messages only with it. "
        "Needs prometheus-client: pip install '.[metrics]' from the checkout "
        "(docs/observability.md)",
        parse=_metrics_address,
        commands=frozenset({"start"}),
        metavar="HOST:PORT",
    )
    admin: str | None = option(
        None,
        "serve the admin API on HOST:PORT (a bare PORT: 127.0.0.1:PORT): POST /publish/TOPIC "
        "publishes the request's body on TOPIC, as wsfleet publish does, for a client that "
        "sends 'Authorization: Bearer TOKEN' with the token of --admin-token-file (required "
        "with it). The hub process serves it, never the master's loop; an upgrade hands the "
        "port over (docs/operations.md, docs/security.md)",
        parse=_admin_address,
        commands=frozenset({"start"}),
        metavar="HOST:PORT",
    )
    admin_token_file: str | None = option(
        None,
        "file holding --admin's token: its content without surrounding whitespace, one word "
        "of visible ASCII characters (openssl rand -hex 32 writes one). Read at start, and "
        "again by an upgrade's new master; never logged or shown",
        parse=_optional_path,
        commands=frozenset({"start"}),
        metavar="FILE",
    )
    pidfile: str | None = option(
        None,
        "file where the master writes its pid; `wsfleet status|reload|stop|upgrade` find a "
        "master without one, by the address it listens on",
        parse=_optional_path,
        commands=frozenset({"start"}),
        metavar="FILE",
    )
    daemon: bool = option(
        False,
        "detach from the terminal once every worker is ready: the command prints the "
        "listening line, or fails with the master's reason and exit status; logs go to "
        "--log-file, by default wsfleet.log in the current directory (the command prints where)",
        parse=_boolean,
        commands=frozenset({"start"}),
    )
    access_log: bool = option(
        False,
        "log each handshake ('CLIENT \"GET PATH\" STATUS') and each closed connection "
        "('CLIENT PATH closed CODE after S, N in, M out') to the logger wsfleet.access; "
        "counting messages costs a coroutine per message, hence off by default",
        parse=_boolean,
    )
    log_level: str = option(
        "info",
        "debug, info, warning, error or critical",
        parse=_choice("debug", "info", "warning", "error", "critical"),
        metavar="LEVEL",
    )
    log_file: str | None = option(
        None,
        "append logs to this file instead of stderr; USR1 reopens it (logrotate)",
        parse=_optional_path,
        metavar="FILE",
        shown="stderr; with --daemon, wsfleet.log",
    )


KILL_MARGIN = 1.0  # what the master adds to a worker's own deadlines before it kills

# What a running master cannot change: its sockets stay those it opened at start, so a SIGHUP
# that finds one of these changed logs a warning and keeps the old value (docs/options.md
# lists them, from here).
# (The hub keeps its history's bounds and its broker, and the admin API its token, until the
# next start or upgrade: it is not reloaded.)
RELOAD_IGNORES = (
    "host",
    "port",
    "bind",
    "umask",
    "backlog",
    "metrics",
    "admin",
    "admin_token_file",
    "history_size",
    "history_ttl",
    "broker",
    "broker_password_file",
    "broker_timeout",
)


MAX_TOKEN_FILE = 4096  # bytes: a token file larger than this is not one


def admin_token(config: Config) -> str | None:
    """--admin's token (None without --admin): --admin-token-file's content without the
    whitespace around it. ConfigError says what to fix (exit 2). The token itself is never
    in a message, a log line or the status."""
    if not config.admin:
        return None
    path = config.admin_token_file
    if not path:
        raise ConfigError(
            "--admin needs --admin-token-file FILE: a file holding the token that clients send "
            "as 'Authorization: Bearer TOKEN' (openssl rand -hex 32 > FILE makes one)"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"--admin-token-file {path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_TOKEN_FILE:
        raise ConfigError(
            f"--admin-token-file {path}: over {MAX_TOKEN_FILE} bytes, not a token file"
        )
    token = data.strip()
    if not token:
        raise ConfigError(
            f"--admin-token-file {path} is empty: write the token in it (openssl rand -hex 32 "
            f"> {path} makes one)"
        )
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise ConfigError(
            f"--admin-token-file {path}: the token must be one word of visible ASCII "
            "characters (no space, line break or other character inside it), as openssl rand "
            "-hex 32 writes"
        )
    return token.decode()


def uses_uvloop(config: Config) -> bool:
    """--loop auto: uvloop, except with TLS, where asyncio's TLS measured 1.5x the messages/s
    of uvloop's (uvloop spent 18-20 µs of system time per message, asyncio 2.5-2.8)."""
    return config.loop == "uvloop" or (config.loop == "auto" and not config.certfile)


def scheme(config: Config) -> str:
    return "wss" if config.certfile else "ws"


def addresses(config: Config) -> list[Address]:
    """Where to listen: the --bind addresses, else --host and --port."""
    if config.bind:
        return [parse_address(text) for text in config.bind]
    return [Address(config.host, config.port)]


def url(config: Config, address: str) -> str:
    """What the listening line says for an address: ws:// or wss:// before host:port;
    unix:PATH as it is."""
    return address if address.startswith("unix:") else f"{scheme(config)}://{address}"


# --balance least-connections: the master weighs new connections at most this often, and a
# worker reports a change of its connections within it (not only at its next heartbeat): the
# weights follow counts at most ~2 of these old: at 500 new connections a second, that is
# ~100 placed on old counts (a second's heartbeats would be 500: max/min 1.6 instead of 1.1 in
# a simulation of tests/test_steering.py's scale-up).
STEER_INTERVAL = 0.1
STEER_GAP = 0.01  # the master re-weighs at once on a report, but at most this often
# The connections placed on one view of the counts: those arriving over about this long (the
# counts' age, the weights' life), at the rate the workers' reports show (least_connections'
# ``arriving``).
STEER_HORIZON = 3 * STEER_INTERVAL
ARRIVAL_WINDOW = 1.0  # seconds of reports the arrival rate is measured over


def heartbeat_interval(config: Config) -> float:
    """How often a worker's event loop reports to the master (and its connection count)."""
    return min(1.0, config.timeout / 4)


def drain_duration(config: Config, connections: int) -> float:
    """How long a drain takes to send its closes: --drain-rate a second, bounded by
    --drain-window. The first close goes at once, the others evenly after it."""
    return min(connections / config.drain_rate, config.drain_window)


def drain_limit(config: Config, paced: float | None = None) -> float:
    """How long a draining worker may live: its closes take ``paced`` seconds (at most the
    drain window, which is what the master assumes until the worker says), its graceful
    timeout then aborts what is left, then its connections' close timeout, then a margin;
    the master kills it after that."""
    paced = config.drain_window if paced is None else min(paced, config.drain_window)
    return paced + config.graceful_timeout + config.close_timeout + KILL_MARGIN


def hurry_limit() -> float:
    """How long a worker told to hurry may live: HURRY_CLOSE for its clients' answers, as
    long again for its handlers to end once cancelled, then a margin."""
    return 2 * HURRY_CLOSE + KILL_MARGIN


def upgrade_limit(config: Config) -> float:
    """How long a new master (an upgrade of wsfleet itself) has to be ready: its workers have
    --timeout each to be ready, and its own start (imports, sockets) as long again. After
    that the old master stops it and keeps serving."""
    return 2 * config.timeout


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Config)}


def fields_for(command: str) -> list[dataclasses.Field[Any]]:
    """The options a command takes, in declaration order."""
    return [f for f in FIELDS.values() if command in f.metadata["commands"]]


def shown_default(field: dataclasses.Field[Any]) -> str:
    """An option's default as --help and docs/options.md show it: 30 rather than 30.0,
    none, off, a list comma-separated."""
    if field.metadata["shown"]:
        return str(field.metadata["shown"])
    value = field.default
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(value)
    if value == "":
        return "''"
    return str(value)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parse_value(name: str, value: object) -> Any:
    """Parse one option's value; ValueError says what was expected."""
    return FIELDS[name].metadata["parse"](value)


def _key_line(text: str, key: str) -> int | None:
    """The line where a top-level key is set, for error messages (tomllib gives no positions)."""
    pattern = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def read_file(path: str, command: str) -> dict[str, Any]:
    """Read a TOML config file: known keys parsed, anything else an error with its line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)", or "(at end of document)".
        message = str(exc)
        if message.endswith("(at end of document)"):
            message = message[: -len(")")] + f", line {len(text.splitlines())})"
        raise ConfigError(f"{path}: invalid TOML: {message}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        line = _key_line(text, key)
        where = f"{path}:{line}" if line else path
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown option {key!r}{suggest(key, FIELDS)}")
        if command not in FIELDS[key].metadata["commands"]:
            continue  # a file shared by start and worker may hold the other's options
        try:
            values[key] = parse_typed(key, value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
    return values


def parse_typed(name: str, value: object) -> Any:
    """Parse a value that comes with a type (from TOML, or wsfleet.run()): the wrong type is
    refused, not coerced; ValueError says what was expected, as parse_value does."""
    kinds, expected = _TOML_TYPES[FIELDS[name].type.split(" |")[0]]
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        raise ValueError(f"expected {expected}, got {value!r}")
    return parse_value(name, value)


# What a typed value (TOML, wsfleet.run()) must be for a field of each type: a file that says
# workers = "4" is as wrong as one that says daemon = 1.
_TOML_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "int": (int, "an integer"),
    "float": ((int, float), "a number"),
    "str": (str, "a string"),
    "bool": (bool, "a boolean"),
    "tuple[str, ...]": ((str, list), "a string or a list of strings"),
}


def suggest(name: str, known: Mapping[str, object] | list[str]) -> str:
    """' (did you mean X?)' for the closest known name, or the list of them."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(sorted(known))})"


def read_env(environ: Mapping[str, str], command: str) -> dict[str, Any]:
    """Read ``WSFLEET_<OPTION>`` variables; an unparsable value is an error naming it."""
    values: dict[str, Any] = {}
    for name, field in FIELDS.items():
        var = env_name(name)
        if var in environ and command in field.metadata["commands"]:
            try:
                values[name] = parse_value(name, environ[var])
            except ValueError as exc:
                raise ConfigError(f"{var}: {exc}") from None
    return values


def load(
    command: str,
    cli: Mapping[str, Any],
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge default < file < environment < command line into a Config.

    ``cli`` holds only the options given on the command line, already parsed. ``config_file``
    falls back to ``WSFLEET_CONFIG``. The master calls this again on SIGHUP, with the same
    arguments, to pick up an edited file.
    """
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(read_file(config_file, command))
    merged.update(read_env(environ, command))
    merged.update(cli)
    return Config(**merged)
