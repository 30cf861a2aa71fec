"""PROXY protocol headers (haproxy's proxy-protocol.txt), as lazyd sends them.

In proxy mode the service's peer is lazyd, not the client.  A service that
speaks the PROXY protocol learns the real client from one header lazyd writes
before anything else on the upstream connection:

    v1  b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 80\\r\\n"     text, at most 107 bytes
    v2  signature, 0x21, 0x11, length, addresses, ports        binary, big-endian

lazyd only sends, so this module only encodes.  Addresses are what
`socket.getpeername()` / `getsockname()` return.  A client that is not on IPv4
or IPv6 (a Unix socket client) has no address worth sending: v1 then says
`PROXY UNKNOWN`, v2 sends the LOCAL command with family UNSPEC, and the spec
tells the receiver to use the connection's own endpoints.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSIONS = ("v1", "v2")

_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL
_V2_TCP4 = 0x11  # AF_INET, STREAM
_V2_TCP6 = 0x21  # AF_INET6, STREAM
_V2_UNSPEC = 0x00

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_endpoint(address: Any) -> tuple[IPAddress, int] | None:
    """(ip, port) for an IPv4/IPv6 socket address, None for anything else."""
    if not isinstance(address, tuple) or len(address) not in (2, 4):
        return None
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        # A scoped IPv6 literal ("fe80::1%eth0") carries its zone, which the
        # header has no room for; the address without it is still the client.
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    return ip, port


def _endpoints(peer: Any, local: Any) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]] | None:
    """Both ends as one IP version, or None when the header must say "unknown"."""
    source, dest = _ip_endpoint(peer), _ip_endpoint(local)
    if source is None or dest is None:
        return None
    (src_ip, src_port), (dst_ip, dst_port) = source, dest
    # An IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d.  Say
    # TCP4 with the plain address: that is what the client really used, and
    # what a service comparing against IPv4 allow-lists expects.
    if isinstance(src_ip, ipaddress.IPv6Address) and src_ip.ipv4_mapped is not None:
        src_ip = src_ip.ipv4_mapped
    if isinstance(dst_ip, ipaddress.IPv6Address) and dst_ip.ipv4_mapped is not None:
        dst_ip = dst_ip.ipv4_mapped
    if src_ip.version != dst_ip.version:
        return None
    return (src_ip, src_port), (dst_ip, dst_port)


def encode_v1(peer: Any, local: Any) -> bytes:
    """The text header for a connection from `peer` to lazyd's `local` address."""
    ends = _endpoints(peer, local)
    if ends is None:
        return b"PROXY UNKNOWN\r\n"
    (src_ip, src_port), (dst_ip, dst_port) = ends
    proto = "TCP4" if src_ip.version == 4 else "TCP6"
    # str() of an ipaddress object is the canonical form the spec asks for
    # (dotted quad; RFC 5952 for IPv6).  The longest possible line, two full
    # IPv6 addresses and two 5-digit ports, is 104 bytes: within the 107 limit.
    return f"PROXY {proto} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v2(peer: Any, local: Any) -> bytes:
    """The binary header for a connection from `peer` to lazyd's `local` address."""
    ends = _endpoints(peer, local)
    if ends is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, _V2_UNSPEC, 0)
    (src_ip, src_port), (dst_ip, dst_port) = ends
    family = _V2_TCP4 if src_ip.version == 4 else _V2_TCP6
    body = src_ip.packed + dst_ip.packed + struct.pack("!HH", src_port, dst_port)
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


def encode(version: str, peer: Any, local: Any) -> bytes:
    """The header for `version` ("v1" or "v2")."""
    if version == "v1":
        return encode_v1(peer, local)
    if version == "v2":
        return encode_v2(peer, local)
    raise ValueError(f"unknown PROXY protocol version {version!r}: expected v1 or v2")
