"""The identity the workers run as (--user, --group): read by the command line's checks, the
master (its Unix sockets belong to that identity) and the workers (they switch to it).

A worker switches once its sockets are bound and before it imports the app; the master keeps
its own identity, to bind new slots and to signal every worker.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

from .config import Config


def identity(config: Config) -> tuple[int, int] | None:
    """(uid, gid) that --user/--group name, or None; ValueError says which is unknown or that
    switching is not permitted."""
    if not config.user and not config.group:
        return None
    uid, gid = os.getuid(), os.getgid()
    if config.user:
        try:
            entry = (
                pwd.getpwuid(int(config.user))
                if config.user.isdigit()
                else pwd.getpwnam(config.user)
            )
        except KeyError:
            raise ValueError(f"--user {config.user}: no such user") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if config.group:
        try:
            gid = (
                grp.getgrgid(int(config.group)).gr_gid
                if config.group.isdigit()
                else grp.getgrnam(config.group).gr_gid
            )
        except KeyError:
            raise ValueError(f"--group {config.group}: no such group") from None
    if os.getuid() != 0 and (uid, gid) != (os.getuid(), os.getgid()):
        raise ValueError("--user/--group: only root may switch the workers to another identity")
    return uid, gid


def drop_privileges(config: Config) -> None:
    """Become --user/--group (a worker, its sockets bound, before it imports the app)."""
    if (ids := identity(config)) is None:
        return
    uid, gid = ids
    if os.getuid() == 0:
        os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def peer_allowed(conn: socket.socket) -> bool:
    """Only this process's own user and root may talk to it on a Unix socket (the master's
    status socket, the hub's)."""
    return peer_credentials(conn)[1] in (0, os.getuid())
