"""StreamProxy with real sockets: held connections, forwarding, limits, failures."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from lazyd.datapath import budget, shovel
from lazyd.front import stream as proxy_module
from lazyd.net.addresses import Address, Kind
from lazyd.readiness.probe import wait_connectable
from lazyd.runtime.binding import accept_queue_length
from tests.conftest import free_port, proxying

TIMEOUT = 10.0
Handler = Callable[[trio.SocketStream], Awaitable[None]]


# --- fixtures -----------------------------------------------------------------


def tcp_listener(made: list[socket.socket], cls: type[socket.socket] = socket.socket
                 ) -> socket.socket:
    sock = cls(socket.AF_INET, socket.SOCK_STREAM)
    made.append(sock)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)  # left blocking, as lazyd.runtime.binding binds it
    return sock


def unix_listener(made: list[socket.socket], path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    made.append(sock)
    sock.bind(str(path))
    sock.listen(512)  # left blocking, as lazyd.runtime.binding binds it
    return sock


def tcp_upstream() -> Address:
    return Address(Kind.TCP, host="127.0.0.1", port=free_port())


@asynccontextmanager
async def backend(address: Address, handler: Handler, backlog: int = 512) -> AsyncIterator[None]:
    """A service listening on `address` (the upstream), serving each connection with `handler`."""
    sock = trio.socket.socket(address.family, socket.SOCK_STREAM)
    if not address.is_unix:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(address.sockaddr())
    sock.listen(backlog)

    async def guarded(stream: trio.SocketStream) -> None:
        # wait_connectable's probes, and clients the test resets, end early.
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream)

    try:
        async with trio.SocketListener(sock) as listener, trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, guarded, [listener])
            yield
            nursery.cancel_scope.cancel()
    finally:
        if address.is_unix and address.path is not None:
            os.unlink(address.path)


async def connect(listener: socket.socket) -> trio.SocketStream:
    if listener.family == socket.AF_UNIX:
        return await trio.open_unix_socket(listener.getsockname())
    host, port = listener.getsockname()
    return await trio.open_tcp_stream(host, port)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(1 << 20):
        data += chunk
    return bytes(data)


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        data += chunk
    return data


async def reply_to_line(stream: trio.SocketStream) -> None:
    line = await read_line(stream)
    await stream.send_all(b"reply to " + line)


# --- holding ------------------------------------------------------------------


async def test_holds_200_connections_until_the_backend_listens(
    sockets: list[socket.socket],
) -> None:
    """200 clients that connect and send before the backend listens are all answered, none reset."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    answers: dict[int, bytes] = {}

    async def client(i: int) -> None:
        async with await connect(listener) as stream:
            await stream.send_all(b"request %d\n" % i)
            answers[i] = await read_all(stream)

    async def late_backend(done: trio.Event) -> None:
        async with backend(upstream, reply_to_line):
            await done.wait()

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec), trio.open_nursery() as outer:
            done = trio.Event()
            async with trio.open_nursery() as clients:
                for i in range(200):
                    clients.start_soon(client, i)
                await rec.wait_traffic(200)
                assert proxy.held == 200 and proxy.active == 0
                outer.start_soon(late_backend, done)  # the service binds only now
                await wait_connectable(upstream)
                proxy.release()
            done.set()
            assert proxy.held == 0
    assert answers == {i: b"reply to request %d\n" % i for i in range(200)}
    assert rec.traffic == 200
    assert proxy.first_byte_at is not None


async def test_queue_limit_leaves_the_rest_in_the_kernel_backlog(
    sockets: list[socket.socket],
) -> None:
    """With queue_limit=5, 20 clients: 5 held, 15 left in the backlog, none refused, all served."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    answers: dict[int, bytes] = {}
    sent = trio.Semaphore(0)

    async def client(i: int) -> None:
        async with await connect(listener) as stream:
            await stream.send_all(b"request %d\n" % i)
            sent.release()
            answers[i] = await read_all(stream)

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream, queue_limit=5) as (proxy, rec), \
                backend(upstream, reply_to_line), trio.open_nursery() as clients:
            for i in range(20):
                clients.start_soon(client, i)
            for _ in range(20):
                await sent.acquire()
            await trio.testing.wait_all_tasks_blocked()
            assert (proxy.held, rec.traffic) == (5, 5)
            assert accept_queue_length(listener) == 15
            proxy.release()
    assert answers == {i: b"reply to request %d\n" % i for i in range(20)}


async def test_unix_upstream_with_a_small_backlog_gets_every_connection(
    sockets: list[socket.socket], tmp_path: Path
) -> None:
    """Released all at once into a Unix listener with backlog 2, 40 held connections get through
    (a Unix connect fails with EAGAIN where TCP would retransmit; lazyd retries)."""
    listener = tcp_listener(sockets)
    upstream = Address(Kind.UNIX, path=str(tmp_path / "back.sock"))
    answers: dict[int, bytes] = {}

    async def client(i: int) -> None:
        async with await connect(listener) as stream:
            await stream.send_all(b"request %d\n" % i)
            answers[i] = await read_all(stream)

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec), \
                backend(upstream, reply_to_line, backlog=2), trio.open_nursery() as clients:
            for i in range(40):
                clients.start_soon(client, i)
            await rec.wait_traffic(40)
            proxy.release()
    assert answers == {i: b"reply to request %d\n" % i for i in range(40)}
    assert rec.lines == []


def reply_after(finish: trio.Event) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A backend handler that reads a line and answers it once `finish` is set."""
    async def reply(stream: trio.SocketStream) -> None:
        line = await read_line(stream)
        await finish.wait()
        await stream.send_all(b"reply to " + line)
    return reply


def requester(listener: socket.socket,
              answers: list[bytes]) -> Callable[[int], Awaitable[None]]:
    """A client that sends request `i` through the proxy and appends the whole answer."""
    async def client(i: int) -> None:
        async with await connect(listener) as stream:
            await stream.send_all(b"request %d\n" % i)
            answers.append(await read_all(stream))
    return client


async def test_max_connections_keeps_the_excess_held(sockets: list[socket.socket]) -> None:
    """With max_connections=2, the third client waits held until one of the first two ends."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    finish = trio.Event()
    answers: list[bytes] = []
    client = requester(listener, answers)

    with trio.fail_after(TIMEOUT):
        async with backend(upstream, reply_after(finish)), \
                proxying(listener, upstream, max_connections=2) as (proxy, _rec):
            proxy.release()
            async with trio.open_nursery() as clients:
                for i in range(3):
                    clients.start_soon(client, i)
                await trio.testing.wait_all_tasks_blocked()
                assert (proxy.active, proxy.held) == (2, 1)
                finish.set()
    assert sorted(answers) == [b"reply to request %d\n" % i for i in range(3)]


async def test_drained_returns_once_every_held_connection_is_forwarded(
    sockets: list[socket.socket],
) -> None:
    """drained() (what the kernel data path waits for before it steers) does not
    return while a client is still held, and returns once the last is forwarded,
    or once the proxy is not ready any more."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    finish = trio.Event()
    drained = trio.Event()
    client = requester(listener, [])

    async def wait_drained(proxy: proxy_module.StreamProxy) -> None:
        await proxy.drained()
        drained.set()

    with trio.fail_after(TIMEOUT):
        async with backend(upstream, reply_after(finish)), \
                proxying(listener, upstream, max_connections=1) as (proxy, _rec):
            proxy.release()
            async with trio.open_nursery() as clients:
                for i in range(3):
                    clients.start_soon(client, i)
                await trio.testing.wait_all_tasks_blocked()
                assert (proxy.active, proxy.held) == (1, 2)
                clients.start_soon(wait_drained, proxy)
                await trio.testing.wait_all_tasks_blocked()
                assert not drained.is_set()
                finish.set()
            assert drained.is_set()
            # Not ready: it returns at once, held or not.
            proxy.unready()
            with trio.fail_after(1):
                await proxy.drained()


async def test_drop_closes_held_connections(sockets: list[socket.socket]) -> None:
    """drop(reason) closes every held connection, returns the count, logs once; the next is held."""
    listener = tcp_listener(sockets)
    with trio.fail_after(TIMEOUT):
        async with proxying(listener, tcp_upstream()) as (proxy, rec):
            streams = [await connect(listener) for _ in range(3)]
            for stream in streams:
                await stream.send_all(b"request\n")
            await rec.wait_traffic(3)
            assert proxy.drop("exited with status 3") == 3
            assert proxy.held == 0
            for stream in streams:
                async with stream:
                    # Closed with its request unread, a held connection is reset by the
                    # kernel: the client sees ECONNRESET, never a clean end.
                    with pytest.raises(trio.BrokenResourceError):
                        await read_all(stream)
            assert [line for line in rec.lines if "exited with status 3" in line] == [
                "svc: closed 3 held connections (exited with status 3)"
            ]
            async with await connect(listener):
                await rec.wait_traffic(4)
                assert proxy.held == 1
                assert proxy.drop("again") == 1


async def test_client_that_leaves_while_held_is_discarded(sockets: list[socket.socket]) -> None:
    """A held client that closes without sending is forgotten; it never reaches the service."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    accepted = 0

    async def count(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await reply_to_line(stream)

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec), backend(upstream, count):
            stream = await connect(listener)
            await rec.wait_traffic(1)
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.held == 0
            proxy.release()
            async with await connect(listener) as stream:
                await stream.send_all(b"late\n")
                assert await read_all(stream) == b"reply to late\n"
    assert accepted == 1


async def test_request_then_half_close_while_held(sockets: list[socket.socket]) -> None:
    """A client that sends its request and shuts down writing while held still gets the reply."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()

    async def echo_until_eof(stream: trio.SocketStream) -> None:
        data = await read_all(stream)  # returns only on EOF: the half-close got through
        await stream.send_all(b"got " + data)

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec), \
                backend(upstream, echo_until_eof), await connect(listener) as stream:
            await stream.send_all(b"whole request")
            await stream.send_eof()
            await rec.wait_traffic(1)
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.held == 1
            proxy.release()
            assert await read_all(stream) == b"got whole request"


# --- forwarding ------------------------------------------------------------------


async def send_and_hash_until_eof(stream: trio.SocketStream, payload: bytes) -> None:
    """Backend: send `payload` while reading to EOF; then send the SHA-256 of what came."""
    digest = hashlib.sha256()

    async def take() -> None:
        while chunk := await stream.receive_some(1 << 20):
            digest.update(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await stream.send_all(payload)
    await stream.send_all(digest.digest())


@pytest.mark.parametrize(("front", "back", "size"), [
    ("tcp", "tcp", 20 << 20),
    ("unix", "tcp", 20 << 20),
    ("tcp", "unix", 20 << 20),
])
async def test_bulk_both_ways_with_half_close(
    front: str, back: str, size: int, sockets: list[socket.socket], tmp_path: Path
) -> None:
    """MBs each way arrive intact (SHA-256), and a client's SHUT_WR still gets the whole reply."""
    listener = (tcp_listener(sockets) if front == "tcp"
                else unix_listener(sockets, tmp_path / "front.sock"))
    upstream = (tcp_upstream() if back == "tcp"
                else Address(Kind.UNIX, path=str(tmp_path / "back.sock")))
    up_payload, down_payload = os.urandom(size), os.urandom(size)
    received = bytearray()

    async def service(stream: trio.SocketStream) -> None:
        await send_and_hash_until_eof(stream, down_payload)

    async def receive(stream: trio.SocketStream) -> None:
        received.extend(await read_all(stream))

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), backend(upstream, service):
            proxy.release()
            async with await connect(listener) as stream, trio.open_nursery() as nursery:
                nursery.start_soon(receive, stream)
                await stream.send_all(up_payload)
                await stream.send_eof()
            while proxy.active:
                await proxy.activity_changed.wait()
    assert hashlib.sha256(received[:size]).digest() == hashlib.sha256(down_payload).digest()
    assert bytes(received[size:]) == hashlib.sha256(up_payload).digest()
    assert (proxy.bytes_in, proxy.bytes_out) == (size, size + 32)


def count_bulk_rounds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every bulk read the shovel makes from now on (its peek)."""
    sizes: list[int] = []
    real_peek_turn = shovel.Shovel._peek_turn

    def counting_peek_turn(self: shovel.Shovel, flow: shovel.Flow) -> bool:
        if flow.bulk:
            sizes.append(flow.carried)
        return real_peek_turn(self, flow)

    monkeypatch.setattr(shovel.Shovel, "_peek_turn", counting_peek_turn)
    return sizes


async def test_only_bulk_transfers_use_bulk_reads(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short request/response makes no bulk read; a 4 MB download moves in bulk reads."""
    bulk = count_bulk_rounds(monkeypatch)
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    download = os.urandom(4 << 20)

    async def serve(stream: trio.SocketStream) -> None:
        line = await read_line(stream)
        await stream.send_all(download if line == b"download\n" else b"reply to " + line)

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), backend(upstream, serve):
            proxy.release()
            async with await connect(listener) as stream:
                await stream.send_all(b"small\n")
                assert await read_all(stream) == b"reply to small\n"
            assert bulk == []
            async with await connect(listener) as stream:
                await stream.send_all(b"download\n")
                assert await read_all(stream) == download
            assert bulk and min(bulk) >= shovel.BULK_AFTER


async def test_many_small_requests_on_one_connection_make_no_bulk_read(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keep-alive connection carrying far more than BULK_AFTER in small requests and
    replies stays on plain reads (a bulk read's peek costs a small message a syscall)."""
    bulk = count_bulk_rounds(monkeypatch)
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    request = b"x" * 255 + b"\n"
    rounds = 4 * shovel.BULK_AFTER // len(request)

    async def serve(stream: trio.SocketStream) -> None:
        while line := await read_line(stream):
            await stream.send_all(line)

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), backend(upstream, serve):
            proxy.release()
            async with await connect(listener) as stream:
                for _ in range(rounds):
                    await stream.send_all(request)
                    reply = b""
                    while len(reply) < len(request):
                        reply += await stream.receive_some(len(request) - len(reply))
                    assert reply == request
    assert (proxy.bytes_in, proxy.bytes_out) == (rounds * len(request),) * 2
    assert bulk == []


async def test_clients_that_stop_reading_keep_at_most_the_parked_limit_aside(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Clients that stop reading while their replies still come make the proxy keep at
    most PARKED's limit aside in all: with less room than a chunk, every read only
    peeks and the rest waits in the kernel (without the limit, these eight keep some
    13 KB aside); once they read again, every byte arrives intact in order."""
    monkeypatch.setattr(budget.PARKED, "limit", 4096)
    listener = tcp_listener(sockets)
    # A Unix upstream: its flows never turn to bulk reads (which keep nothing
    # aside), so every full client would leave up to a chunk aside.
    upstream = Address(Kind.UNIX, path=str(tmp_path / "back.sock"))
    clients = 8
    replies = [os.urandom(8 << 20) for _ in range(clients)]
    peak = 0

    async def serve(stream: trio.SocketStream) -> None:
        await stream.send_all(replies[int(await read_line(stream))])

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, budget.PARKED.used)
            await trio.lowlevel.checkpoint()

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), backend(upstream, serve):
            proxy.release()
            streams = [await connect(listener) for _ in range(clients)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for i, stream in enumerate(streams):
                    await stream.send_all(b"%d\n" % i)
                # Wait until the proxy has stopped forwarding: every client's
                # socket is full (the replies are far bigger than the kernel's
                # buffers).  Nothing says so but the count standing still.
                before, still = -1, 0
                while still < 3:
                    still = still + 1 if proxy.bytes_out == before else 0
                    before = proxy.bytes_out
                    await trio.sleep(0.05)
                for i, stream in enumerate(streams):
                    async with stream:
                        got = await read_all(stream)
                    assert hashlib.sha256(got).digest() == hashlib.sha256(replies[i]).digest()
                nursery.cancel_scope.cancel()
            while proxy.active:
                await proxy.activity_changed.wait()
    assert peak <= budget.PARKED.limit
    assert budget.PARKED.used == 0


async def test_bytes_after_urgent_data_arrive_without_more_from_the_client(
    sockets: list[socket.socket],
) -> None:
    """A read stops short at TCP urgent data's mark: what follows it still reaches the
    service with nothing more from the client (the urgent byte itself is not forwarded)."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    lines: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        while line := await read_line(stream):
            lines.append(line)
            await stream.send_all(b"ok\n")

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), backend(upstream, serve):
            proxy.release()
            # Blocking calls, so that everything is sent before the proxy runs:
            # it finds "one", the urgent "X" and "two\n" queued at its first read.
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as client:
                client.sendall(b"one")
                client.send(b"X", socket.MSG_OOB)
                client.sendall(b"two\n")
                client.setblocking(False)
                await trio.lowlevel.wait_readable(client)
                assert client.recv(16) == b"ok\n"
    assert lines == [b"onetwo\n"]


async def test_backend_dying_mid_transfer_closes_only_that_connection(
    sockets: list[socket.socket],
) -> None:
    """A backend reset mid-transfer closes the client; once a new backend is up, the next works."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()

    async def die(stream: trio.SocketStream) -> None:
        await stream.send_all(b"x" * (1 << 20))
        # Vanish as a killed process does with data unread: RST, no FIN.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec):
            proxy.release()
            async with backend(upstream, die), await connect(listener) as stream:
                await stream.send_all(b"y" * (1 << 20))
                got = 0
                try:
                    while chunk := await stream.receive_some(1 << 16):
                        got += len(chunk)
                except trio.BrokenResourceError:
                    pass  # a reset passed on is as good as an EOF
                assert got <= 1 << 20
            while proxy.active:
                await proxy.activity_changed.wait()
            async with backend(upstream, reply_to_line), await connect(listener) as stream:
                await stream.send_all(b"again\n")
                assert await read_all(stream) == b"reply to again\n"
    assert not [line for line in rec.lines if "failed" in line]


async def test_a_refused_upstream_holds_the_clients_again_until_it_listens(
    sockets: list[socket.socket],
) -> None:
    """Released into an upstream that refuses (the service has just exited, or listens
    later than its readiness said): each client is held again, not closed, with one log
    line per burst, and is answered, request and all, once the upstream listens."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec):
            streams = [await connect(listener) for _ in range(5)]
            for i, stream in enumerate(streams):
                await stream.send_all(b"early %d\n" % i)
            await rec.wait_traffic(5)
            proxy.release()
            while not any("holding the connection" in line for line in rec.lines):
                await trio.sleep(0.01)  # no event for a refused connect but its log line
            assert proxy.held == 5 or proxy.held + proxy.active == 5
            assert len([line for line in rec.lines if "connecting to" in line]) == 1
            assert "Connection refused" in rec.lines[0]
            async with backend(upstream, reply_to_line):
                for i, stream in enumerate(streams):
                    async with stream:
                        await stream.send_eof()
                        assert await read_all(stream) == b"reply to early %d\n" % i
    assert rec.lines[-1].startswith(f"svc: connecting to {upstream} works again (")


async def test_an_upstream_that_keeps_refusing_closes_its_clients_at_the_connect_timeout(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream that never listens: held clients are closed once CONNECT_TIMEOUT has
    passed since their release, cleanly (they sent nothing), and nothing spins meanwhile."""
    monkeypatch.setattr(proxy_module, "CONNECT_TIMEOUT", 0.3)
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec):
            streams = [await connect(listener) for _ in range(5)]
            await rec.wait_traffic(5)
            start = trio.current_time()
            proxy.release()
            for stream in streams:
                async with stream:
                    assert await read_all(stream) == b""
            assert trio.current_time() - start >= 0.3
            assert proxy.held == 0 and proxy.active == 0


async def test_unready_reports_connections_still_waiting_for_a_slot(
    sockets: list[socket.socket],
) -> None:
    """A connection waiting for a free slot when the service stops counts as traffic."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    finish = trio.Event()

    with trio.fail_after(TIMEOUT):
        async with backend(upstream, reply_after(finish)), \
                proxying(listener, upstream, max_connections=1) as (proxy, rec):
            proxy.release()
            first, second = await connect(listener), await connect(listener)
            await first.send_all(b"first\n")
            await second.send_all(b"second\n")
            await trio.testing.wait_all_tasks_blocked()
            assert (proxy.active, proxy.held, rec.traffic) == (1, 1, 0)
            proxy.unready()
            await rec.wait_traffic(1)
            proxy.release()
            finish.set()
            async with first:
                assert await read_all(first) == b"reply to first\n"
            # The slot frees once the client closes its side too.
            async with second:
                assert await read_all(second) == b"reply to second\n"


async def test_more_than_the_hold_limit_arrives_intact(sockets: list[socket.socket]) -> None:
    """A client sending 1 MB while held (more than its receive buffer holds) has all of it
    delivered once released."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    payload = os.urandom(1 << 20)
    got: list[bytes] = []

    async def take_all(stream: trio.SocketStream) -> None:
        got.append(await read_all(stream))
        await stream.send_all(b"done")

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec), backend(upstream, take_all), \
                await connect(listener) as stream, trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            await rec.wait_traffic(1)
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.bytes_in == 0
            proxy.release()
            assert await read_all(stream) == b"done"
    assert got == [payload]


async def test_client_reset_closes_the_upstream_side(sockets: list[socket.socket]) -> None:
    """A client that resets mid-connection gets its upstream connection closed too."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    ended = trio.Event()

    async def wait_for_end(stream: trio.SocketStream) -> None:
        try:
            await read_all(stream)
        finally:
            ended.set()

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), backend(upstream, wait_for_end):
            proxy.release()
            stream = await connect(listener)
            await stream.send_all(b"partial")
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.active == 1
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            await ended.wait()
            while proxy.active:
                await proxy.activity_changed.wait()


async def test_a_client_that_never_closes_after_the_service_did_is_closed_in_time(
    sockets: list[socket.socket],
) -> None:
    """Once the service has closed, a client that sends nothing more is closed after
    half_closed_timeout, and the connection no longer counts as active; one that keeps
    sending keeps it open."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    received: list[bytes] = []
    both_ended = trio.Event()

    async def reply_half_close_and_read(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye\n")
        await stream.send_eof()
        received.append(await read_all(stream))
        if len(received) == 2:
            both_ended.set()

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream, half_closed_timeout=0.3) as (proxy, _rec), \
                backend(upstream, reply_half_close_and_read):
            proxy.release()
            async with await connect(listener) as quiet:
                assert await read_all(quiet) == b"bye\n"  # EOF from the service
                start = trio.current_time()
                # Never closed by this client: lazyd ends it.
                while proxy.active:
                    await proxy.activity_changed.wait()
                assert 0.25 <= trio.current_time() - start < 2
            async with await connect(listener) as talker:
                assert await read_all(talker) == b"bye\n"
                for _ in range(8):  # 0.8 s of sending, never 0.3 s quiet
                    await talker.send_all(b"more ")
                    await trio.sleep(0.1)
                assert proxy.active == 1
                await talker.send_eof()
                while proxy.active:
                    await proxy.activity_changed.wait()
            await both_ended.wait()
            assert received == [b"", b"more " * 8]


async def test_unready_holds_new_connections_again(sockets: list[socket.socket]) -> None:
    """After unready(), a new connection is held and reported as traffic until release()."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec), backend(upstream, reply_to_line):
            proxy.release()
            async with await connect(listener) as stream:
                await stream.send_all(b"one\n")
                assert await read_all(stream) == b"reply to one\n"
            assert rec.traffic == 0
            proxy.unready()
            async with await connect(listener) as stream:
                await stream.send_all(b"two\n")
                await rec.wait_traffic(1)
                assert proxy.held == 1
                proxy.release()
                assert await read_all(stream) == b"reply to two\n"


async def test_activity_tracks_open_connections(sockets: list[socket.socket]) -> None:
    """`active` counts forwarded connections; activity_changed fires and the stamp moves."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), \
                backend(upstream, reply_to_line):
            proxy.release()
            before = proxy.last_active_change
            changed = proxy.activity_changed
            async with await connect(listener) as stream:
                await changed.wait()
                assert proxy.active == 1
                await stream.send_all(b"x\n")
                assert await read_all(stream) == b"reply to x\n"
            while proxy.active:
                await proxy.activity_changed.wait()
            assert proxy.last_active_change > before


# --- failures of lazyd's own ---------------------------------------------------------


class FlakyListener(socket.socket):
    """A listener whose accept() fails with EMFILE a few times, as when out of fds
    (StreamProxy accepts with the plain-fd `_accept`)."""

    failures = 3

    def _accept(self) -> tuple[int, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super()._accept()


async def test_emfile_on_accept_backs_off_and_recovers(sockets: list[socket.socket]) -> None:
    """EMFILE from accept() is logged once and retried after 100 ms; the proxy keeps serving."""
    listener = tcp_listener(sockets, FlakyListener)
    upstream = tcp_upstream()
    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, rec), backend(upstream, reply_to_line):
            proxy.release()
            start = trio.current_time()
            async with await connect(listener) as stream:
                await stream.send_all(b"x\n")
                assert await read_all(stream) == b"reply to x\n"
            assert trio.current_time() - start >= 0.2  # two back-offs at least
    assert rec.lines == [
        "svc: accept failed: Too many open files; retrying every 100 ms",
        "svc: accept works again (3 failures in a row)",
    ]


async def test_listener_is_given_back_blocking(sockets: list[socket.socket]) -> None:
    """run() works on a blocking listener and gives it back blocking, for a pass-mode service."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    assert listener.getblocking()
    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), backend(upstream, reply_to_line):
            assert not listener.getblocking()
            proxy.release()
            async with await connect(listener) as stream:
                await stream.send_all(b"x\n")
                assert await read_all(stream) == b"reply to x\n"
    assert listener.getblocking()


async def test_wait_connectable_waits_for_a_unix_listener(tmp_path: Path) -> None:
    """wait_connectable keeps probing while nothing listens and returns once something does."""
    upstream = Address(Kind.UNIX, path=str(tmp_path / "late.sock"))
    returned = trio.Event()

    async def probe() -> None:
        await wait_connectable(upstream)
        returned.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            await trio.testing.wait_all_tasks_blocked()
            assert not returned.is_set()
            async with backend(upstream, reply_to_line):
                await returned.wait()


async def test_a_client_that_resets_after_its_request_ends_the_connection(
    sockets: list[socket.socket],
) -> None:
    """A client that sends its request, half-closes and then resets is closed at once, even
    while the service has not answered yet: it no longer counts as active."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    got_request = trio.Event()
    finish = trio.Event()

    async def read_then_wait(stream: trio.SocketStream) -> None:
        if await read_all(stream):
            got_request.set()
            await finish.wait()  # a slow answer, never sent

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), \
                backend(upstream, read_then_wait):
            proxy.release()
            stream = await connect(listener)
            await stream.send_all(b"request\n")
            await stream.send_eof()
            await got_request.wait()
            assert proxy.active == 1
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            while proxy.active:
                await proxy.activity_changed.wait()
            finish.set()


async def test_closed_connections_leave_no_timers_behind(sockets: list[socket.socket]) -> None:
    """Connections the service closes first, once closed, are not kept for half_closed_timeout."""
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()

    async def reply_and_close(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello\n")

    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream) as (proxy, _rec), \
                backend(upstream, reply_and_close):
            proxy.release()
            for _ in range(300):
                async with await connect(listener) as stream:
                    assert await read_all(stream) == b"hello\n"
            while proxy.active:
                await proxy.activity_changed.wait()
            assert len(proxy._reactor._timers) < 150


async def test_a_connect_is_timed_out_even_when_it_takes_a_just_closed_fd_number(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection released as another closes, to a service that never answers its
    connect, is closed after the connect timeout (the closed connection's last events
    are not taken for its answer)."""
    monkeypatch.setattr(proxy_module, "CONNECT_TIMEOUT", 0.3)
    listener = tcp_listener(sockets)
    upstream = tcp_upstream()
    service = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets.append(service)
    service.bind(upstream.sockaddr())
    service.listen(0)  # one connection waits; SYNs beyond it are dropped
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets.append(filler)
    with trio.fail_after(TIMEOUT):
        async with proxying(listener, upstream, max_connections=1) as (proxy, _rec):
            proxy.release()
            first = socket.create_connection(listener.getsockname())
            sockets.append(first)
            first.sendall(b"a")
            await trio.lowlevel.wait_readable(service)
            first_upstream, _ = service.accept()
            sockets.append(first_upstream)
            filler.connect(upstream.sockaddr())  # the service's accept queue is full now
            async with await connect(listener) as second:
                await second.send_all(b"b")
                await trio.testing.wait_all_tasks_blocked()  # lazyd has taken it
                assert proxy.held == 1
                # The upstream side resets and the client sends, both seen in one wake-up.
                first_upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
                first_upstream.close()
                first.send(b"x")
                # Closed at the connect timeout with its "b" never read, it is reset.
                with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
                    await read_all(second)
