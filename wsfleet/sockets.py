"""Listening sockets: bound with SO_REUSEPORT, or inherited as a file descriptor."""

from __future__ import annotations

import errno
import resource
import socket
import ssl
from typing import Any

from .config import Config


class AddressInUse(Exception):
    """The address is held by a program that does not share it (the CLI exits 1)."""


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """Open a listening socket on host:port that other wsfleet processes can share.

    SO_REUSEPORT lets several processes (or several sockets of one master) bind the same
    port; the kernel then spreads new connections over them. A program that binds the port
    without SO_REUSEPORT still excludes us, and that is reported as AddressInUse.
    """
    sock = _bind(host, port, share=True)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_exclusive(host: str, port: int, backlog: int) -> socket.socket:
    """The master's first socket: as bind(), but refused when anything listens on the port
    already, even a socket that shares it (another master, a forgotten `wsfleet worker`),
    which SO_REUSEPORT would otherwise silently join and take part of the traffic from.

    The probe binds without SO_REUSEPORT: Linux refuses that next to any listener on the
    port, sharing or not (SO_REUSEADDR still lets it past connections in TIME_WAIT).
    """
    if port != 0:  # port 0: the kernel picks a free port
        _bind(host, port, share=False).close()
    return bind(host, port, backlog)


def _bind(host: str, port: int, share: bool) -> socket.socket:
    family, type_, proto, address = _resolve(host, port)
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                by = (
                    "by a program that does not share it (SO_REUSEPORT)"
                    if share
                    else "(another wsfleet master, a `wsfleet worker`, or another program)"
                )
                raise AddressInUse(
                    f"address {format_address(address)} is already in use {by}; stop it or "
                    "choose another --port"
                ) from None
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, int, int, Any]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, type_, proto, _, address = infos[0]
    return family, type_, proto, address


def server_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context of --certfile/--keyfile (None without them); ValueError names the file
    that is missing, unreadable, or not the certificate's key."""
    if config.keyfile and not config.certfile:
        raise ValueError(f"--keyfile {config.keyfile} needs --certfile")
    if not config.certfile:
        return None
    for flag, path in (("--certfile", config.certfile), ("--keyfile", config.keyfile)):
        if path is not None:
            try:
                open(path, "rb").close()
            except OSError as exc:
                raise ValueError(f"{flag} {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.certfile, config.keyfile)
    except ssl.SSLError as exc:
        key = f"--keyfile {config.keyfile}" if config.keyfile else "the key in it"
        raise ValueError(
            f"--certfile {config.certfile} with {key}: not a certificate and its private key "
            f"({exc.reason or exc})"
        ) from None
    return context


def from_fd(fd: int) -> socket.socket:
    """Adopt an inherited listening socket (from a master, supervisord, or systemd)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"file descriptor {fd} is not a socket ({exc.strerror})") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()  # leave the descriptor to whoever owns it
        raise ValueError(f"file descriptor {fd} is not a listening TCP socket")
    sock.setblocking(False)
    return sock


def format_address(address: tuple[object, ...] | str) -> str:
    """host:port, with brackets around an IPv6 host."""
    if isinstance(address, str):  # AF_UNIX path
        return address
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sock_address(sock: socket.socket) -> str:
    """The host:port a listening socket is bound to (the real port when it bound port 0)."""
    return format_address(sock.getsockname())


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the new soft limit.

    Every connection is a file descriptor, and the usual soft limit (1024) is far below what
    one worker can serve; the hard limit is what the administrator allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
