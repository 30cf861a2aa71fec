"""Proxy mode in the real daemon: held connections, bytes and datagrams."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
from pathlib import Path

import trio

from tests.conftest import PY, burst, exchange, free_port, needs, program, proxy_service, run_lazyd


async def test_two_hundred_clients_during_a_slow_start_are_all_answered(tmp_path: Path) -> None:
    """A backend that needs 0.5 s to bind its port: 200 clients that connect and send at
    once during the start are all answered correctly, none reset or refused."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "slow", program("backend.py", f"tcp:127.0.0.1:{upstream}", "--delay", "0.5"),
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}",
    )
    async with run_lazyd(tmp_path, config) as lz:
        with trio.fail_after(30):
            answers, failures = await burst(port, 200)
        assert failures == []
        assert all(answers[i].split(b" ", 1)[1] == b"request %d\n" % i for i in range(200))
        assert len({a.split()[0] for a in answers.values()}) == 1
        line = await lz.wait_line(r"^slow: ready in")
        readiness = float(line.split("readiness ")[1].split(" ms")[0])
        assert readiness >= 500
        assert (await lz.status())["slow"]["activations"] == 1


def _bulk(port: int, size: int) -> tuple[str, str]:
    """Send `size` random bytes through an echo backend while reading them back."""
    payload = os.urandom(size)
    received = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        def reader() -> None:
            while data := sock.recv(1 << 20):
                received.update(data)

        import threading

        t = threading.Thread(target=reader)
        t.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # half-close: the echo must still come back
        t.join(30)
    return hashlib.sha256(payload).hexdigest(), received.hexdigest()


async def test_twenty_megabytes_each_way_with_half_close(tmp_path: Path) -> None:
    """20 MB through the proxy both ways arrive intact (SHA-256), and the client's
    half-close reaches the backend while the reply still flows back."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "echo", program("backend.py", f"tcp:127.0.0.1:{upstream}", "--echo"),
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}",
    )
    async with run_lazyd(tmp_path, config) as lz:
        sent, got = await trio.to_thread.run_sync(_bulk, port, 20 * 1024 * 1024)
        assert sent == got
        status = (await lz.status())["echo"]
        assert status["state"] == "running"


async def test_a_backend_killed_mid_transfer_closes_the_client_and_restarts(
    tmp_path: Path,
) -> None:
    """Killing the backend mid-connection gives the client EOF; the next client starts a new
    backend."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "lines", program("backend.py", f"tcp:127.0.0.1:{upstream}"),
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}",
    )
    async with run_lazyd(tmp_path, config) as lz:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"first\n")
            first = await stream.receive_some(100)
            pid = int(first.split()[0])
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(10):
                rest = b""
                try:
                    while chunk := await stream.receive_some(100):
                        rest += chunk
                except trio.BrokenResourceError:
                    pass  # a reset is as good as an EOF here: the client is told
        await lz.wait_line(r"^lines: killed by SIGKILL")
        with trio.fail_after(10):
            again = await exchange(port, b"second\n")
        assert again.endswith(b" second\n") and int(again.split()[0]) != pid
        assert (await lz.status())["lines"]["activations"] == 2


async def test_udp_datagrams_before_the_service_exists_reach_it_per_client(
    tmp_path: Path,
) -> None:
    """Two clients send datagrams before the service exists; all are delivered once it is
    ready, in order, and each client gets only its own replies."""
    port, upstream = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    config = "services:\n" + proxy_service(
        "quic", program("backend.py", f"udp:127.0.0.1:{upstream}", "--delay", "0.3"),
        f"udp://127.0.0.1:{port}", f"udp://127.0.0.1:{upstream}", "ready: {delay: 400ms}",
    )
    async with run_lazyd(tmp_path, config) as lz:
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        try:
            for c in clients:
                c.settimeout(10)
            for i in range(5):
                for n, c in enumerate(clients):
                    c.sendto(b"client%d-%d" % (n, i), ("127.0.0.1", port))
            for n, c in enumerate(clients):
                replies = [await trio.to_thread.run_sync(c.recvfrom, 65536) for _ in range(5)]
                assert all(addr == ("127.0.0.1", port) for _, addr in replies)
                datas = [data.split(b" ", 2)[2] for data, _ in replies]
                assert datas == [b"client%d-%d" % (n, i) for i in range(5)]
                # The backend saw one distinct peer per client.
                assert len({data.split(b" ")[1] for data, _ in replies}) == 1
            status = (await lz.status())["quic"]
            assert status["activations"] == 1 and status["active"] == 2
            line = await lz.wait_line(r"^quic: ready in")
            assert line.endswith(", 10 datagrams waiting"), line
        finally:
            for c in clients:
                c.close()


async def test_unix_listen_to_tcp_upstream_and_tcp_listen_to_unix_upstream(
    tmp_path: Path,
) -> None:
    """A Unix socket proxied to a TCP backend, and a TCP socket proxied to a Unix one."""
    tcp_up, tcp_listen = free_port(), free_port()
    unix_listen, unix_up = tmp_path / "front.sock", tmp_path / "back.sock"
    # The backend runs as root and makes its socket file root's alone (umask
    # 022), which only root may connect to: lazyd keeps root for this test.
    config = "user: root\nservices:\n" + proxy_service(
        "u2t", program("backend.py", f"tcp:127.0.0.1:{tcp_up}"),
        f"unix:{unix_listen}", f"tcp://127.0.0.1:{tcp_up}",
    ) + proxy_service(
        "t2u", program("backend.py", f"unix:{unix_up}"),
        f"tcp://127.0.0.1:{tcp_listen}", f"unix:{unix_up}",
    )
    async with run_lazyd(tmp_path, config):
        with trio.fail_after(15):
            stream = await trio.open_unix_socket(str(unix_listen))
            async with stream:
                await stream.send_all(b"over unix\n")
                await stream.send_eof()
                answer = b""
                while chunk := await stream.receive_some(100):
                    answer += chunk
            assert answer.endswith(b" over unix\n")
            assert (await exchange(tcp_listen, b"over tcp\n")).endswith(b" over tcp\n")


async def test_start_timeout_closes_held_connections_and_says_why(tmp_path: Path) -> None:
    """A backend that never listens: after start_timeout the held clients are closed, and
    the log says how many and why."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "never", "[sleep, '30']",
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}", "start_timeout: 400ms",
    )
    async with run_lazyd(tmp_path, config) as lz:
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            await lz.wait_line(r"^never: start timed out: not ready within 0.4 s")
            line = await lz.wait_line(r"^never: closed \d+ held connections")
            assert line == "never: closed 3 held connections (not ready within 0.4 s)"
            for c in clients:
                c.settimeout(5)
                assert c.recv(10) == b""
        finally:
            for c in clients:
                c.close()


async def test_queue_limit_stops_accepting_without_refusing_anyone(tmp_path: Path) -> None:
    """With queue_limit 5, twenty clients during a slow start: lazyd holds five, the kernel
    the rest; nobody is refused and all are answered."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "small", program("backend.py", f"tcp:127.0.0.1:{upstream}", "--delay", "0.5"),
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}", "queue_limit: 5",
    )
    async with run_lazyd(tmp_path, config) as lz:
        results: list[bytes] = []

        async def client(i: int) -> None:
            results.append(await exchange(port, b"q%d\n" % i))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(client, i)
            await lz.wait_status("small", queued=5, timeout=5)
        assert sorted(r.split(b" ", 1)[1] for r in results) == sorted(
            b"q%d\n" % i for i in range(20)
        )


async def test_idle_stop_and_reactivation_and_a_long_connection_keeps_it_up(
    tmp_path: Path,
) -> None:
    """After idle_timeout without connections the service is stopped and the next client
    starts a new one; an open connection keeps it running past the timeout."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "wiki", program("backend.py", f"tcp:127.0.0.1:{upstream}"),
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}", "idle_timeout: 300ms",
    )
    async with run_lazyd(tmp_path, config) as lz:
        first = await exchange(port, b"one\n")
        await lz.wait_line(r"^wiki: stopped \(idle\)")
        second = await exchange(port, b"two\n")
        assert first.split()[0] != second.split()[0]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"long\n")
            await stream.receive_some(100)
            await trio.sleep(0.8)  # well past idle_timeout, with the connection open
            assert (await lz.status())["wiki"]["state"] == "running"
            await stream.send_all(b"still\n")
            assert (await stream.receive_some(100)).endswith(b" still\n")
        await lz.wait_line(r"^wiki: stopped \(idle\)", count=2)
        assert (await lz.status())["wiki"]["activations"] == 2


@needs("iperf3")
async def test_a_one_test_at_a_time_server_serves_the_client_that_started_it(
    tmp_path: Path,
) -> None:
    """iperf3 -s serves one test at a time and takes any connection for a test's control
    connection: started cold by an iperf3 client, that client's test runs at once, because
    the readiness probe's connection carries it instead of coming first and leaving."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "iperf", f"/usr/bin/iperf3 -s -p {upstream} -B 127.0.0.1",
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}",
    )
    async with run_lazyd(tmp_path, config) as lz:
        with trio.fail_after(30):
            result = await trio.run_process(
                ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", "4M", "-J"],
                capture_stdout=True, check=False,
            )
        report = json.loads(result.stdout)
        assert result.returncode == 0, report.get("error")
        assert report["end"]["sum_sent"]["bytes"] >= 4 << 20
        assert (await lz.status())["iperf"]["activations"] == 1


def _refused_at_once(port: int) -> bool:
    """Whether a new client learns within 1 s that nobody will serve it (reset or close)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"hello\n")
            return s.recv(10) == b""
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


async def test_a_failed_service_refuses_new_clients_at_once_then_tries_again(
    tmp_path: Path,
) -> None:
    """A proxy service whose command exits at once reaches `failed` (start_limit 2): a
    client that connects while it is failed is reset at once, not held; after the
    interval, the next client starts it again (a third start is made)."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "broken", f"[{PY}, -c, 'raise SystemExit(3)']",
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}",
        "restart: on-failure", "start_limit: 2", "start_limit_interval: 3s",
    )
    async with run_lazyd(tmp_path, config) as lz:
        first = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            await lz.wait_line(r"^broken: failed: 2 starts within 3 s")
            assert await first.receive_some(10) == b""  # the held client was closed
        await first.aclose()
        assert (await lz.status())["broken"]["state"] == "failed"
        assert await trio.to_thread.run_sync(_refused_at_once, port)
        assert (await lz.status())["broken"]["activations"] == 2
        await lz.wait_line(r"^broken: start limit interval over", timeout=10)
        again = await trio.open_tcp_stream("127.0.0.1", port)
        async with again:
            await lz.wait_line(r"^broken: start failed", count=3)
        assert (await lz.status())["broken"]["activations"] == 3


def _rss(pid: int) -> int:
    """A process's resident memory in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_clients_that_stop_reading_do_not_grow_lazyd(tmp_path: Path) -> None:
    """Eight clients that send through an echo backend and never read leave lazyd's
    memory within a 64 KiB chunk per direction each (the rest waits in the kernel's
    buffers, TCP holding the senders back); then each gets back what it sent."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "echo", program("backend.py", f"tcp:127.0.0.1:{upstream}", "--echo"),
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}",
    )
    block = os.urandom(1 << 20)
    async with run_lazyd(tmp_path, config) as lz:
        # A bulk transfer first: the service runs, and lazyd's shared buffer is in use.
        sent, got = await trio.to_thread.run_sync(_bulk, port, 8 << 20)
        assert sent == got
        before = _rss(lz.process.pid)
        clients = []
        for _ in range(8):
            sock = socket.socket()
            # A small, fixed receive buffer on the client: what piles up is lazyd's.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            clients.append(sock)
        hashes = [hashlib.sha256() for _ in clients]
        sent_bytes = [0] * len(clients)
        try:
            # Send until no client can send more, five rounds in a row: every
            # buffer on the way (lazyd's, the backend's, the kernel's) is full.
            # Nothing says so but the sends being refused.
            idle_rounds = 0
            with trio.fail_after(30):
                while idle_rounds < 5:
                    moved = 0
                    for i, sock in enumerate(clients):
                        while True:
                            offset = sent_bytes[i] % len(block)
                            try:
                                n = sock.send(block[offset:])
                            except BlockingIOError:
                                break
                            hashes[i].update(block[offset:offset + n])
                            sent_bytes[i] += n
                            moved += n
                    idle_rounds = idle_rounds + 1 if moved == 0 else 0
                    await trio.sleep(0.02)
            grown = _rss(lz.process.pid) - before
            assert min(sent_bytes) > 1 << 20  # more than one chunk each, stuck on the way
            assert grown < len(clients) * 2 * 64 * 1024 + (2 << 20), (grown, sent_bytes)

            def read_back(sock: socket.socket) -> str:
                sock.setblocking(True)
                sock.settimeout(10)
                sock.shutdown(socket.SHUT_WR)
                received = hashlib.sha256()
                while data := sock.recv(1 << 20):
                    received.update(data)
                return received.hexdigest()

            for sock, sent_hash in zip(clients, hashes, strict=True):
                assert await trio.to_thread.run_sync(read_back, sock) == sent_hash.hexdigest()
        finally:
            for sock in clients:
                sock.close()
