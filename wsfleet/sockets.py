"""Listening sockets: bound with SO_REUSEPORT, or inherited (a file descriptor, or systemd's
socket activation)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import socket
import ssl
import stat
import sys
from dataclasses import dataclass
from typing import Any

from .config import Address, Config


class ListenError(OSError):
    """An address cannot be listened on; the message names it (the CLI exits 1)."""


class AddressInUse(ListenError):
    """The address is held by a program that does not share it."""


def bind(address: Address, backlog: int) -> socket.socket:
    """Open a listening socket on a TCP address that other wsfleet processes can share.

    SO_REUSEPORT lets several processes (or several sockets of one master) bind the same
    port; the kernel then spreads new connections over them. A program that binds the port
    without SO_REUSEPORT still excludes us, and that is reported as AddressInUse.
    """
    sock = _bind(address, share=True)
    return _listen(sock, backlog)


def bind_exclusive(address: Address, backlog: int) -> socket.socket:
    """The master's first socket on an address: as bind(), but refused when anything listens
    on the port already, even a socket that shares it (another master, a forgotten `wsfleet
    worker`), which SO_REUSEPORT would otherwise silently join and take part of the traffic
    from.

    The probe binds without SO_REUSEPORT: Linux refuses that next to any listener on the
    port, sharing or not (SO_REUSEADDR still lets it past connections in TIME_WAIT).
    """
    if address.port != 0:  # port 0: the kernel picks a free port
        _bind(address, share=False).close()
    return bind(address, backlog)


def bind_plain(address: Address, backlog: int) -> socket.socket:
    """A listening socket of the master's own (--metrics), shared with nobody."""
    return _listen(_bind(address, share=False), backlog)


def bind_unix(path: str, backlog: int, umask: int, owner: tuple[int, int] | None) -> SharedListener:
    """Listen on a Unix socket at path, its file mode 0o777 & ~umask, owned by owner (uid,
    gid) when given: the fleet's workers all accept on this one socket.

    A socket file left by a server that is gone (a killed master) is replaced, as gunicorn
    and uvicorn do; one that a server still answers on is AddressInUse, and a path that is
    not a socket is never removed.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(mode):
            raise AddressInUse(f"unix:{path} exists and is not a socket; choose another path")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:  # nobody listens: left over
                os.unlink(path)
            except OSError:
                pass  # let bind() say what is wrong
            else:
                raise AddressInUse(
                    f"unix:{path} is in use by a running server; stop it or choose another path"
                )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        previous = os.umask(umask)  # the file gets its mode at once: no window with another
        try:
            sock.bind(path)
        finally:
            os.umask(previous)
        inode = os.stat(path).st_ino
        if owner is not None:
            os.chown(path, *owner)
        return SharedListener(_listen(sock, backlog), path, inode)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise


@dataclass
class SharedListener:
    """A socket every worker accepts on: a Unix socket (the kernel does not spread AF_UNIX
    connections over several sockets), or one socket passed by systemd. ``path`` is the file
    this process made (a Unix socket it bound), so that only that file is removed at exit;
    None for an inherited socket, whose file belongs to whoever made it."""

    sock: socket.socket
    path: str | None = None
    inode: int = 0

    def close(self, remove: bool = True) -> None:
        self.sock.close()
        if remove and self.path is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self.inode:
                    os.unlink(self.path)


_TCP_INFO_SIZE, _TCPI_UNACKED = 104, 24  # struct tcp_info's start, and tcpi_unacked's offset


def accept_queue(sock: socket.socket) -> int:
    """The connections waiting in a listening TCP socket's accept queue (handshake done, not
    accepted yet): for a listener, the kernel reports that count as ``tcpi_unacked``."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    return int.from_bytes(info[_TCPI_UNACKED : _TCPI_UNACKED + 4], sys.byteorder)


def _listen(sock: socket.socket, backlog: int) -> socket.socket:
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _bind(address: Address, share: bool) -> socket.socket:
    family, type_, proto, resolved = _resolve(address)
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # [::]:PORT means IPv6 only, as nginx's listen [::]
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(resolved)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                by = (
                    "by a program that does not share it (SO_REUSEPORT)"
                    if share
                    else "(another wsfleet master, a `wsfleet worker`, or another program)"
                )
                raise AddressInUse(
                    f"address {format_address(resolved)} is already in use {by}; stop it or "
                    "choose another address"
                ) from None
            raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def numeric(address: Address) -> Address:
    """A TCP address as a master bound to it names it: its host resolved as bind() resolves
    it (``localhost`` is ``127.0.0.1``); unchanged if it does not resolve."""
    try:
        return address_of_name(_resolve(address)[3])
    except ListenError:
        return address


def _resolve(address: Address) -> tuple[socket.AddressFamily, int, int, Any]:
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot listen on {address}: cannot resolve host {address.host!r}: {exc.strerror}"
        ) from None
    family, type_, proto, _, resolved = infos[0]
    return family, type_, proto, resolved


_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


def _encrypted_key() -> bytes:
    """load_cert_chain's password callback: a server that starts unattended asks for none
    (OpenSSL would prompt on the terminal, or hang a --daemon)."""
    raise ValueError("the private key is encrypted: give it unencrypted (no passphrase asked)")


def server_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context of --certfile/--keyfile (None without them); ValueError names the option
    and file that is missing, unreadable, without what it must hold, or not the certificate's
    key. OpenSSL's own words say little of that ("PEM lib"): the files are looked at first."""
    if config.keyfile and not config.certfile:
        raise ValueError(f"--keyfile {config.keyfile} needs --certfile (the certificate)")
    if not config.certfile:
        return None
    contents: dict[str, bytes] = {}
    for flag, path in (("--certfile", config.certfile), ("--keyfile", config.keyfile)):
        if path is not None:
            try:
                with open(path, "rb") as f:
                    contents[flag] = f.read()
            except OSError as exc:
                raise ValueError(f"{flag} {path}: {exc.strerror}") from None
    if _PEM_CERTIFICATE not in contents["--certfile"]:
        raise ValueError(f"--certfile {config.certfile}: no certificate in it (PEM expected)")
    if config.keyfile is None and not _PEM_KEY.search(contents["--certfile"]):
        raise ValueError(
            f"--certfile {config.certfile} holds no private key: give it with --keyfile FILE"
        )
    if config.keyfile is not None and not _PEM_KEY.search(contents["--keyfile"]):
        raise ValueError(f"--keyfile {config.keyfile}: no private key in it (PEM expected)")
    key = f"--keyfile {config.keyfile}" if config.keyfile else "the key in it"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.certfile, config.keyfile, password=_encrypted_key)
    except ValueError as exc:  # (from _encrypted_key)
        holder = (
            f"--keyfile {config.keyfile}" if config.keyfile else f"--certfile {config.certfile}"
        )
        raise ValueError(f"{holder}: {exc}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"--certfile {config.certfile} with {key}: the key is not the certificate's"
            ) from None
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
        raise ValueError(f"file descriptor {fd} is not a listening stream socket")
    sock.setblocking(False)
    return sock


LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first descriptor socket activation passes


def listen_fds() -> list[socket.socket]:
    """The listening sockets passed by systemd's socket activation (or anything speaking its
    protocol, as systemd-socket-activate): LISTEN_FDS descriptors from 3 on, when LISTEN_PID
    is this process. The variables are removed, as sd_listen_fds(1) does, so that nothing
    this process forks or runs takes the descriptors for its own; the sockets are not
    inherited further (close-on-exec). ListenError if one is not a listening stream socket."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()):
        return []
    if not count.isdigit():
        raise ListenError(f"socket activation: LISTEN_FDS={count!r} is not a number")
    found = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            found.append(from_fd(fd))
        except ValueError as exc:
            for sock in found:
                sock.detach()
            raise ListenError(f"socket activation (LISTEN_FDS={count}): {exc}") from None
        os.set_inheritable(fd, False)
    return found


def address_of(sock: socket.socket) -> Address:
    """The Address a listening socket is bound to: host and port, or a Unix socket's path."""
    return address_of_name(sock.getsockname())


def address_of_name(name: Any) -> Address:
    """The Address of a socket name as getsockname() and getaddrinfo() give it."""
    if isinstance(name, bytes):  # an abstract Unix socket (systemd's ListenStream=@NAME)
        return Address(path="@" + name[1:].decode(errors="replace"))
    if isinstance(name, str):
        return Address(path=name)
    return Address(str(name[0]), int(name[1]))


def format_address(address: tuple[str, int] | tuple[str, int, int, int] | str) -> str:
    """host:port, with brackets around an IPv6 host (an AF_INET or AF_INET6 socket name)."""
    if isinstance(address, str):  # AF_UNIX path
        return address
    return str(Address(str(address[0]), int(address[1])))  # (one formatter: Address's)


def sock_address(sock: socket.socket) -> str:
    """host:port of a listening TCP socket (the real port when it bound port 0), or
    unix:PATH."""
    return str(address_of(sock))


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
