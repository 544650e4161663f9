"""The PROXY protocol (v1 and v2), as HAProxy's `send-proxy` and cloud L4 load balancers send it:
a header before the client's first byte, saying who the client is.

Protocol logic only, no I/O (as websockets' Sans-I/O layer): :func:`parse` takes the bytes
received so far and says whether the header is complete, what it says, and how long it was.
The connection that uses it is :class:`wsfleet.connection.ProxiedConnection`.
Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class ProxyError(ValueError):
    """Not a valid PROXY header: the connection is closed."""


def parse(data: bytes | bytearray) -> tuple[str | None, int] | None:
    """None while more bytes are needed; else (client address or None, header length).

    The address is None for a header that names no client (v1 UNKNOWN, v2 LOCAL or an
    unsupported family): the connection's own peer is then the client.
    """
    head = bytes(data[:12])
    if head == V2_SIGNATURE:
        return _parse_v2(data) if len(data) >= 16 else None
    if V2_SIGNATURE.startswith(head):  # a beginning of the v2 signature (or nothing yet)
        return None
    if data[:6] == V1_PREFIX:
        return _parse_v1(data)
    if V1_PREFIX.startswith(head[:6]):
        return None
    raise ProxyError("the connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes | bytearray) -> tuple[str | None, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError("PROXY v1 header longer than 107 bytes")
        return None
    fields = bytes(data[:end]).decode("ascii", "replace").split(" ")
    if fields[1:2] == ["UNKNOWN"]:
        return None, end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyError(f"malformed PROXY v1 header: {bytes(data[:end])[:60]!r}")
    source = fields[2]
    try:
        address = ipaddress.ip_address(source)
        ports_ok = all(0 <= int(p) <= 65535 for p in fields[4:6])
    except ValueError:
        raise ProxyError(f"malformed PROXY v1 addresses: {bytes(data[:end])[:60]!r}") from None
    if not ports_ok or (address.version == 4) != (fields[1] == "TCP4"):
        raise ProxyError(f"malformed PROXY v1 header: {bytes(data[:end])[:60]!r}")
    return str(address), end + 2


def _parse_v2(data: bytes | bytearray) -> tuple[str | None, int] | None:
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2 or version_command & 0xF not in (0, 1):
        raise ProxyError(f"unsupported PROXY v2 version/command {version_command:#x}")
    total = 16 + length
    if len(data) < total:
        return None
    if version_command & 0xF == 0:  # LOCAL: the proxy's own connection (a health check)
        return None, total
    if family == 0x11 and length >= 12:  # TCP over IPv4
        return str(ipaddress.IPv4Address(bytes(data[16:20]))), total
    if family == 0x21 and length >= 36:  # TCP over IPv6
        return str(ipaddress.IPv6Address(bytes(data[16:32]))), total
    if family in (0x11, 0x21):
        raise ProxyError("PROXY v2 header too short for its addresses")
    return None, total  # UNSPEC, UDP, Unix: no client address to use
