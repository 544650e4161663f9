"""wsfleet/steering.py: the BPF program, the group's numbering and the least-connections
weights, in milliseconds (the program run by a small interpreter of its four instructions);
then the kernel: a group numbered as :class:`~wsfleet.steering.Group` says, and connections
placed by the weights, on real sockets of 127.0.0.1."""

from __future__ import annotations

import collections
import socket
import struct

import pytest

from wsfleet import steering


def run(code: bytes, random: int) -> int:
    """What the kernel would return for ``random`` (SKF_AD_RANDOM)."""
    instructions = [struct.unpack_from("=HBBI", code, i) for i in range(0, len(code), 8)]
    a, pc = 0, 0
    while True:
        op, jt, jf, k = instructions[pc]
        if op == 0x20:  # ld [k] (SKF_AD_RANDOM only)
            assert k == (-0x1000 + 56) & 0xFFFFFFFF
            a = random
        elif op == 0x94:  # a %= k
            a %= k
        elif op == 0x35:  # jge #k
            pc += jt if a >= k else jf
        elif op == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
        pc += 1


@pytest.mark.parametrize(
    "weights", [[1], [1, 1, 1, 1], [0, 0, 1, 3], [5, 0, 2], [0, 7], [3, 0, 0], [1] * 64]
)
def test_the_program_picks_each_socket_in_proportion_to_its_weight(weights) -> None:
    code = steering.program(weights)
    total = sum(weights)
    picks = collections.Counter(run(code, r) for r in range(3 * total))
    assert picks == collections.Counter({i: 3 * w for i, w in enumerate(weights) if w})


def test_no_weight_leaves_the_choice_to_the_kernels_hash() -> None:
    assert run(steering.program([0, 0, 0]), 12345) == steering.HASH
    assert run(steering.program([]), 0) == steering.HASH


def test_bad_weights_raise() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        steering.program([1, -1])
    with pytest.raises(ValueError, match="32 bits"):
        steering.program([2**31, 2**31])
    with pytest.raises(ValueError, match="at most"):
        steering.program([1] * (steering.MAX_SOCKETS + 1))


def test_a_group_fills_a_hole_with_its_last_member() -> None:
    group = steering.Group()
    for key in "abcd":
        group.join(key)
    group.leave("b")
    assert group.members == ["a", "d", "c"]
    group.leave("c")  # (the last: nothing moves)
    assert group.members == ["a", "d"]
    group.join("e")
    assert group.weights({"a": 1, "e": 5}) == [1, 0, 5]
    with pytest.raises(ValueError):
        group.join("a")


def test_least_connections_weights_the_emptier_workers_more() -> None:
    assert steering.least_connections([10, 10, 10]) == [1, 1, 1]
    assert steering.least_connections([1000, 1000, 0, 0]) == [50, 50, 1050, 1050]
    assert steering.least_connections([400, None, 0]) == [20, 0, 420]
    assert steering.least_connections([None, None]) == [0, 0]
    assert steering.least_connections([]) == []


# The kernel


def group_of(count: int) -> tuple[list[socket.socket], int]:
    """``count`` SO_REUSEPORT listeners of one port on 127.0.0.1, bound, not listening."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", sockets[0].getsockname()[1] if sockets else 0))
        sock.setblocking(False)
        sockets.append(sock)
    return sockets, sockets[0].getsockname()[1]


def accepted_by(sockets: list[socket.socket], port: int, count: int) -> list[int]:
    """Open ``count`` connections; how many each socket accepted."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    got = []
    for sock in sockets:
        n = 0
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            conn.close()
            n += 1
        got.append(n)
    for client in clients:
        client.close()
    assert sum(got) == count, got  # (the backlogs hold them all: nothing lost)
    return got


def test_the_kernel_numbers_a_group_as_group_says() -> None:
    """Joined at listen() (here in the order c, a, b), and a closed socket's index goes to
    the last: a program that names one index reaches the socket Group says."""
    sockets, port = group_of(3)
    by_name = dict(zip("abc", sockets, strict=True))
    group = steering.Group()
    try:
        for name in "cab":
            by_name[name].listen(64)
            group.join(name)
        for name in list(by_name):
            steering.attach(by_name["a"], group.weights({name: 1}))
            got = accepted_by(list(by_name.values()), port, 5)
            assert dict(zip(by_name, got, strict=True))[name] == 5, (name, got)
        by_name.pop("c").close()
        group.leave("c")
        assert group.members == ["b", "a"]
        for name in by_name:
            steering.attach(by_name["a"], group.weights({name: 1}))
            got = accepted_by(list(by_name.values()), port, 5)
            assert dict(zip(by_name, got, strict=True))[name] == 5, (name, got)
    finally:
        for sock in sockets:
            sock.close()


def test_the_kernel_places_connections_by_the_weights_and_detaches() -> None:
    sockets, port = group_of(4)
    try:
        for sock in sockets:
            sock.listen(512)
        steering.attach(sockets[0], [0, 0, 1, 3])
        got = accepted_by(sockets, port, 400)
        # (binomial, p = 1/4 of 400: sd 8.7; these bounds are over 4.5 sd away)
        assert got[:2] == [0, 0] and 60 <= got[2] <= 140, got
        steering.attach(sockets[0], [0, 0, 0, 0])  # the hash: every socket gets some
        assert all(accepted_by(sockets, port, 200))
        steering.attach(sockets[0], [1, 0, 0, 0])
        assert accepted_by(sockets, port, 20) == [20, 0, 0, 0]
        steering.detach(sockets[0])
        assert all(accepted_by(sockets, port, 200))
    finally:
        for sock in sockets:
            sock.close()
