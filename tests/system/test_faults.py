"""Faults lazyd must survive: crashes of its own, malformed requests, restarts, and
clients and backends that misbehave (silent, not reading, flooding)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import trio

from lazyd.runtime import control
from tests.conftest import (
    exchange,
    free_port,
    needs,
    program,
    proxy_service,
    run_lazyd,
    wait_gone,
    yaml_quote,
)
from tests.observe.test_metrics import scrape, value


def _config(port: int, unix: Path) -> str:
    return (
        "services:\n"
        "  web:\n"
        f"    command: {program('serve_lines.py', 0)}\n"
        "    user: root\n"
        "    sockets:\n"
        f"      tcp: tcp://127.0.0.1:{port}\n"
        "  local:\n"
        f"    command: {program('serve_lines.py', 0)}\n"
        "    user: root\n"
        "    sockets:\n"
        f"      unix: unix:{unix}\n"
    )


async def test_sigkill_then_immediate_restart_binds_the_same_addresses(tmp_path: Path) -> None:
    """lazyd killed with SIGKILL (its Unix socket files left behind, connections in
    TIME_WAIT): its services die with it, and it starts again at once on the same
    addresses and serves."""
    port, unix = free_port(), tmp_path / "web.sock"
    async with run_lazyd(tmp_path, _config(port, unix), expect_exit=None) as lz:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"one\n")
            assert s.recv(100).endswith(b" one\n")
        service = (await lz.status())["web"]["pid"]
        os.killpg(lz.process.pid, signal.SIGKILL)
        await lz.process.wait()
    # The service runs in a session of its own, out of reach of the killpg above; the
    # spawner sees lazyd go and takes the services with it.
    with trio.fail_after(2):
        await wait_gone(service)
    assert unix.exists()  # left behind by the crash
    async with run_lazyd(tmp_path, _config(port, unix)) as lz:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"two\n")
            assert s.recv(100).endswith(b" two\n")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(unix))
            s.sendall(b"three\n")
            assert s.recv(100).endswith(b" three\n")


def _raw_control(path: str, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = json.loads(s.makefile("rb").readline())
        assert isinstance(reply, dict)
        return reply


async def test_malformed_control_requests_are_answered_and_harmless(tmp_path: Path) -> None:
    """Garbage, non-objects, unknown versions and commands on the control socket each get
    a clear error reply; the daemon keeps answering; the socket is mode 0600."""
    port, unix = free_port(), tmp_path / "web.sock"
    async with run_lazyd(tmp_path, _config(port, unix)) as lz:
        path = lz.control_path
        assert os.stat(path).st_mode & 0o777 == 0o600
        cases = {
            b"not json\n": "request is not JSON",
            b"[1, 2]\n": "request must be a JSON object",
            b'{"version": 99, "command": "status"}\n': "protocol version 99 is not supported",
            b'{"version": 1}\n': "request has no command",
            b'{"version": 1, "command": "explode"}\n': "unknown command 'explode'",
            b"\xff\xfe\n": "request is not JSON",
        }
        for payload, expected in cases.items():
            reply = await trio.to_thread.run_sync(_raw_control, path, payload)
            assert reply["ok"] is False and expected in str(reply["error"]), (payload, reply)
        big = b"x" * (control.MAX_REQUEST + 10)
        reply = await trio.to_thread.run_sync(_raw_control, path, big)
        assert reply["ok"] is False and "too long" in str(reply["error"])
        assert "web" in await lz.status()


# --- Clients and backends that misbehave, in proxy mode ------------------------------


def _fds(pid: int) -> list[str]:
    """What the process's file descriptors are ("socket", "pipe", a path...), sorted."""
    kinds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            kinds.append(re.sub(r":\[\d+\]$", "", os.readlink(f"/proc/{pid}/fd/{fd}")))
    return sorted(kinds)


async def _settled_fds(pid: int) -> list[str]:
    """The process's fds once two readings 50 ms apart agree: the server side of the
    status request just made may still be closing."""
    with trio.fail_after(5):
        now = _fds(pid)
        while True:
            await trio.sleep(0.05)
            now, before = _fds(pid), now
            if now == before:
                return now


def _rss_kb(pid: int) -> int:
    """The process's resident set, in KiB (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _proxy(name: str, command: str, port: int, upstream: int, *extra: str) -> str:
    return "services:\n" + proxy_service(
        name, command, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}", *extra)



async def _read_to_end(stream: trio.SocketStream) -> bytes:
    """Everything until EOF; a reset counts as the end too (the client was told)."""
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def test_silent_client_while_never_ready_is_closed_at_start_timeout(tmp_path: Path) -> None:
    """A client that connects and sends nothing to a service that never gets ready is held
    until start_timeout, then closed; the log says why; lazyd keeps no fd of it."""
    port, upstream = free_port(), free_port()
    config = _proxy("never", "[sleep, '30']", port, upstream, "start_timeout: 500ms",
                    "start_limit: 100")
    async with run_lazyd(tmp_path, config) as lz:
        before = await _settled_fds(lz.process.pid)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with trio.fail_after(5):
                start = trio.current_time()
                assert await _read_to_end(stream) == b""
                held = trio.current_time() - start
        assert 0.4 < held < 3, held
        line = await lz.wait_line(r"^never: closed \d+ held connection")
        assert "not ready within 0.5 s" in line
        await lz.wait_state("never", "idle")
        assert await _settled_fds(lz.process.pid) == before
        assert "Traceback" not in lz.log()


async def test_silent_client_is_closed_when_the_backend_times_it_out(tmp_path: Path) -> None:
    """A client that connects and sends nothing to a ready backend with its own read
    timeout: when the backend closes, lazyd passes the EOF on, and once the client has
    closed too lazyd holds no fd of the connection (its fd count is back where it was)."""
    port, upstream = free_port(), free_port()
    command = program("stall_backend.py", f"127.0.0.1:{upstream}", "--read-timeout", "0.3")
    async with run_lazyd(tmp_path, _proxy("strict", command, port, upstream)) as lz:
        assert (await exchange(port, b"warm\n")).endswith(b" warm\n")
        await lz.wait_status("strict", active=0)
        before = await _settled_fds(lz.process.pid)
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
        for stream in streams:
            async with stream:
                with trio.fail_after(5):
                    assert await _read_to_end(stream) == b""
        await lz.wait_line(r"^strict: closing a connection that sent nothing", count=5)
        await lz.wait_status("strict", active=0)
        assert await _settled_fds(lz.process.pid) == before
        assert (await lz.status())["strict"]["state"] == "running"
        assert "Traceback" not in lz.log()


async def test_a_backend_that_stops_reading_pushes_back_on_the_client(tmp_path: Path) -> None:
    """200 MB pushed at a backend that reads nothing: the client's send blocks long before
    the end (lazyd buffers nothing without bound: its RSS grows by less than 4 MB); once the
    backend reads, every byte arrives intact (same length and SHA-256)."""
    port, upstream = free_port(), free_port()
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    command = program("stall_backend.py", f"127.0.0.1:{upstream}", "--gate", gate)
    total, block = 200 * 2**20, os.urandom(2**20)
    async with run_lazyd(tmp_path, _proxy("sink", command, port, upstream)) as lz:
        # Warm up: the service runs, and lazyd has forwarded a connection once.
        warm = await trio.open_tcp_stream("127.0.0.1", port)
        async with warm:
            await warm.send_all(b"x" * 300_000)
            await warm.send_eof()
            gate_writer = await trio.to_thread.run_sync(gate.open, "wb")
            gate_writer.close()
            assert (await _read_to_end(warm)).startswith(b"300000 ")
        await lz.wait_status("sink", active=0)
        rss_before = _rss_kb(lz.process.pid)
        digest = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setblocking(False)
            sent = 0
            pending = memoryview(b"")
            blocked = False
            with trio.fail_after(30):
                while not blocked:
                    if not pending:
                        chunk = sent.to_bytes(8, "big") + block[8:]
                        digest.update(chunk)
                        pending = memoryview(chunk)
                    try:
                        n = sock.send(pending)
                    except BlockingIOError:
                        # Blocked: if the socket stays unwritable for a second, nobody is
                        # reading at the other end of lazyd.
                        with trio.move_on_after(1.0):
                            await trio.lowlevel.wait_writable(sock)
                            continue
                        blocked = True
                        continue
                    pending = pending[n:]
                    sent += n
            assert sent < total // 2, f"{sent} bytes were taken before the send blocked"
            rss_blocked = _rss_kb(lz.process.pid)
            assert rss_blocked - rss_before < 4096, (rss_before, rss_blocked)
            # Open the gate: the backend reads everything from now on.
            gate_writer = await trio.to_thread.run_sync(gate.open, "wb")
            gate_writer.close()
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            with trio.fail_after(60):
                await stream.send_all(pending)
                sent += len(pending)
                while sent < total:
                    chunk = sent.to_bytes(8, "big") + block[8:]
                    digest.update(chunk)
                    await stream.send_all(chunk)
                    sent += len(chunk)
                await stream.send_eof()
                answer = await _read_to_end(stream)
        assert answer == b"%d %s\n" % (total, digest.hexdigest().encode())
        assert _rss_kb(lz.process.pid) - rss_before < 4096
        assert "Traceback" not in lz.log()


@needs("systemd-notify")
async def test_a_datagram_flood_while_starting_is_bounded_counted_and_delivered_in_order(
    tmp_path: Path,
) -> None:
    """500 datagrams during a start with datagram_queue_limit 50: lazyd keeps answering
    status throughout, holds the first 50 and delivers them in order once the service is
    ready, and counts the other 450 as dropped (lazyd_datagrams_dropped); then traffic
    flows normally."""
    port, upstream, metrics = (free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM),
                               free_port())
    # The backend listens at once, but the service says READY=1 only when the test opens
    # (and closes) the gate: the start lasts exactly as long as the flood.
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    backend = program("backend.py", f"udp:127.0.0.1:{upstream}")[1:-1].replace('"', "")
    script = f"{backend.replace(', ', ' ')} & read x < {gate}; systemd-notify --ready; wait"
    config = f"metrics: tcp://127.0.0.1:{metrics}\n" + _proxy(
        "quic", f"[sh, -c, {yaml_quote(script)}]", port, upstream,
        "ready: notify", "datagram_queue_limit: 50",
    ).replace("tcp://127.0.0.1:", "udp://127.0.0.1:")

    def dropped(samples: dict[str, Any]) -> float:
        return value(samples, "lazyd_datagrams_dropped", "lazyd_datagrams_dropped_total",
                     service="quic")

    async with run_lazyd(tmp_path, config) as lz:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            # In bursts of 50, each counted before the next: the kernel's receive buffer
            # must not be what drops them, lazyd's queue limit must.
            for burst in range(10):
                for i in range(burst * 50, burst * 50 + 50):
                    client.sendto(b"d-%d" % i, ("127.0.0.1", port))
                with trio.fail_after(5):
                    while True:
                        svc = (await lz.status())["quic"]
                        assert svc["state"] == "starting", svc
                        if svc["queued"] == 50 and dropped(await scrape(metrics)) == burst * 50:
                            break
                        await trio.sleep(0.01)
            await lz.wait_line(r"^quic: listening")
            gate_writer = await trio.to_thread.run_sync(gate.open, "wb")
            gate_writer.close()
            await lz.wait_state("quic", "running")
            replies = [await trio.to_thread.run_sync(client.recv, 65536) for _ in range(50)]
            assert [r.split(b" ", 2)[2] for r in replies] == [b"d-%d" % i for i in range(50)]
            # Nothing beyond the 50 comes: the next reply is the answer to a new datagram.
            client.sendto(b"after", ("127.0.0.1", port))
            reply = await trio.to_thread.run_sync(client.recv, 65536)
            assert reply.split(b" ", 2)[2] == b"after"
        assert dropped(await scrape(metrics)) == 450
        assert "Traceback" not in lz.log()


async def test_a_client_refused_by_a_service_on_its_way_out_is_answered_by_the_next(
    tmp_path: Path,
) -> None:
    """A proxy service closes its listening socket half a second before it exits, as a
    service on its way out does: a client connecting in between, while lazyd still has it
    running, is refused by the upstream, held again, and answered by the service started
    after the exit (it used to be closed: the chaos walk found it), without spinning on
    the refused connects meanwhile."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + proxy_service(
        "web", program("backend.py", f"tcp:127.0.0.1:{upstream}"),
        f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}",
    )
    async with run_lazyd(tmp_path, config) as lz:
        for _round in range(2):
            leaving = await exchange(port, b"stop listening\n")
            old_pid = int(leaving.split()[0])
            with trio.fail_after(10):
                answer = await exchange(port, b"next\n")
            pid, line = answer.split(b" ", 1)
            assert line == b"next\n" and int(pid) != old_pid
        assert "holding the connection" in lz.log()
        assert "closing the connection" not in lz.log()
        # Tried again every 50 ms for the 0.5 s until the exit, not at every
        # turn of lazyd's event loop (it did, tens of thousands of times).
        for failures in re.findall(r"works again \((\d+) failures in a row\)", lz.log()):
            assert int(failures) <= 30
