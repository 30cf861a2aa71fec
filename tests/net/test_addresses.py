"""Addresses as written in the config: parsing, printing and collisions."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyd.net.addresses import Address, Kind, overlaps, parse_address, parse_port

FORMS = [
    ("tcp://127.0.0.1:80", Address(Kind.TCP, host="127.0.0.1", port=80)),
    ("tcp://0.0.0.0:8080", Address(Kind.TCP, host="0.0.0.0", port=8080)),
    ("tcp://[::1]:443", Address(Kind.TCP, host="::1", port=443)),
    ("tcp://[::]:443", Address(Kind.TCP, host="::", port=443)),
    ("tcp://localhost:25", Address(Kind.TCP, host="127.0.0.1", port=25)),
    ("udp://0.0.0.0:443", Address(Kind.UDP, host="0.0.0.0", port=443)),
    ("udp://[2001:db8::1]:53", Address(Kind.UDP, host="2001:db8::1", port=53)),
    ("80", Address(Kind.TCP, host="::", port=80, dual_stack=True)),
    (80, Address(Kind.TCP, host="::", port=80, dual_stack=True)),
    ("unix:/run/app.sock", Address(Kind.UNIX, path="/run/app.sock")),
    ("unix:///run/app.sock", Address(Kind.UNIX, path="/run/app.sock")),
    ("unix-dgram:/run/log.sock", Address(Kind.UNIX_DGRAM, path="/run/log.sock")),
    ("unix:@lazyd-test", Address(Kind.UNIX, path="@lazyd-test")),
]


@pytest.mark.parametrize(("text", "expected"), FORMS)
def test_every_form_parses(text: str | int, expected: Address) -> None:
    """Each documented address form parses to the expected Address."""
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "expected"), FORMS)
def test_str_round_trips(text: str | int, expected: Address) -> None:
    """Printing an address and parsing it again gives the same address."""
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        ("tcp://127.0.0.1:80", "tcp://127.0.0.1:80"),
        ("tcp://[::]:443", "tcp://[::]:443"),
        ("tcp://[0:0::1]:443", "tcp://[::1]:443"),
        ("udp://0.0.0.0:443", "udp://0.0.0.0:443"),
        (" 80 ", "80"),
        ("unix:/run/app.sock", "unix:/run/app.sock"),
        ("unix-dgram:/run/log.sock", "unix-dgram:/run/log.sock"),
        ("unix:@name", "unix:@name"),
    ],
)
def test_str_is_canonical(text: str, printed: str) -> None:
    """str() prints the canonical way to write an address."""
    assert str(parse_address(text)) == printed


def test_socket_properties() -> None:
    """family, type and sockaddr are what bind() needs for each kind."""
    dual = parse_address("80")
    assert (dual.family, dual.type) == (socket.AF_INET6, socket.SOCK_STREAM)
    assert dual.sockaddr() == ("::", 80)
    udp = parse_address("udp://0.0.0.0:53")
    assert (udp.family, udp.type, udp.is_stream) == (socket.AF_INET, socket.SOCK_DGRAM, False)
    unix = parse_address("unix-dgram:/run/x")
    assert (unix.family, unix.type) == (socket.AF_UNIX, socket.SOCK_DGRAM)
    assert unix.sockaddr() == "/run/x"
    abstract = parse_address("unix:@x")
    assert abstract.is_abstract and abstract.sockaddr() == "\0x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("99999", "bad port 99999: expected a number from 1 to 65535"),
        ("0", "bad port 0: expected a number from 1 to 65535"),
        (0, "bad port 0: expected a number from 1 to 65535"),
        (70000, "bad port 70000: expected a number from 1 to 65535"),
        ("tcp://0.0.0.0:99999", "bad port 99999: expected a number from 1 to 65535"),
        ("tcp://0.0.0.0:http", "bad port 'http': expected a number from 1 to 65535"),
        ("tcp://0.0.0.0:", "bad port '': expected a number from 1 to 65535"),
        ("tcp://0.0.0.0:²", "bad port '²': expected a number from 1 to 65535"),
        ("tcp://0.0.0.0", "bad address 'tcp://0.0.0.0': missing port"),
        ("tcp:0.0.0.0:80", "bad address 'tcp:0.0.0.0:80': expected tcp://HOST:PORT"),
        ("tcp://:80", "missing host: write 0.0.0.0 for every IPv4 address, [::] for IPv6"),
        ("tcp://example.com:80", "bad host 'example.com': expected an IP address such as "
         "127.0.0.1 or [::1]"),
        ("tcp://::1:80", "IPv6 address '::1' must be written in brackets: [::1]"),
        ("tcp://[nope]:80", "bad IPv6 address 'nope'"),
        ("http://0.0.0.0:80", "bad address 'http://0.0.0.0:80': expected tcp://HOST:PORT, "
         "udp://HOST:PORT, a port, unix:/PATH, unix-dgram:/PATH or unix:@NAME"),
        ("unix:", "bad address 'unix:': missing socket path"),
        ("unix:@", "bad address 'unix:@': missing socket path"),
        ("unix:run/x", "bad address 'unix:run/x': a Unix socket path must be absolute"),
        ("unix:/" + "x" * 107, f"bad address 'unix:/{'x' * 107}': Unix socket paths are "
         "limited to 107 bytes"),
        ("unix:/\ud800", "bad address 'unix:/\\ud800': socket path is not valid Unicode"),
        (True, "expected an address such as tcp://0.0.0.0:80, got True"),
        (1.5, "expected an address such as tcp://0.0.0.0:80, got 1.5"),
    ],
)
def test_bad_forms_say_what_is_wrong(text: object, message: str) -> None:
    """A bad address raises ValueError with a message naming the problem."""
    with pytest.raises(ValueError) as caught:
        parse_address(text)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_huge_port_numbers_are_refused_plainly() -> None:
    """A port with thousands of digits is refused like any other bad port."""
    with pytest.raises(ValueError, match=r"^bad port 1{20}\.\.\.: expected"):
        parse_port("1" * 5000)
    with pytest.raises(ValueError, match=r"^bad port out of range"):
        parse_address(10**5000)
    assert parse_port("0080") == 80


@pytest.mark.parametrize(
    ("a", "b", "collide"),
    [
        ("tcp://0.0.0.0:80", "tcp://0.0.0.0:80", True),
        ("tcp://0.0.0.0:80", "tcp://0.0.0.0:81", False),
        ("tcp://0.0.0.0:80", "udp://0.0.0.0:80", False),
        ("tcp://0.0.0.0:80", "tcp://127.0.0.1:80", True),
        ("tcp://127.0.0.1:80", "tcp://127.0.0.2:80", False),
        ("tcp://0.0.0.0:80", "tcp://[::]:80", False),  # [::] is IPv6 only
        ("tcp://[::]:80", "tcp://[::1]:80", True),
        ("tcp://[::1]:80", "tcp://127.0.0.1:80", False),
        ("80", "tcp://0.0.0.0:80", True),  # a bare port takes IPv4 too
        ("80", "tcp://[::]:80", True),
        ("80", "tcp://127.0.0.1:80", True),
        ("80", "80", True),
        ("80", "udp://0.0.0.0:80", False),
        ("80", "tcp://0.0.0.0:81", False),
        ("udp://0.0.0.0:53", "udp://127.0.0.1:53", True),
        ("unix:/run/a", "unix:/run/a", True),
        ("unix:/run/a", "unix:/run/b", False),
        ("unix:/run/a", "unix-dgram:/run/a", True),  # one file system path
        ("unix:@a", "unix:@a", True),
        ("unix:@a", "unix:/a", False),
        ("unix:/run/a", "tcp://0.0.0.0:80", False),
    ],
)
def test_overlaps_truth_table(a: str, b: str, collide: bool) -> None:
    """overlaps() is true exactly when binding both would collide, in either order."""
    assert overlaps(parse_address(a), parse_address(b)) is collide
    assert overlaps(parse_address(b), parse_address(a)) is collide


@given(st.one_of(st.text(max_size=40), st.integers(), st.from_regex(
    r"\A(tcp|udp|unix|unix-dgram|x)?:(//)?(\[[0-9a-f:]*\]|[0-9.]*|@?/?[a-z/]*)(:[0-9]{0,6})?\Z"
)))
def test_any_text_parses_or_raises_value_error(text: str | int) -> None:
    """Whatever is written, parsing gives an address that round-trips, or a ValueError."""
    try:
        address = parse_address(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert parse_address(str(address)) == address
