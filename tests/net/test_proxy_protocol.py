"""PROXY protocol headers, checked against a parser written from haproxy's
proxy-protocol.txt (not from lazyd's encoder), and end to end through a
StreamProxy with real sockets."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from lazyd.front.stream import StreamProxy
from lazyd.net.addresses import Address, Kind
from lazyd.net.proxy_protocol import encode, encode_v1, encode_v2

TIMEOUT = 5.0

# --- a parser, strictly from the spec -----------------------------------------

V2_SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
V1_MAX = 107  # "a receiver ... may reject any line longer than 107 bytes" (CRLF included)


class BadHeader(ValueError):
    pass


@dataclass(frozen=True)
class Header:
    version: int
    command: str  # PROXY, LOCAL (v2) or UNKNOWN (v1)
    family: str | None = None  # TCP4, TCP6
    source: str | None = None
    dest: str | None = None
    source_port: int | None = None
    dest_port: int | None = None


def _port(text: bytes) -> int:
    # Ports are decimal 0..65535; the spec forbids leading zeroes.
    if not text.isdigit() or (len(text) > 1 and text.startswith(b"0")) or int(text) > 65535:
        raise BadHeader(f"bad port {text!r}")
    return int(text)


def _parse_v1(data: bytes) -> tuple[Header, bytes]:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        raise BadHeader("no CRLF within 107 bytes")
    line, rest = data[:end], data[end + 2 :]
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return Header(1, "UNKNOWN"), rest
    parts = line.split(b" ")  # exactly one space between fields
    if len(parts) != 6 or parts[0] != b"PROXY" or parts[1] not in (b"TCP4", b"TCP6"):
        raise BadHeader(f"bad v1 line {line!r}")
    family = parts[1].decode()
    kind = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    try:
        src, dst = kind(parts[2].decode()), kind(parts[3].decode())
    except ValueError as exc:
        raise BadHeader(str(exc)) from None
    return Header(1, "PROXY", family, str(src), str(dst), _port(parts[4]), _port(parts[5])), rest


def _parse_v2(data: bytes) -> tuple[Header, bytes]:
    if len(data) < 16:
        raise BadHeader("short v2 header")
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd >> 4 != 2:
        raise BadHeader(f"version {ver_cmd >> 4}")
    if len(data) < 16 + length:
        raise BadHeader("truncated v2 header")
    body, rest = data[16 : 16 + length], data[16 + length :]
    command = {0: "LOCAL", 1: "PROXY"}.get(ver_cmd & 0xF)
    if command is None:
        raise BadHeader(f"command {ver_cmd & 0xF}")
    if command == "LOCAL":
        return Header(2, "LOCAL"), rest  # the receiver uses the real endpoints
    if fam == 0x11:  # TCP over IPv4: 4 + 4 + 2 + 2
        if length < 12:
            raise BadHeader("short TCP4 block")
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        return Header(2, "PROXY", "TCP4", str(src), str(dst), sport, dport), rest
    if fam == 0x21:  # TCP over IPv6: 16 + 16 + 2 + 2
        if length < 36:
            raise BadHeader("short TCP6 block")
        src6, dst6 = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
        return Header(2, "PROXY", "TCP6", str(src6), str(dst6), sport, dport), rest
    if fam == 0x00:
        return Header(2, "PROXY"), rest  # UNSPEC: unknown protocol
    raise BadHeader(f"family/protocol {fam:#x}")


def parse(data: bytes) -> tuple[Header, bytes]:
    """The header at the start of `data`, and what follows it."""
    if data.startswith(V2_SIG):
        return _parse_v2(data)
    if data.startswith(b"PROXY "):
        return _parse_v1(data)
    raise BadHeader("no PROXY header")


# --- the encoder alone ---------------------------------------------------------


def test_v1_tcp4() -> None:
    """A v1 header names TCP4, both addresses and both ports, in that order."""
    header = encode_v1(("192.0.2.7", 51234), ("198.51.100.1", 80))
    assert header == b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 80\r\n"
    assert parse(header + b"GET /") == (
        Header(1, "PROXY", "TCP4", "192.0.2.7", "198.51.100.1", 51234, 80), b"GET /"
    )


def test_v1_longest_line_fits() -> None:
    """The longest v1 line (two full IPv6 addresses, 5-digit ports) stays within 107 bytes."""
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
    header = encode_v1((full, 65535, 0, 0), (full, 65534, 0, 0))
    assert len(header) <= V1_MAX
    assert parse(header)[0] == Header(1, "PROXY", "TCP6", full, full, 65535, 65534)


def test_v2_tcp6() -> None:
    """A v2 header has the signature, 0x21, 0x21 and 36 bytes of addresses and ports."""
    header = encode_v2(("2001:db8::7", 4000, 0, 0), ("2001:db8::1", 443, 0, 0))
    assert header[:12] == V2_SIG and header[12] == 0x21 and header[13] == 0x21
    assert struct.unpack("!H", header[14:16]) == (36,)
    assert parse(header) == (Header(2, "PROXY", "TCP6", "2001:db8::7", "2001:db8::1", 4000, 443),
                             b"")


def test_v4_mapped_client_is_sent_as_tcp4() -> None:
    """An IPv4 client of a dual-stack socket is reported as plain TCP4, in both versions."""
    peer, local = ("::ffff:192.0.2.7", 5000, 0, 0), ("::ffff:192.0.2.1", 80, 0, 0)
    expected = ("TCP4", "192.0.2.7", "192.0.2.1", 5000, 80)
    for header in (encode_v1(peer, local), encode_v2(peer, local)):
        h = parse(header)[0]
        assert (h.family, h.source, h.dest, h.source_port, h.dest_port) == expected


def test_unix_client_is_unknown_or_local() -> None:
    """A Unix client gives v1 'PROXY UNKNOWN' and v2 LOCAL with family UNSPEC, no addresses."""
    assert encode_v1("", "/run/app.sock") == b"PROXY UNKNOWN\r\n"
    v2 = encode_v2(b"", "/run/app.sock")
    assert v2 == V2_SIG + bytes([0x20, 0x00, 0, 0])
    assert parse(v2) == (Header(2, "LOCAL"), b"")


def test_unknown_version_is_refused() -> None:
    """Only v1 and v2 exist."""
    with pytest.raises(ValueError, match="v3"):
        encode("v3", ("127.0.0.1", 1), ("127.0.0.1", 2))


# --- end to end -----------------------------------------------------------------


@asynccontextmanager
async def proxy_to_recorder(
    version: str, listener: socket.socket
) -> AsyncIterator[tuple[StreamProxy, list[bytes]]]:
    """A released StreamProxy whose upstream records the first bytes of each connection."""
    seen: list[bytes] = []
    backend = trio.socket.socket()
    await backend.bind(("127.0.0.1", 0))
    backend.listen(16)
    host, port = backend.getsockname()

    async def record(stream: trio.SocketStream) -> None:
        data = b""
        while not data.endswith(b"hello"):
            chunk = await stream.receive_some()
            if not chunk:
                break
            data += chunk
        seen.append(data)
        await stream.send_all(b"ok")

    proxy = StreamProxy("svc", listener, Address(Kind.TCP, host=host, port=port),
                        queue_limit=8, proxy_protocol=version,
                        on_traffic=lambda: None, log=lambda line: None)
    async with trio.SocketListener(backend) as backend_listener, trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, record, [backend_listener])
        await nursery.start(proxy.run)
        proxy.release()
        yield proxy, seen
        nursery.cancel_scope.cancel()


async def exchange(stream: trio.abc.Stream) -> None:
    async with stream:
        await stream.send_all(b"hello")
        assert await stream.receive_some() == b"ok"


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_service_learns_the_real_tcp_client(version: str) -> None:
    """Through the proxy, the header carries the client's own address and port and lazyd's."""
    with socket.socket() as listener, trio.fail_after(TIMEOUT):
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        async with proxy_to_recorder(version, listener) as (_proxy, seen):
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            client_port = sock.getsockname()[1]
            await sock.connect(listener.getsockname())
            await exchange(trio.SocketStream(sock))
        header, rest = parse(seen[0])
        assert rest == b"hello"
        assert header.version == int(version[1])
        assert (header.command, header.family) == ("PROXY", "TCP4")
        assert (header.source, header.source_port) == ("127.0.0.1", client_port)
        assert (header.dest, header.dest_port) == listener.getsockname()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_tcp6_client(version: str) -> None:
    """An IPv6 client is reported as TCP6 with its address and port."""
    with socket.socket(socket.AF_INET6) as listener, trio.fail_after(TIMEOUT):
        listener.bind(("::1", 0))
        listener.listen(16)
        async with proxy_to_recorder(version, listener) as (_proxy, seen):
            sock = trio.socket.socket(socket.AF_INET6)
            await sock.bind(("::1", 0))
            client_port = sock.getsockname()[1]
            await sock.connect(listener.getsockname())
            await exchange(trio.SocketStream(sock))
        header, rest = parse(seen[0])
        assert rest == b"hello"
        assert (header.family, header.source, header.source_port) == ("TCP6", "::1", client_port)
        assert (header.dest, header.dest_port) == ("::1", listener.getsockname()[1])


@pytest.mark.parametrize(("version", "command"), [("v1", "UNKNOWN"), ("v2", "LOCAL")])
async def test_unix_client(version: str, command: str, tmp_path: Path) -> None:
    """A Unix-socket client gets a header that says "no address", then its bytes."""
    path = str(tmp_path / "front.sock")
    with socket.socket(socket.AF_UNIX) as listener, trio.fail_after(TIMEOUT):
        listener.bind(path)
        listener.listen(16)
        async with proxy_to_recorder(version, listener) as (_proxy, seen):
            await exchange(await trio.open_unix_socket(path))
        header, rest = parse(seen[0])
        assert (header.command, header.source, rest) == (command, None, b"hello")
