"""Socket addresses as they are written in the config.

    tcp://127.0.0.1:80   tcp://[::1]:80   tcp://0.0.0.0:80   tcp://[::]:80
    udp://0.0.0.0:443    80               (TCP on every address, IPv4 and IPv6)
    unix:/run/app.sock   unix-dgram:/run/log.sock   unix:@abstract-name

A bare port is the one dual-stack form: an IPv6 socket on `::` with IPV6_V6ONLY
off, so it takes IPv4 too.  `tcp://[::]:80` is IPv6 only, so that it can live
beside an explicit `tcp://0.0.0.0:80` (systemd's BindIPv6Only=ipv6-only).
Hosts must be IP literals (or `localhost`): a listening socket bound to a name
that resolves differently tomorrow is a surprise nobody wants.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass


class Kind(enum.Enum):
    TCP = "tcp"
    UDP = "udp"
    UNIX = "unix"
    UNIX_DGRAM = "unix-dgram"


_STREAM_KINDS = (Kind.TCP, Kind.UNIX)
_UNIX_KINDS = (Kind.UNIX, Kind.UNIX_DGRAM)
_UNIX_PATH_MAX = 107  # sizeof(sun_path) - 1 for the NUL


@dataclass(frozen=True)
class Address:
    """A parsed address. `host`/`port` for IP kinds, `path` for Unix kinds.

    An abstract Unix address keeps its `@` in `path`.
    """

    kind: Kind
    host: str | None = None
    port: int | None = None
    path: str | None = None
    dual_stack: bool = False

    @property
    def is_stream(self) -> bool:
        return self.kind in _STREAM_KINDS

    @property
    def is_unix(self) -> bool:
        return self.kind in _UNIX_KINDS

    @property
    def is_abstract(self) -> bool:
        return self.path is not None and self.path.startswith("@")

    @property
    def family(self) -> socket.AddressFamily:
        if self.is_unix:
            return socket.AF_UNIX
        assert self.host is not None
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def type(self) -> socket.SocketKind:
        return socket.SOCK_STREAM if self.is_stream else socket.SOCK_DGRAM

    def sockaddr(self) -> str | tuple[str, int]:
        """What `socket.bind()` and `socket.connect()` take for this address."""
        if self.is_unix:
            assert self.path is not None
            return "\0" + self.path[1:] if self.is_abstract else self.path
        assert self.host is not None and self.port is not None
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.is_unix:
            return f"{self.kind.value}:{self.path}"
        if self.dual_stack:
            return str(self.port)
        host = f"[{self.host}]" if self.family == socket.AF_INET6 else self.host
        return f"{self.kind.value}://{host}:{self.port}"


def _is_number(text: str) -> bool:
    # str.isdigit() alone also accepts digits such as '²' that int() refuses.
    return text.isascii() and text.isdigit()


def parse_port(text: str) -> int:
    """Parse a port number from 1 to 65535; raise ValueError saying what is wrong."""
    if not _is_number(text):
        raise ValueError(f"bad port {text!r}: expected a number from 1 to 65535")
    # Leading zeros are harmless, but a huge number must not reach int(): past 4300
    # digits it raises its own, unrelated error.
    digits = text.lstrip("0") or "0"
    if len(digits) > 5 or not 1 <= int(digits) <= 65535:
        shown = digits if len(digits) <= 20 else digits[:20] + "..."
        raise ValueError(f"bad port {shown}: expected a number from 1 to 65535")
    return int(digits)


def _parse_host(text: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise ValueError(f"bad IPv6 address {text!r}") from None
    if text == "localhost":
        return "127.0.0.1"
    if text == "":
        raise ValueError("missing host: write 0.0.0.0 for every IPv4 address, [::] for IPv6")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"bad host {text!r}: expected an IP address such as 127.0.0.1 or [::1]"
        ) from None
    if ip.version == 6:
        raise ValueError(f"IPv6 address {text!r} must be written in brackets: [{text}]")
    return str(ip)


def _parse_unix(kind: Kind, rest: str, text: str) -> Address:
    if rest.startswith("//"):
        rest = rest[2:]
    if rest == "" or rest == "@":
        raise ValueError(f"bad address {text!r}: missing socket path")
    if not rest.startswith("@") and not rest.startswith("/"):
        raise ValueError(f"bad address {text!r}: a Unix socket path must be absolute")
    if "\0" in rest:
        raise ValueError(f"bad address {text!r}: NUL in socket path")
    try:
        size = len(rest.encode())
    except UnicodeEncodeError:
        raise ValueError(f"bad address {text!r}: socket path is not valid Unicode") from None
    if size > _UNIX_PATH_MAX:
        raise ValueError(
            f"bad address {text!r}: Unix socket paths are limited to {_UNIX_PATH_MAX} bytes"
        )
    return Address(kind, path=rest)


def parse_address(value: str | int) -> Address:
    """Parse one config address; raise ValueError saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected an address such as tcp://0.0.0.0:80, got {value!r}")
    if isinstance(value, int) and not 1 <= value <= 65535:
        # Checked before str(): a huge int cannot even be turned into text.
        shown = value if abs(value) < 10**20 else "out of range"
        raise ValueError(f"bad port {shown}: expected a number from 1 to 65535")
    text = str(value).strip()
    if _is_number(text):
        return Address(Kind.TCP, host="::", port=parse_port(text), dual_stack=True)
    scheme, sep, rest = text.partition(":")
    try:
        kind = Kind(scheme)
    except ValueError:
        kind = None
    if not sep or kind is None:
        raise ValueError(
            f"bad address {text!r}: expected tcp://HOST:PORT, udp://HOST:PORT, a port, "
            "unix:/PATH, unix-dgram:/PATH or unix:@NAME"
        )
    if kind in _UNIX_KINDS:
        return _parse_unix(kind, rest, text)
    if not rest.startswith("//"):
        raise ValueError(f"bad address {text!r}: expected {scheme}://HOST:PORT")
    hostport = rest[2:]
    host, sep, port = hostport.rpartition(":")
    if not sep:
        raise ValueError(f"bad address {text!r}: missing port")
    return Address(kind, host=_parse_host(host), port=parse_port(port))


def _wildcard(addr: Address) -> bool:
    return addr.host in ("0.0.0.0", "::")


def overlaps(a: Address, b: Address) -> bool:
    """Whether binding both addresses would collide (same port or same path)."""
    if a.is_unix or b.is_unix:
        # A path is one file whatever the socket type, so a stream and a datagram socket
        # cannot both bind it. (Linux would allow that pair on an abstract name; one name
        # for two sockets only confuses, so it is refused too.)
        return a.is_unix and b.is_unix and a.path == b.path
    if a.kind != b.kind:
        return False
    if a.port != b.port:
        return False
    if a.host == b.host:
        return True
    if a.dual_stack or b.dual_stack:
        # A dual-stack socket covers every IPv4 and IPv6 address.
        return True
    if a.family != b.family:
        return False
    return _wildcard(a) or _wildcard(b)


# Networks, as allow: and deny: lists name them.
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_network(text: str) -> Network:
    """A network from ``10.0.0.0/8``, ``::1/128`` or a single address (``192.168.1.7``
    is ``192.168.1.7/32``).  An IPv4-mapped IPv6 network becomes the IPv4 one.

    Raise ValueError saying what is wrong.  A network with bits set past its
    prefix (``10.0.0.1/8``) is refused rather than silently widened: it is
    usually a typo for one address or for another prefix, and the two differ
    by sixteen million clients.
    """
    example = "such as 10.0.0.0/8, 192.168.1.7 or ::1/128"
    if "%" in text:
        raise ValueError(f"{text!r}: a zone (%...) cannot be matched; "
                         f"write the address or network without it")
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        try:
            wide = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network ({example})") from None
        single = f"{text.split('/', 1)[0]}/{wide.max_prefixlen}"
        raise ValueError(f"{text!r} has bits set past the /{wide.prefixlen} prefix: "
                         f"write {wide} for the network, or {single} for one address") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = int(network.network_address) & 0xFFFF_FFFF
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network
