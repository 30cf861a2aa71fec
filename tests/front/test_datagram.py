"""DatagramProxy with real UDP and unix-dgram sockets: queueing, flows, replies, expiry."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from lazyd.net.addresses import Address, Kind
from tests.conftest import proxying

TIMEOUT = 5.0


def held_socket(made: list[socket.socket], family: socket.AddressFamily, address: Any
                ) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    made.append(sock)
    sock.bind(address)  # left blocking, as lazyd.runtime.binding binds it
    return sock


class Echo:
    """The service: records what it receives, and answers "<sender as seen>|<datagram>"."""

    def __init__(self, sock: trio.socket.SocketType, reply: bool = True) -> None:
        self.sock = sock
        self.reply = reply
        self.seen: list[tuple[Any, bytes]] = []
        self.reading = trio.Event()
        self.reading.set()

    async def run(self) -> None:
        while True:
            await self.reading.wait()
            data, peer = await self.sock.recvfrom(65536)
            self.seen.append((peer, data))
            if self.reply:
                tag = peer if isinstance(peer, (str, bytes)) else f"{peer[0]}:{peer[1]}"
                await self.sock.sendto(f"{tag!s}|".encode() + data, peer)


@asynccontextmanager
async def echo_service(
    family: socket.AddressFamily, address: Any, reply: bool = True
) -> AsyncIterator[tuple[Echo, Address]]:
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.bind(address)
        name = sock.getsockname()
        if family == socket.AF_UNIX:
            upstream = Address(Kind.UNIX_DGRAM, path=name)
        else:
            upstream = Address(Kind.UDP, host=name[0], port=name[1])
        echo = Echo(sock, reply)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo.run)
            yield echo, upstream
            nursery.cancel_scope.cancel()


def udp_client(family: socket.AddressFamily = socket.AF_INET) -> trio.socket.SocketType:
    return trio.socket.socket(family, socket.SOCK_DGRAM)


async def test_queued_datagrams_go_out_in_order_and_replies_find_their_client(
    sockets: list[socket.socket],
) -> None:
    """Datagrams sent before release() reach the service in order, one peer per client, and
    each client gets only its own replies, from the address it wrote to."""
    held = held_socket(sockets, socket.AF_INET, ("127.0.0.1", 0))
    with trio.fail_after(TIMEOUT), udp_client() as a, udp_client() as b:
        await a.bind(("127.0.0.1", 0))
        await b.bind(("127.0.0.1", 0))
        async with echo_service(socket.AF_INET, ("127.0.0.1", 0)) as (echo, upstream), \
                proxying(held, upstream) as (proxy, rec):
            for i in range(3):
                await a.sendto(b"a%d" % i, held.getsockname())
                await b.sendto(b"b%d" % i, held.getsockname())
            await rec.wait_traffic(6)
            assert (proxy.queued, proxy.flows) == (6, 0)
            assert echo.seen == []
            proxy.release()
            replies: dict[str, list[bytes]] = {"a": [], "b": []}
            for name, client in (("a", a), ("b", b)):
                for _ in range(3):
                    data, source = await client.recvfrom(65536)
                    assert source == held.getsockname()
                    replies[name].append(data)
            assert proxy.datagrams_in == 6 and proxy.datagrams_out == 6
            assert (proxy.queued, proxy.flows, proxy.dropped) == (0, 2, 0)
            assert proxy.first_byte_at is not None
    assert [data for _peer, data in echo.seen] == [b"a0", b"b0", b"a1", b"b1", b"a2", b"b2"]
    peer_a, peer_b = echo.seen[0][0], echo.seen[1][0]
    assert peer_a != peer_b
    assert {peer for peer, data in echo.seen if data.startswith(b"a")} == {peer_a}
    tag_a = f"{peer_a[0]}:{peer_a[1]}|".encode()
    tag_b = f"{peer_b[0]}:{peer_b[1]}|".encode()
    assert replies == {"a": [tag_a + b"a%d" % i for i in range(3)],
                       "b": [tag_b + b"b%d" % i for i in range(3)]}


async def test_ipv6(sockets: list[socket.socket]) -> None:
    """An IPv6 client is relayed to an IPv6 service and answered."""
    held = held_socket(sockets, socket.AF_INET6, ("::1", 0))
    with trio.fail_after(TIMEOUT), udp_client(socket.AF_INET6) as client:
        await client.bind(("::1", 0))
        async with echo_service(socket.AF_INET6, ("::1", 0)) as (echo, upstream), \
                proxying(held, upstream) as (proxy, _rec):
            proxy.release()
            await client.sendto(b"hi", held.getsockname()[:2])
            data, source = await client.recvfrom(65536)
            assert source[:2] == held.getsockname()[:2]
            peer = echo.seen[0][0]
            assert data == f"{peer[0]}:{peer[1]}|hi".encode()


async def test_queue_overflow_is_dropped_and_counted(sockets: list[socket.socket]) -> None:
    """Past queue_limit, datagrams are dropped and counted; the first ones still go out."""
    held = held_socket(sockets, socket.AF_INET, ("127.0.0.1", 0))
    with trio.fail_after(TIMEOUT), udp_client() as client:
        async with echo_service(socket.AF_INET, ("127.0.0.1", 0), reply=False) as \
                (echo, upstream), proxying(held, upstream, queue_limit=3) as (proxy, rec):
            for i in range(5):
                await client.sendto(b"%d" % i, held.getsockname())
            await rec.wait_traffic(5)
            assert (proxy.queued, proxy.dropped) == (3, 2)
            proxy.release()
            await trio.testing.wait_all_tasks_blocked()
            assert [data for _peer, data in echo.seen] == [b"0", b"1", b"2"]


async def test_drop_discards_the_queue(sockets: list[socket.socket]) -> None:
    """drop(reason) discards queued datagrams, returns how many, and logs the reason once."""
    held = held_socket(sockets, socket.AF_INET, ("127.0.0.1", 0))
    with trio.fail_after(TIMEOUT), udp_client() as client:
        async with proxying(held, Address(Kind.UDP, host="127.0.0.1", port=9)) as (proxy, rec):
            for _ in range(4):
                await client.sendto(b"x", held.getsockname())
            await rec.wait_traffic(4)
            assert proxy.drop("start timed out") == 4
            assert (proxy.queued, proxy.dropped) == (0, 4)
            assert rec.lines == ["svc: dropped 4 queued datagrams (start timed out)"]


async def test_idle_flows_expire(sockets: list[socket.socket]) -> None:
    """A flow silent for flow_timeout is closed; the client's next datagram opens a new one."""
    held = held_socket(sockets, socket.AF_INET, ("127.0.0.1", 0))
    with trio.fail_after(TIMEOUT), udp_client() as client:
        await client.bind(("127.0.0.1", 0))
        async with echo_service(socket.AF_INET, ("127.0.0.1", 0)) as (echo, upstream), \
                proxying(held, upstream, flow_timeout=0.2) as (proxy, _rec):
            proxy.release()
            await client.sendto(b"one", held.getsockname())
            await client.recvfrom(65536)
            assert proxy.flows == 1
            replied = trio.current_time()
            while proxy.flows:
                await proxy.activity_changed.wait()
            assert trio.current_time() - replied >= 0.2 * 0.9
            assert proxy.active == 0
            await client.sendto(b"two", held.getsockname())
            await client.recvfrom(65536)
            assert echo.seen[0][0] != echo.seen[1][0]  # a new flow, a new upstream socket


async def test_flow_expiry_timing_under_a_mock_clock(
    sockets: list[socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    """With flow_timeout=60, flows close 60 s after their own last datagram, each on time."""
    held = held_socket(sockets, socket.AF_INET, ("127.0.0.1", 0))
    # The clock must not jump while real datagrams are on their way.
    autojump_clock.autojump_threshold = 0.05
    with udp_client() as a, udp_client() as b:
        await a.bind(("127.0.0.1", 0))
        await b.bind(("127.0.0.1", 0))
        async with echo_service(socket.AF_INET, ("127.0.0.1", 0), reply=False) as \
                (echo, upstream), proxying(held, upstream) as (proxy, _rec):
            proxy.release()
            start = trio.current_time()
            await a.sendto(b"a", held.getsockname())
            while proxy.flows < 1:
                await proxy.activity_changed.wait()
            autojump_clock.jump(30)
            await b.sendto(b"b", held.getsockname())
            while proxy.flows < 2:
                await proxy.activity_changed.wait()
            closed: list[float] = []
            while proxy.flows:
                await proxy.activity_changed.wait()
                closed.append(trio.current_time() - start)
    assert [round(t) for t in closed] == [60, 90]
    assert len(echo.seen) == 2


async def test_flow_limit(sockets: list[socket.socket]) -> None:
    """Past max_flows, a new client's datagrams are dropped and counted; existing flows go on."""
    held = held_socket(sockets, socket.AF_INET, ("127.0.0.1", 0))
    with trio.fail_after(TIMEOUT), udp_client() as a, udp_client() as b, udp_client() as c:
        async with echo_service(socket.AF_INET, ("127.0.0.1", 0)) as (_echo, upstream), \
                proxying(held, upstream, max_flows=2) as (proxy, _rec):
            proxy.release()
            for client in (a, b, c):
                await client.sendto(b"x", held.getsockname())
            await a.recvfrom(65536)
            await b.recvfrom(65536)
            await trio.testing.wait_all_tasks_blocked()
            assert (proxy.flows, proxy.dropped) == (2, 1)


async def test_replies_leave_from_the_address_the_client_used(
    sockets: list[socket.socket],
) -> None:
    """On a wildcard socket, the reply to a datagram sent to 127.0.0.2 comes from 127.0.0.2;
    afterwards the socket is as it was (blocking, no IP_PKTINFO)."""
    held = held_socket(sockets, socket.AF_INET, ("0.0.0.0", 0))
    port = held.getsockname()[1]
    with trio.fail_after(TIMEOUT), udp_client() as client:
        await client.bind(("127.0.0.1", 0))
        async with echo_service(socket.AF_INET, ("127.0.0.1", 0)) as (_echo, upstream), \
                proxying(held, upstream) as (proxy, _rec):
            proxy.release()
            await client.sendto(b"x", ("127.0.0.2", port))
            _data, source = await client.recvfrom(65536)
            assert source == ("127.0.0.2", port)
    assert held.getblocking()
    assert held.getsockopt(socket.IPPROTO_IP, getattr(socket, "IP_PKTINFO", 8)) == 0


async def test_unix_dgram(sockets: list[socket.socket], tmp_path: Path) -> None:
    """unix-dgram: 30 queued datagrams (more than the kernel's 10-deep queue) all arrive in
    order, and a bound client gets its reply."""
    held = held_socket(sockets, socket.AF_UNIX, str(tmp_path / "front.sock"))
    with trio.fail_after(TIMEOUT), trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        await client.bind(str(tmp_path / "client.sock"))
        async with echo_service(socket.AF_UNIX, str(tmp_path / "back.sock"), reply=False) as \
                (echo, upstream), proxying(held, upstream) as (proxy, rec):
            for i in range(30):
                await client.sendto(b"%d" % i, held.getsockname())
            await rec.wait_traffic(30)
            echo.reading = trio.Event()  # a service slow to read: its queue fills after 10
            proxy.release()
            await trio.testing.wait_all_tasks_blocked()
            assert 0 < proxy.queued < 30
            echo.reading.set()
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.queued == 0
            assert [data for _peer, data in echo.seen] == [b"%d" % i for i in range(30)]
            assert proxy.dropped == 0
            echo.reply = True
            await client.sendto(b"ping", held.getsockname())
            data, source = await client.recvfrom(65536)
            assert source == held.getsockname()
            assert data.endswith(b"|ping")


async def test_unready_queues_again_and_closes_flows(sockets: list[socket.socket]) -> None:
    """After unready(), flows are closed and datagrams queue (and report traffic) again."""
    held = held_socket(sockets, socket.AF_INET, ("127.0.0.1", 0))
    with trio.fail_after(TIMEOUT), udp_client() as client:
        await client.bind(("127.0.0.1", 0))
        async with echo_service(socket.AF_INET, ("127.0.0.1", 0)) as (_echo, upstream), \
                proxying(held, upstream) as (proxy, rec):
            proxy.release()
            await client.sendto(b"one", held.getsockname())
            await client.recvfrom(65536)
            assert (proxy.flows, rec.traffic) == (1, 0)
            proxy.unready()
            assert proxy.flows == 0
            await client.sendto(b"two", held.getsockname())
            await rec.wait_traffic(1)
            assert proxy.queued == 1
            proxy.release()
            data, _source = await client.recvfrom(65536)
            assert data.endswith(b"|two")
