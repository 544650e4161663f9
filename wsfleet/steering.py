"""Steering new connections among the slots' sockets of one address (--balance
least-connections): a classic BPF program on their SO_REUSEPORT group picks, for each new
connection, a socket at random with weights.

The kernel's hash places a connection without looking at load; wsfleet knows each worker's
open connections (its heartbeat), so the master can weight the choice: more for the emptier
workers, none for those that should take nothing (starting, held, draining). The program is
replaced as the weights change; attaching it needs no privilege.

- :func:`program`: the instructions, from the weights (pure). A random number (the kernel's
  ``SKF_AD_RANDOM``) modulo the total, then one compare per socket with a weight: the first
  cumulative weight above it names the socket. All weights 0: an index out of range, which
  the kernel answers with its hash.
- :class:`Group`: the kernel's numbering of a group, which the program's indices follow: a
  socket joins at ``listen()`` (the next index), and one that closes leaves its index to the
  group's last socket (checked on this kernel: tests/test_steering.py).
- :func:`least_connections`: the weights from the workers' open connections and the
  connections expected before the next weights (pure).
- :func:`attach`: the ``setsockopt`` (OSError where the kernel refuses: the hash goes on).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from collections.abc import Sequence
from typing import Any

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
_SKF_AD_RANDOM = -0x1000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM: a random 32-bit number
# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h)
_LD_W_ABS = 0x00 | 0x00 | 0x20
_ALU_MOD_K = 0x04 | 0x90 | 0x00
_JMP_JGE_K = 0x05 | 0x30 | 0x00
_RET_K = 0x06 | 0x00
_INSTRUCTION = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
HASH = 0xFFFFFFFF  # an index no group has: the kernel then uses its hash
MAX_SOCKETS = 2000  # (two instructions each: under the kernel's 4,096)
WEIGHT_MAX = 2**16  # least_connections' largest weight (times MAX_SOCKETS: under 2**32)


def program(weights: Sequence[int]) -> bytes:
    """The instructions that pick socket ``i`` with probability ``weights[i] / sum``; all 0:
    the kernel's hash."""
    if len(weights) > MAX_SOCKETS:
        raise ValueError(f"at most {MAX_SOCKETS} sockets in a group, got {len(weights)}")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights are >= 0, got {list(weights)}")
    total = sum(weights)
    if total == 0:
        return _INSTRUCTION.pack(_RET_K, 0, 0, HASH)
    if total >= 2**32:
        raise ValueError(f"the weights' total must fit 32 bits, got {total}")
    code = [
        _INSTRUCTION.pack(_LD_W_ABS, 0, 0, _SKF_AD_RANDOM & 0xFFFFFFFF),
        _INSTRUCTION.pack(_ALU_MOD_K, 0, 0, total),
    ]
    cumulative, last = 0, 0
    for index, weight in enumerate(weights):
        if weight:
            cumulative += weight
            last = index
            if cumulative < total:  # (A < cumulative: this socket; else the next compare)
                code.append(_INSTRUCTION.pack(_JMP_JGE_K, 1, 0, cumulative))
                code.append(_INSTRUCTION.pack(_RET_K, 0, 0, index))
    code.append(_INSTRUCTION.pack(_RET_K, 0, 0, last))
    return b"".join(code)


def attach(sock: socket.socket, weights: Sequence[int]) -> None:
    """Steer the group of ``sock`` (every socket of its address) with ``weights``, given in
    the group's order (:class:`Group`). OSError where the kernel refuses."""
    code = program(weights)
    buffer = ctypes.create_string_buffer(code, len(code))  # (alive across the call)
    fprog = struct.pack("@HP", len(code) // _INSTRUCTION.size, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def detach(sock: socket.socket) -> None:
    """Back to the kernel's hash for the group of ``sock``."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)


class Group:
    """The kernel's numbering of one reuseport group: what :func:`program`'s indices mean.

    Members are the caller's keys (a slot's index, say), in the order their sockets called
    ``listen()``; when one closes, the group's last takes its index.
    """

    def __init__(self) -> None:
        self.members: list[Any] = []  # (hashable keys: the master's are slots' indices)

    def join(self, key: Any) -> None:
        if key in self.members:
            raise ValueError(f"{key!r} is in the group already")
        self.members.append(key)

    def leave(self, key: Any) -> None:
        index = self.members.index(key)
        last = self.members.pop()
        if index < len(self.members):
            self.members[index] = last

    def weights(self, by_key: dict[Any, int]) -> list[int]:
        """The weights in the group's order (a member not in ``by_key``: 0)."""
        return [by_key.get(key, 0) for key in self.members]


def least_connections(connections: Sequence[int | None], arriving: float = 0.0) -> list[int]:
    """Weights for new connections, from each worker's open ones (None: it takes none) and
    how many are expected before the next weights (``arriving``).

    The weights are how ``arriving`` connections would fill the workers, as water fills
    ground: the emptiest first, up to the level where all of them are placed (one per
    eligible worker at least: a few connections opened one after another, faster than the
    counts are reported, spread over the emptier workers instead of all going to one).
    A trickle goes to the emptiest workers; a burst larger than the workers' differences
    spreads over all of them by what each lacks to that level. Weights from the deficits
    alone would send a burst, placed on counts a report old, to whichever worker was behind,
    then back to the other (1,000 connections in a second on two workers: max/min 1.33 with
    squared deficits, 1.03 this way, in tests/test_steering.py's simulation). Every
    eligible worker keeps a share (1 in WEIGHT_MAX, the emptiest's weight).
    """
    eligible = sorted(c for c in connections if c is not None)
    if not eligible:
        return [0] * len(connections)
    level = _level(eligible, max(float(len(eligible)), arriving))
    lacks = [0.0 if c is None else max(0.0, level - c) for c in connections]
    top = max(lacks)  # (> 0: the emptiest lacks arriving / len(eligible) at least)
    return [
        0 if c is None else max(1, round(lack * WEIGHT_MAX / top))
        for c, lack in zip(connections, lacks, strict=True)
    ]


def _level(counts: list[int], arriving: float) -> float:
    """The level that ``arriving`` connections fill the workers of ``counts`` (sorted) to."""
    total = 0.0
    for filled, count in enumerate(counts, 1):
        total += count
        level = (arriving + total) / filled
        if filled == len(counts) or level <= counts[filled]:
            return level
    raise ValueError("no counts")


class Steerer:
    """The master's steering of its slots' sockets: one group per TCP address (the Nth
    socket of each slot is address N's), the weights last attached (None: the kernel's hash),
    and, where the kernel refuses, the hash from then on (said once)."""

    def __init__(self, addresses: int) -> None:
        self.groups = [Group() for _ in range(addresses)]
        self.attached: list[list[int] | None] = [None] * addresses
        self.refused: str | None = None
        self.weights: dict[int, int] | None = None  # by slot, as last steered
        self.inherited = False  # an old master's program may be attached: replace it once
        self.aside = 0  # the last key given to sockets set aside (negative: no slot's index)

    @classmethod
    def from_orders(cls, orders: list[list[int]]) -> Steerer:
        """An upgrade's new master: the groups as the old one numbered them."""
        steerer = cls(len(orders))
        for group, order in zip(steerer.groups, orders, strict=True):
            group.members = list(order)
        steerer.inherited = True
        return steerer

    def orders(self) -> list[list[int]]:
        """Each group's slots in the kernel's order (handed over on upgrade)."""
        return [[int(key) for key in group.members] for group in self.groups]

    def join(self, slot: int) -> None:
        """A slot's sockets listen (in the order the kernel numbers them)."""
        for group in self.groups:
            group.join(slot)

    def leave(self, slot: int) -> None:
        """A slot's sockets close (``slot``: its index, or the key :meth:`set_aside` gave)."""
        for group in self.groups:
            if slot in group.members:
                group.leave(slot)

    def set_aside(self, slot: int) -> int:
        """A slot's sockets wait to close while its index may serve a new slot: they keep
        their place in the groups under a key of their own (weight 0), which it returns."""
        self.aside -= 1
        for group in self.groups:
            if slot in group.members:
                group.members[group.members.index(slot)] = self.aside
        return self.aside

    def steer(
        self, weights: dict[int, int] | None, sockets: dict[int, list[socket.socket]]
    ) -> bool:
        """Attach ``weights`` (by slot; None: back to the kernel's hash) to each group whose
        weights changed; False where the kernel refused (then never again: :attr:`refused`
        says why)."""
        if self.refused is not None:
            return False
        self.weights = None if weights is None else dict(weights)
        for number, group in enumerate(self.groups):
            wanted = None if weights is None else group.weights(weights)
            if (wanted == self.attached[number] and not self.inherited) or not group.members:
                continue
            sock = next(sockets[key][number] for key in group.members if key in sockets)
            try:
                if wanted is not None:
                    attach(sock, wanted)
                else:
                    with contextlib.suppress(FileNotFoundError):  # (ENOENT: no program)
                        detach(sock)
            except OSError as exc:
                self.refused = exc.strerror or str(exc)
                return False
            self.attached[number] = wanted
        self.inherited = False
        return True
