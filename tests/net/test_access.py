"""allow / deny and max_connections_per_source: matching, config, and the real daemon."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyd.config import loads, plan
from lazyd.errors import ConfigError
from lazyd.net.access import REPORT_INTERVAL, Access, IPAddress, client_address, refusal
from lazyd.net.addresses import Network, parse_network
from tests.conftest import free_port, program, run_lazyd
from tests.observe.test_metrics import scrape, value

TRUE = "/bin/true"

# --- Matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.168.1.7", "192.168.1.7/32"),
        ("::1", "::1/128"),
        ("::1/128", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),  # IPv4-mapped: the IPv4 network
        ("::ffff:192.168.1.7", "192.168.1.7/32"),
    ],
)
def test_parse_network_forms(text: str, network: str) -> None:
    """Networks, single addresses and IPv4-mapped forms all read as the network meant."""
    assert parse_network(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/8", "'10.0.0.1/8' has bits set past the /8 prefix: write 10.0.0.0/8 for "
                       "the network, or 10.0.0.1/32 for one address"),
        ("2001:db8::1/32", "'2001:db8::1/32' has bits set past the /32 prefix: write "
                           "2001:db8::/32 for the network, or 2001:db8::1/128 for one address"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP address or network "
                        "(such as 10.0.0.0/8, 192.168.1.7 or ::1/128)"),
        ("example.com", "'example.com' is not an IP address or network "
                        "(such as 10.0.0.0/8, 192.168.1.7 or ::1/128)"),
        ("fe80::1%eth0", "'fe80::1%eth0': a zone (%...) cannot be matched; "
                         "write the address or network without it"),
    ],
)
def test_parse_network_refuses(text: str, message: str) -> None:
    """A network with host bits set, a bad prefix, a name or a zone is refused, saying why."""
    with pytest.raises(ValueError) as caught:
        parse_network(text)
    assert str(caught.value) == message


ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@st.composite
def address_and_network(draw: st.DrawFn) -> tuple[IPAddress, Network]:
    """A network, and an address that is inside it about half the time."""
    base = draw(st.one_of(ipv4, ipv6))
    network = ipaddress.ip_network((base, draw(st.integers(0, base.max_prefixlen))), strict=False)
    if draw(st.booleans()):
        offset = draw(st.integers(0, network.num_addresses - 1))
        return ipaddress.ip_address(int(network.network_address) + offset), network
    other: IPAddress = draw(ipv4) if network.version == 4 else draw(ipv6)
    return other, network


def _peers(address: IPAddress) -> list[Any]:
    """How accept() or recvfrom() reports a client at `address`: an IPv4 client also
    as it reaches a dual-stack socket (IPv4-mapped)."""
    if isinstance(address, ipaddress.IPv4Address):
        return [(str(address), 4242), (f"::ffff:{address}", 4242, 0, 0)]
    return [(str(address), 4242, 0, 0)]


@settings(max_examples=500)
@given(address_and_network())
def test_deny_and_allow_agree_with_ipaddress(pair: tuple[IPAddress, Network]) -> None:
    """A rule written as text refuses or admits exactly the clients ipaddress puts in it."""
    address, network = pair
    rule = parse_network(network.with_prefixlen)
    inside = address in network
    access = Access("web", max_per_source=None, log=lambda line: None, clock=lambda: 0.0)
    deny, allow = access.gate("udp", deny=[rule]), access.gate("udp", allow=[rule])
    assert deny is not None and allow is not None
    for peer in _peers(address):
        client = client_address(peer)
        assert client == address
        assert (refusal(None, [rule], client) == "denied") is inside
        assert (refusal([rule], [], client) is None) is inside
        assert refusal([rule], [rule], client) == ("denied" if inside else "not allowed")
        for _ in range(2):  # the second time from the gate's memory
            assert deny.admit_datagram(peer) is not inside
            assert allow.admit_datagram(peer) is inside


@settings(max_examples=300)
@given(ipv4, st.integers(0, 32), ipv4)
def test_mapped_networks_match_as_ipv4(base: ipaddress.IPv4Address, prefix: int,
                                       address: ipaddress.IPv4Address) -> None:
    """::ffff:A/96+N in a rule matches exactly the IPv4 clients A/N does."""
    network = ipaddress.IPv4Network((base, prefix), strict=False)
    rule = parse_network(f"::ffff:{network.network_address}/{96 + prefix}")
    assert rule == network
    for peer in _peers(address):
        client = client_address(peer)
        assert client is not None
        assert (refusal(None, [rule], client) == "denied") is (address in network)


@settings(max_examples=300)
@given(st.one_of(ipv4, ipv6), st.integers(0, 128))
def test_host_bits_are_refused_exactly_when_ipaddress_says_so(
    address: IPAddress, prefix: int
) -> None:
    """`A/N` is refused exactly when ipaddress's strict reading finds host bits set."""
    prefix = min(prefix, address.max_prefixlen)
    text = f"{address}/{prefix}"
    try:
        expected = ipaddress.ip_network(text)
    except ValueError:
        with pytest.raises(ValueError, match="has bits set past"):
            parse_network(text)
    else:
        mapped = isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped
        if not (mapped and prefix >= 96):
            assert parse_network(text) == expected


def test_deny_wins_over_allow() -> None:
    """A client in both an allow and a deny network is refused; allow=None admits the rest."""
    allow = [parse_network("10.0.0.0/8")]
    deny = [parse_network("10.1.0.0/16")]
    assert refusal(allow, deny, ipaddress.ip_address("10.1.2.3")) == "denied"
    assert refusal(allow, deny, ipaddress.ip_address("10.2.0.1")) is None
    assert refusal(allow, deny, ipaddress.ip_address("192.168.0.1")) == "not allowed"
    assert refusal(None, deny, ipaddress.ip_address("192.168.0.1")) is None
    # An IPv4 client is not in an IPv6 network, ::/0 included.
    assert refusal([parse_network("::/0")], [], ipaddress.ip_address("10.1.2.3")) == "not allowed"


def test_unix_peers_have_no_address() -> None:
    """A Unix client (peer '' or a path) is not an IP client: nothing matches or counts it."""
    assert client_address("") is None
    assert client_address(b"\0abstract") is None
    assert client_address("/run/x.sock") is None


# --- Access and Gate, in-process ------------------------------------------------------


def _accepted(listener: socket.socket, source: str = "127.0.0.1") -> tuple[socket.socket, ...]:
    client = socket.socket()
    client.settimeout(5)
    client.bind((source, 0))
    client.connect(listener.getsockname())
    server, peer = listener.accept()
    return client, server, peer


def test_refused_connection_is_reset() -> None:
    """A connection the rules refuse is closed with a reset: its client's recv fails at once."""
    lines: list[str] = []
    access = Access("web", max_per_source=None, log=lines.append, clock=lambda: 0.0)
    gate = access.gate("http", deny=[parse_network("127.0.0.1")])
    assert gate is not None
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client, server, peer = _accepted(listener)
        with client, server:
            assert gate.admit(server, peer) is False
            assert server.fileno() == -1
            with pytest.raises(ConnectionResetError):
                client.recv(1)
    assert access.refused == 1
    assert lines == ["web: refused a connection from 127.0.0.1 on http (denied)"]


def test_per_source_limit_counts_until_release() -> None:
    """max_per_source=2: a third connection from one address is refused, another address
    is not, and a release makes room again."""
    access = Access("web", max_per_source=2, log=lambda line: None, clock=lambda: 0.0)
    gate = access.gate("http")
    assert gate is not None
    with socket.create_server(("127.0.0.1", 0)) as listener:
        first = [_accepted(listener) for _ in range(2)]
        assert all(gate.admit(server, peer) for _c, server, peer in first)
        client, server, peer = _accepted(listener)
        assert gate.admit(server, peer) is False
        client.close()
        other = _accepted(listener, "127.0.0.2")
        assert gate.admit(other[1], other[2]) is True
        assert access.open == {ipaddress.ip_address("127.0.0.1"): 2,
                               ipaddress.ip_address("127.0.0.2"): 1}
        gate.release(first[0][2])
        again = _accepted(listener)
        assert gate.admit(again[1], again[2]) is True
        for gate_peer in (first[1][2], again[2], other[2]):
            gate.release(gate_peer)
        gate.release(first[0][2])  # a Unix-like stray release never goes below zero
        assert access.open == {}
        assert access.refused == 1
        for sockets in (*first, other, again):
            for sock in sockets[:2]:
                sock.close()


def test_no_gate_without_rules_or_a_counted_limit() -> None:
    """A socket with no rules gets no gate (nothing is checked per connection), nor does a
    datagram or Unix socket when only the per-source limit is set."""
    assert Access("web", max_per_source=None, log=print).gate("http") is None
    assert Access("web", max_per_source=3, log=print).gate("quic", counted=False) is None
    assert Access("web", max_per_source=3, log=print).gate("http") is not None


def test_refusals_are_logged_once_per_interval() -> None:
    """A burst of refusals costs one log line; the next line, after REPORT_INTERVAL, says
    how many went unreported meanwhile."""
    now = [0.0]
    lines: list[str] = []
    access = Access("web", max_per_source=None, log=lines.append, clock=lambda: now[0])
    gate = access.gate("quic", deny=[parse_network("10.0.0.0/8")])
    assert gate is not None
    for i in range(100):
        now[0] = i * 0.01
        assert gate.admit_datagram((f"10.0.0.{i}", 53)) is False
    assert gate.admit_datagram(("192.0.2.1", 53)) is True
    now[0] = REPORT_INTERVAL + 0.5
    assert gate.admit_datagram(("::ffff:10.9.9.9", 53, 0, 0)) is False
    assert access.refused == 101
    assert lines == [
        "web: refused a datagram from 10.0.0.0 on quic (denied)",
        "web: refused a datagram from 10.9.9.9 on quic (denied); 99 more refused since the "
        "last report",
    ]


# --- Config ---------------------------------------------------------------------------


def proxy_config(socket_keys: str = "", service_keys: str = "", *, mode: str = "proxy",
                 listen: str = "tcp://127.0.0.1:8080",
                 upstream: str = "tcp://127.0.0.1:8081") -> str:
    upstream_key = f", upstream: {upstream}" if mode == "proxy" else ""
    return (
        "services:\n"
        "  web:\n"
        f"    mode: {mode}\n"
        f"    command: [{TRUE}]\n"
        + (f"    {service_keys}\n" if service_keys else "")
        + "    sockets:\n"
        f"      http: {{listen: {listen}{upstream_key}{socket_keys}}}\n"
    )


def test_allow_deny_and_limit_are_read() -> None:
    """allow/deny take a list or one network; max_connections_per_source a whole number."""
    config = loads(proxy_config(", allow: [10.0.0.0/8, '::1', 1:2:3:4:5:6:7:8], "
                                "deny: 10.1.0.0/16", "max_connections_per_source: 3"),
                   "lazyd.yaml", as_root=False)
    web = config.services["web"]
    assert web.max_connections_per_source == 3
    (http,) = web.sockets
    # 1:2:3:4:5:6:7:8 is a number in YAML 1.1 (base 60); the text as written counts.
    assert http.allow == tuple(map(ipaddress.ip_network,
                                   ["10.0.0.0/8", "::1/128", "1:2:3:4:5:6:7:8/128"]))
    assert http.deny == (ipaddress.ip_network("10.1.0.0/16"),)
    assert "(allow 10.0.0.0/8, ::1/128, 1:2:3:4:5:6:7:8/128, deny 10.1.0.0/16)" in plan(config)


def test_defaults_admit_everyone() -> None:
    """Without the keys a socket has no rules, and a service the default per-source limit."""
    web = loads(proxy_config(), "lazyd.yaml", as_root=False).services["web"]
    assert (web.sockets[0].allow, web.sockets[0].deny) == (None, ())
    assert web.max_connections_per_source == 256


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (proxy_config(", allow: [10.0.0.1/8]"),
         "lazyd.yaml:6:84: services.web.sockets.http.allow: '10.0.0.1/8' has bits set past the "
         "/8 prefix: write 10.0.0.0/8 for the network, or 10.0.0.1/32 for one address"),
        (proxy_config(", deny: [10.0.0.0/8, 300.1.2.3]"),
         "lazyd.yaml:6:95: services.web.sockets.http.deny: '300.1.2.3' is not an IP address or "
         "network (such as 10.0.0.0/8, 192.168.1.7 or ::1/128)"),
        (proxy_config(", allow: []"),
         "lazyd.yaml:6:83: services.web.sockets.http.allow: an empty allow list would refuse "
         "every client; list who may connect, or leave allow out"),
        (proxy_config(", deny: {a: 1}"),
         "lazyd.yaml:6:82: services.web.sockets.http.deny: expected a list of networks such as "
         "[10.0.0.0/8, ::1], got a mapping"),
        (proxy_config(", deny: [[1]]"),
         "lazyd.yaml:6:83: services.web.sockets.http.deny: expected an IP address or network, "
         "got a list"),
        (proxy_config(", allow: 10.0.0.0/8", mode="pass"),
         "lazyd.yaml:6:51: services.web.sockets.http.allow: allow only applies to mode: proxy "
         "(in pass mode the service accepts its connections itself, so lazyd never sees who "
         "connects)"),
        (proxy_config(", deny: ['::1']", listen="unix:/run/lazyd-test.sock"),
         "lazyd.yaml:6:87: services.web.sockets.http.deny: deny only applies to TCP and UDP "
         "sockets (a Unix socket's clients have no IP address; use mode, owner and group)"),
        (proxy_config(service_keys="max_connections_per_source: 2", mode="pass"),
         "lazyd.yaml:5:33: services.web.max_connections_per_source: max_connections_per_source "
         "only applies to mode: proxy"),
        (proxy_config(service_keys="max_connections_per_source: 0"),
         "lazyd.yaml:5:33: services.web.max_connections_per_source: expected a whole number "
         "from 1 to 2147483647, got 0"),
    ],
)
def test_config_problems(text: str, expected: str) -> None:
    """Each mistake is one problem at FILE:LINE:COL naming the key and the offending value."""
    with pytest.raises(ConfigError) as caught:
        loads(text, "lazyd.yaml", as_root=False)
    assert str(caught.value) == expected


def test_allow_on_udp_sockets_is_fine() -> None:
    """allow/deny apply to UDP sockets in proxy mode too."""
    config = loads(proxy_config(", allow: 127.0.0.0/8", listen="udp://127.0.0.1:5353",
                                upstream="udp://127.0.0.1:5354"), "lazyd.yaml", as_root=False)
    assert config.services["web"].sockets[0].allow == (ipaddress.ip_network("127.0.0.0/8"),)


# --- The real daemon ------------------------------------------------------------------


def _service(port: int, upstream: int, socket_keys: str = "", *extra: str,
             kind: str = "tcp", backend: tuple[str, ...] = ("--echo",)) -> str:
    lines = [
        "services:",
        "  web:",
        "    mode: proxy",
        f"    command: {program('backend.py', f'{kind}:127.0.0.1:{upstream}', *backend)}",
        "    user: root",
        *(f"    {e}" for e in extra),
        "    sockets:",
        f"      main: {{listen: '{kind}://127.0.0.1:{port}', upstream: '{kind}://127.0.0.1:"
        f"{upstream}'{socket_keys}}}",
    ]
    return "\n".join(lines) + "\n"


async def _connect(port: int, source: str = "127.0.0.1") -> trio.socket.SocketType:
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _assert_refused(port: int, source: str = "127.0.0.1") -> None:
    """The connection is accepted by the kernel, then reset by lazyd at once: the reset
    reaches the client during its connect or ends its first recv; nothing hangs."""
    with trio.fail_after(5):
        try:
            sock = await _connect(port, source)
            with sock:
                data = await sock.recv(1)
        except ConnectionResetError:
            return
        assert data == b"", "a refused connection carried data"


async def _expect(sock: trio.socket.SocketType, payload: bytes) -> None:
    received = b""
    with trio.fail_after(10):
        while len(received) < len(payload):
            chunk = await sock.recv(65536)
            assert chunk, "closed before the echo came back"
            received += chunk
    assert received == payload


async def _echo(sock: trio.socket.SocketType, payload: bytes) -> None:
    await sock.send(payload)
    await _expect(sock, payload)


async def test_denied_client_is_reset_and_starts_nothing(tmp_path: Path) -> None:
    """deny: [127.0.0.1] resets every client from 127.0.0.1 at once, counts each (status
    and metrics), logs one line for the burst, and the service is never started."""
    port, upstream, metrics = free_port(), free_port(), free_port()
    config = f"metrics: tcp://127.0.0.1:{metrics}\n" + _service(
        port, upstream, ", deny: [127.0.0.1]")
    async with run_lazyd(tmp_path, config) as lz:
        for _ in range(5):
            await _assert_refused(port)
        svc = (await lz.status())["web"]
        assert (svc["state"], svc["activations"], svc["refused"]) == ("idle", 0, 5)
        samples = await scrape(metrics)
        assert value(samples, "lazyd_refused", "lazyd_refused_total", service="web") == 5
        await lz.stop()
        await lz.wait_line(r"^lazyd: stopped")
    refused = [line for line in lz.lines if "refused" in line]
    assert refused == ["web: refused a connection from 127.0.0.1 on main (denied)"]


async def test_allow_admits_only_the_listed_source(tmp_path: Path) -> None:
    """allow: [127.0.0.2/32] serves a client bound to 127.0.0.2 and resets one from
    127.0.0.1, which does not start the service."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, _service(port, upstream, ", allow: [127.0.0.2/32]")) as lz:
        await _assert_refused(port, "127.0.0.1")
        assert (await lz.status())["web"]["state"] == "idle"
        with await _connect(port, "127.0.0.2") as sock:
            await _echo(sock, b"hello from 127.0.0.2\n")
        svc = (await lz.status())["web"]
        assert (svc["state"], svc["activations"], svc["refused"]) == ("running", 1, 1)
        await _assert_refused(port, "127.0.0.1")  # and while it runs
        assert (await lz.status())["web"]["refused"] == 2


async def test_denied_datagrams_are_dropped_and_start_nothing(tmp_path: Path) -> None:
    """UDP deny: datagrams from a denied source are counted and dropped; they start
    nothing and, once another client has started the service, open no flow."""
    port, upstream = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    # A datagram upstream cannot be probed: give the backend time to bind.
    config = _service(port, upstream, ", deny: [127.0.0.1]", "ready: {delay: 400ms}",
                      kind="udp", backend=())
    async with run_lazyd(tmp_path, config) as lz:
        with trio.socket.socket(type=socket.SOCK_DGRAM) as denied, \
                trio.socket.socket(type=socket.SOCK_DGRAM) as allowed:
            await denied.bind(("127.0.0.1", 0))
            await allowed.bind(("127.0.0.2", 0))
            for i in range(3):
                await denied.sendto(b"denied %d" % i, ("127.0.0.1", port))
            svc = await lz.wait_status("web", refused=3)
            assert (svc["state"], svc["activations"], svc["queued"]) == ("idle", 0, 0)
            await allowed.sendto(b"hello", ("127.0.0.1", port))
            with trio.fail_after(10):
                reply = await allowed.recv(65536)
            assert reply.endswith(b" hello")
            await denied.sendto(b"denied again", ("127.0.0.1", port))
            svc = await lz.wait_status("web", refused=4)
            assert (svc["state"], svc["active"]) == ("running", 1)  # one flow: 127.0.0.2's


async def test_max_connections_per_source(tmp_path: Path) -> None:
    """max_connections_per_source: 3 holds three connections from 127.0.0.1 while the
    service starts and serves them, resets a fourth, still admits 127.0.0.2, and admits
    127.0.0.1 again once one of its connections has closed."""
    port, upstream = free_port(), free_port()
    config = _service(port, upstream, "", "max_connections_per_source: 3",
                      backend=("--echo", "--delay", "0.5"))
    async with run_lazyd(tmp_path, config) as lz:
        first = [await _connect(port) for _ in range(3)]
        try:
            for i, sock in enumerate(first):
                await sock.send(b"held %d\n" % i)
            await _assert_refused(port)  # while the three are held
            svc = (await lz.status())["web"]
            assert (svc["state"], svc["queued"], svc["refused"]) == ("starting", 3, 1)
            for i, sock in enumerate(first):
                await _expect(sock, b"held %d\n" % i)
                await _echo(sock, b"and served %d\n" % i)
            await _assert_refused(port)  # while they are forwarded
            with await _connect(port, "127.0.0.2") as other:
                await _echo(other, b"another source\n")
                first.pop().close()
                await lz.wait_status("web", active=3)
                with await _connect(port) as again:
                    await _echo(again, b"room again\n")
            assert (await lz.status())["web"]["refused"] == 2
        finally:
            for sock in first:
                sock.close()
