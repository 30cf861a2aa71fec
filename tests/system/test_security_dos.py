"""Denial of service against a real daemon run as root: nothing a stranger sends
stalls lazyd, and no one client can lock the others out."""

from __future__ import annotations

import array
import os
import pwd
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from lazyd.observe.metrics import REQUEST_TIMEOUT
from tests.conftest import LazydProcess, exchange, free_port, program, run_lazyd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attacks a daemon run as root")

NOBODY = pwd.getpwnam("nobody")
LINGER = 8  # seconds a close of the attacker's socket would block
ANSWER_WITHIN = 1.0  # what "answered" means for the victim, in seconds


# --- the attacker, a local user -------------------------------------------------------


@contextmanager
def as_nobody(attack: Callable[[], None]) -> Iterator[None]:
    """Run `attack` in a forked child as nobody; it stays alive (holding whatever
    it opened) until the block ends.  Fails if the attack raised."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no trio, no pytest, only the attack
        status = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            attack()
            os.write(ready_w, b"+")
            os.read(done_r, 1)  # until the parent has seen what it wanted
            status = 0
        except BaseException as exc:  # reported through the pipe
            os.write(ready_w, f"-{exc!r}".encode())
        os._exit(status)
    os.close(ready_w)
    os.close(done_r)
    try:
        report = os.read(ready_r, 4096).decode()
        assert report == "+", f"the attack failed: {report[1:]}"
        yield
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def lingering_socket() -> socket.socket:
    """A TCP socket whose last close blocks for LINGER seconds: data its peer never
    reads fills both buffers, and SO_LINGER says to wait for it to be acknowledged."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    sender = socket.create_connection(server.getsockname())
    receiver, _ = server.accept()  # never reads; kept open by being referenced below
    sender.setblocking(False)
    try:
        while True:
            sender.send(b"x" * 65536)
    except BlockingIOError:
        pass
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER))
    _KEEP.extend([server, receiver])
    return sender


_KEEP: list[socket.socket] = []  # in the attacker: the far ends that never read


def send_fd(sock: socket.socket, data: bytes, fd: int, to: str | None = None) -> bool:
    """Send `data` with `fd` attached; False if the socket refuses fds (EPERM)."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    try:
        if to is None:
            sock.sendmsg([data], rights)
        else:
            sock.sendmsg([data], rights, 0, to)
    except PermissionError:
        return False  # SO_PASSRIGHTS off: the kernel refused to carry it
    return True


def hand_over(send: Callable[[int], bool]) -> None:
    """Send lazyd a lingering socket so that lazyd holds its last reference.

    Whoever closes last waits the linger time.  The attacker closes its copy
    right after sending, in a thread: a close that returns at once means lazyd
    still holds one (the attack is set); one that blocks means lazyd closed
    first, and the attacker tries again with a new socket.
    """
    for _ in range(20):
        lingering = lingering_socket()
        sent = send(lingering.fileno())
        closing = threading.Thread(target=lingering.close, daemon=True)
        closing.start()
        closing.join(0.1)
        if not sent or not closing.is_alive():
            return
    raise RuntimeError("lazyd never held the last reference")


def notify_socket_of(lz: LazydProcess, service: str) -> str:
    """The abstract notify socket of `service`, as any local user sees it in /proc."""
    prefix = f"@lazyd/{lz.process.pid}/{service}/"
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7].startswith(prefix):
            return "\0" + fields[7][1:]
    raise AssertionError(f"no notify socket {prefix}* in /proc/net/unix")


async def timed_exchange(port: int, payload: bytes = b"hello\n") -> float:
    """Seconds a proxied request takes to be answered (fails after 15 s)."""
    start = time.monotonic()
    with trio.fail_after(15):
        answer = await exchange(port, payload)
    assert answer.endswith(b" " + payload), answer
    return time.monotonic() - start


# --- finding: one fd sent to lazyd froze it ---------------------------------------------


def _freeze_config(tmp_path: Path, port: int, upstream: int) -> str:
    backend = program("backend.py", f"tcp:127.0.0.1:{upstream}")
    return (
        "services:\n"
        "  web:\n"
        "    mode: proxy\n"
        f"    command: {backend}\n"
        "    user: root\n"
        "    sockets:\n"
        f"      main: {{listen: 'tcp://127.0.0.1:{port}', upstream: 'tcp://127.0.0.1:{upstream}'}}\n"
        f"      local: {{listen: 'unix:{tmp_path}/web.sock', upstream: 'tcp://127.0.0.1:{upstream}'}}\n"
        "  notified:\n"
        f"    command: {program('serve_lines.py')}\n"
        "    user: root\n"
        "    ready: notify\n"
        "    sockets:\n"
        f"      main: tcp://127.0.0.1:{free_port()}\n"
        "  dgram:\n"
        "    mode: proxy\n"
        f"    command: {program('backend.py', f'udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}')}\n"
        "    user: root\n"
        "    ready: {delay: 50ms}\n"
        "    sockets:\n"
        f"      main: {{listen: 'unix-dgram:{tmp_path}/dgram.sock', "
        f"upstream: 'unix-dgram:{tmp_path}/dgram-upstream.sock'}}\n"
    )


@pytest.mark.parametrize("target", ["notify socket", "unix-dgram socket", "unix stream socket"])
async def test_a_lingering_fd_sent_to_lazyd_does_not_stall_other_clients(
    tmp_path: Path, target: str
) -> None:
    """A local user sends lazyd a TCP socket whose close lingers 8 s (to a notify socket,
    a proxied unix-dgram socket, or through a proxied Unix stream): a proxied request
    from someone else is still answered within a second."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, _freeze_config(tmp_path, port, upstream)) as lz:
        assert await timed_exchange(port) < 10  # the cold start
        notify = notify_socket_of(lz, "notified")

        def attack() -> None:
            if target == "notify socket":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                hand_over(lambda fd: send_fd(s, b"BARRIER=1", fd, notify))
            elif target == "unix-dgram socket":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                hand_over(lambda fd: send_fd(s, b"hi", fd, f"{tmp_path}/dgram.sock"))
            else:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(f"{tmp_path}/web.sock")
                hand_over(lambda fd: send_fd(s, b"hi\n", fd))
            _KEEP.append(s)

        with as_nobody(attack):
            await trio.sleep(0.2)  # lazyd receives it and, on the old code, blocks
            took = await timed_exchange(port)
        assert took < ANSWER_WITHIN, f"a request took {took:.1f} s after the {target} attack"
        assert "Traceback" not in lz.log()


async def test_barrier_still_works_for_the_service(tmp_path: Path) -> None:
    """The notify socket still takes the fd of BARRIER=1 and closes it at once, so
    `systemd-notify --ready`'s barrier returns (the notify socket must accept fds)."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, _freeze_config(tmp_path, port, upstream)) as lz:
        notify = notify_socket_of(lz, "notified")
        read_end, write_end = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendmsg([b"BARRIER=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", [write_end]))], 0, notify)
            os.close(write_end)
            os.set_blocking(read_end, False)
            with trio.fail_after(2):
                await trio.lowlevel.wait_readable(read_end)
            assert os.read(read_end, 1) == b""  # lazyd closed its copy
        finally:
            os.close(read_end)


# --- finding: fd exhaustion, then one `status`, killed the daemon ---------------------------


def _udp_config(port: int, upstream: int, *extra: str) -> str:
    lines = [
        "services:",
        "  quic:",
        "    mode: proxy",
        f"    command: {program('backend.py', f'udp:127.0.0.1:{upstream}')}",
        "    user: root",
        "    ready: {delay: 100ms}",
        *(f"    {line}" for line in extra),
        "    sockets:",
        f"      main: {{listen: 'udp://127.0.0.1:{port}', upstream: 'udp://127.0.0.1:{upstream}'}}",
    ]
    return "\n".join(lines) + "\n"


def udp_ask(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = ANSWER_WITHIN,
            ) -> bytes | None:
    """Ask from a fresh source port, sending again every 0.2 s as a real client
    would (a datagram that meets a full receive buffer is lost); the answer, or
    None if none came within `timeout`."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        while (left := deadline - time.monotonic()) > 0:
            s.sendto(data, ("127.0.0.1", port))
            s.settimeout(min(left, 0.2))
            try:
                return s.recv(65536)
            except TimeoutError:
                continue
    return None


async def udp_warm(port: int) -> None:
    """Start the UDP service: ask until it answers (what arrives while it binds is lost)."""
    with trio.fail_after(10):
        while not await trio.to_thread.run_sync(udp_ask, port, b"warm"):
            pass


def udp_spray(port: int, count: int, source: str = "127.0.0.1", paced: bool = False) -> None:
    """One datagram from each of `count` source ports (sockets closed right after);
    `paced`: a pause every 50, so that lazyd's receive buffer keeps up."""
    for n in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, 0))
            s.sendto(b"flood", ("127.0.0.1", port))
        if paced and n % 50 == 49:
            time.sleep(0.002)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
async def test_a_udp_spray_past_the_fd_limit_leaves_lazyd_answering(tmp_path: Path) -> None:
    """With RLIMIT_NOFILE 128, datagrams from 400 source ports do not take lazyd's
    last fds: `lazyd status` answers after the spray and lazyd is still alive."""
    port, upstream = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    prlimit = [str(shutil.which("prlimit")), "--nofile=128:128"]
    # No per-source limit: what is tested is the fd budget.
    config = _udp_config(port, upstream, "max_connections_per_source: 100000")
    async with run_lazyd(tmp_path, config, prefix=prlimit) as lz:
        await udp_warm(port)
        await trio.to_thread.run_sync(udp_spray, port, 400)
        await trio.sleep(0.3)  # let lazyd open what flows it will
        with trio.fail_after(5):
            status = (await lz.status())["quic"]
        assert status["state"] == "running"
        assert status["active"] < 128
        assert lz.process.returncode is None
        assert "Traceback" not in lz.log()


# --- finding: one UDP client locked everyone out -----------------------------------------


async def test_one_udp_client_with_thousands_of_flows_does_not_lock_out_another(
    tmp_path: Path,
) -> None:
    """A local user (as nobody) sends from 5,000 source ports: the default per-source
    limit keeps it to 256 flows, and a client from another address is answered."""
    port, upstream = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    async with run_lazyd(tmp_path, _udp_config(port, upstream)) as lz:
        await udp_warm(port)
        with as_nobody(lambda: udp_spray(port, 5000)):
            answer = await trio.to_thread.run_sync(udp_ask, port, b"me", "127.0.0.2")
            assert answer is not None and answer.endswith(b" me"), answer
            status = (await lz.status())["quic"]
            assert status["active"] <= 256 + 2
            assert status["refused"] > 0
        await lz.wait_line(r"^quic: refused a flow from 127\.0\.0\.1 on main \(")


async def test_a_full_flow_table_gives_way_to_a_new_client(tmp_path: Path) -> None:
    """Even without a per-source limit, 5,000 flows that have gone quiet for a moment
    do not keep a new client out: the least recently used flow gives way."""
    port, upstream = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    config = _udp_config(port, upstream, "max_connections_per_source: 100000")
    async with run_lazyd(tmp_path, config) as lz:
        await udp_warm(port)
        with trio.fail_after(10):
            # Paced, and again until the table is full: what meets a full
            # receive buffer is lost, and each round comes from new ports.
            while (await lz.status())["quic"]["active"] < 4096:
                await trio.to_thread.run_sync(udp_spray, port, 1000, "127.0.0.1", True)
        await trio.sleep(1.1)  # quiet for a second
        answer = await trio.to_thread.run_sync(udp_ask, port, b"me")
        assert answer is not None and answer.endswith(b" me"), answer


# --- finding: no default stopped one client holding every connection ---------------------


def _tcp_config(port: int, upstream: int, *extra: str) -> str:
    lines = [
        "services:",
        "  web:",
        "    mode: proxy",
        f"    command: {program('backend.py', f'tcp:127.0.0.1:{upstream}')}",
        "    user: root",
        *(f"    {line}" for line in extra),
        "    sockets:",
        f"      main: {{listen: 'tcp://0.0.0.0:{port}', upstream: 'tcp://127.0.0.1:{upstream}'}}",
    ]
    return "\n".join(lines) + "\n"


async def test_one_address_holds_at_most_256_connections_by_default(tmp_path: Path) -> None:
    """Without any limit in the config, the 257th idle connection from one address is
    reset, and a client from another address is still answered at once."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, _tcp_config(port, upstream)) as lz:
        assert await timed_exchange(port) < 10
        idle = []
        try:
            for _ in range(256):
                idle.append(await trio.open_tcp_stream("127.0.0.1", port))
            with trio.fail_after(5):
                await lz.wait_status("web", active=256)
            assert await _reset(port)
            start = time.monotonic()
            with trio.fail_after(5):
                other = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
                async with other:
                    await other.send_all(b"other\n")
                    answer = await other.receive_some(100)
            assert answer.endswith(b" other\n") and time.monotonic() - start < ANSWER_WITHIN
        finally:
            for stream in idle:
                await stream.aclose()
        await lz.wait_line(r"^web: refused a connection from 127\.0\.0\.1 on main \(256 "
                           r"connections open from it, max_connections_per_source 256\)")


async def _reset(port: int) -> bool:
    """Whether a connection to `port` is reset (at connect or at the first read)."""
    with trio.fail_after(5):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"x\n")
                return await stream.receive_some(100) == b""
        except (OSError, trio.BrokenResourceError):
            return True


async def test_connection_idle_timeout_closes_only_quiet_connections(tmp_path: Path) -> None:
    """connection_idle_timeout: 300ms closes a forwarded connection that carries nothing
    for that long; one that keeps talking stays open past it."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, _tcp_config(port, upstream,
                                               "connection_idle_timeout: 300ms")):
        quiet = await trio.open_tcp_stream("127.0.0.1", port)
        busy = await trio.open_tcp_stream("127.0.0.1", port)
        async with quiet, busy:
            for stream in (quiet, busy):
                await stream.send_all(b"a\n")
                with trio.fail_after(10):
                    assert (await stream.receive_some(100)).endswith(b" a\n")
            start = time.monotonic()
            for _ in range(6):  # 0.6 s of talk, a line every 0.1 s
                await trio.sleep(0.1)
                await busy.send_all(b"b\n")
                assert (await busy.receive_some(100)).endswith(b" b\n")
            with trio.fail_after(2):
                assert await quiet.receive_some(100) == b""  # closed by lazyd
            assert time.monotonic() - start < 1.0


async def test_an_idle_connection_is_kept_without_connection_idle_timeout(
    tmp_path: Path,
) -> None:
    """By default a forwarded connection that says nothing stays open (a quiet
    websocket is not a broken one)."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, _tcp_config(port, upstream)):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"a\n")
            with trio.fail_after(10):
                assert (await stream.receive_some(100)).endswith(b" a\n")
            await trio.sleep(1.5)
            await stream.send_all(b"b\n")
            with trio.fail_after(2):
                assert (await stream.receive_some(100)).endswith(b" b\n")


# --- finding: idle connections made every scrape fail ------------------------------------


async def test_scrapes_are_answered_while_idle_connections_are_held(tmp_path: Path) -> None:
    """200 connections to the metrics endpoint that say nothing: a scrape is still
    answered (200) within a second, again and again."""
    metrics_port = free_port()
    config = f"metrics: tcp://127.0.0.1:{metrics_port}\n" + _tcp_config(free_port(), free_port())
    async with run_lazyd(tmp_path, config):
        idle = [await trio.open_tcp_stream("127.0.0.1", metrics_port) for _ in range(200)]
        try:
            for _ in range(3):
                start = time.monotonic()
                with trio.fail_after(5):
                    answer = await exchange(metrics_port,
                                            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
                # Held up behind the idle ones, a scrape would wait for their
                # request timeout (5 s); half of it leaves room for a loaded
                # machine (1 s did not, once) and still tells the two apart.
                assert time.monotonic() - start < REQUEST_TIMEOUT / 2
                idle.append(await trio.open_tcp_stream("127.0.0.1", metrics_port))
        finally:
            for stream in idle:
                await stream.aclose()


def test_a_bare_metrics_port_binds_to_loopback(tmp_path: Path) -> None:
    """`metrics: 9464` (no address) means 127.0.0.1: the endpoint has no authentication."""
    from lazyd.config import loads

    config = loads(f"metrics: 9464\n{_tcp_config(free_port(), free_port())}", "lazyd.yaml",
                   as_root=False)
    assert config.metrics is not None and config.metrics.host == "127.0.0.1"
