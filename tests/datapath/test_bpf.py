"""The kernel data path against the real kernel: its verifier, sk_lookup and sock_diag."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from lazyd.datapath.bpf import diag, insn, supported, syscall
from lazyd.datapath.bpf.steering import Steering, load
from tests.conftest import free_port

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="loading and attaching BPF programs needs root"
)

# A plain service that binds its own port and tells each client the local
# address of the connection it accepted, so the client learns who answered.
SERVICE = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    host, port = conn.getsockname()[:2]
    conn.sendall(f"service {host}:{port}\\n".encode())
    conn.close()
"""


@pytest.fixture
def steering() -> Iterator[Steering]:
    s = Steering.open()
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def service(host: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A real service process listening on host:port."""
    child = subprocess.Popen(
        [sys.executable, "-c", SERVICE, host, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "listening\n"
        yield child
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def listener(host: str, port: int = 0) -> socket.socket:
    """A plain listener standing for lazyd's own (or an in-process service's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    s.settimeout(2)
    return s


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=2)


def read_line(s: socket.socket) -> str:
    """What the peer sent up to its close."""
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data.decode()


def nothing_pending(s: socket.socket) -> bool:
    """Whether no connection waits in s's accept queue."""
    s.setblocking(False)
    try:
        s.accept()[0].close()
    except BlockingIOError:
        return True
    finally:
        s.settimeout(2)
    return False


def test_encoder_resolves_jumps_over_a_16_byte_load() -> None:
    """Jumps count slots, and the map load takes two: the encoder gets both right."""
    done = insn.Label("done")
    code = insn.assemble([
        insn.jmp(done),
        insn.ld_map_fd(insn.Reg.R1, 7),
        done,
        insn.mov_imm(insn.Reg.R0, 1),
        insn.exit_(),
    ])
    assert code.hex(" ", 8).split() == [
        "0500020000000000",  # goto +2 (over both halves of the lddw)
        "1811000007000000",  # r1 = map fd 7 (src_reg 1: BPF_PSEUDO_MAP_FD)
        "0000000000000000",
        "b700000001000000",  # r0 = 1
        "9500000000000000",  # exit
    ]
    with pytest.raises(ValueError, match="'nowhere', which is never placed"):
        insn.assemble([insn.jmp(insn.Label("nowhere"))])


@needs_root
def test_supported_here() -> None:
    """On this root, recent kernel the kernel data path is usable."""
    assert supported() is None


@needs_root
def test_verifier_accepts_the_program_and_quotes_its_rejections() -> None:
    """The real verifier loads the steering program; a broken one fails with its log."""
    sockets = syscall.map_create(syscall.MAP_SOCKHASH, 24, 8, 4, "t_sockets")
    counters = syscall.map_create(syscall.MAP_HASH, 24, 8, 4, "t_counters")
    try:
        os.close(load(sockets, counters))
        # Returning without setting r0 is the simplest program the verifier refuses.
        with pytest.raises(syscall.VerifierError) as caught:
            syscall.prog_load(
                syscall.PROG_SK_LOOKUP,
                insn.assemble([insn.exit_()]),
                license="GPL",
                name="t_broken",
                expected_attach_type=syscall.ATTACH_SK_LOOKUP,
            )
        assert "R0 !read_ok" in caught.value.log
        assert "BPF_PROG_LOAD t_broken" in str(caught.value)
        assert "R0 !read_ok" in str(caught.value)
    finally:
        os.close(sockets)
        os.close(counters)


@needs_root
def test_service_in_another_process_receives_connections_for_lazyds_address(
    steering: Steering,
) -> None:
    """A connection to A lands in the service's socket on B, and the client still sees A."""
    a = ("127.0.0.1", free_port())
    b = ("127.0.0.1", free_port())
    with listener(*a) as lazyd, service(*b) as child:
        taken = diag.take_listener(child.pid, b)
        assert taken is not None
        assert os.fstat(taken).st_ino == diag.listening_inode(b)
        steering.add(a, taken)
        # The map holds the socket, not this fd: the service's own copy keeps it there.
        os.close(taken)
        assert steering.steering(a)

        with connect(a) as client:
            assert read_line(client) == f"service 127.0.0.1:{a[1]}\n"
            assert client.getpeername() == a
        assert steering.steered(a) == 1
        assert nothing_pending(lazyd)

        assert steering.remove(a)
        with connect(a) as client:
            conn, _ = lazyd.accept()
            conn.close()
        assert steering.steered(a) == 1
        assert not steering.remove(a)


@needs_root
def test_closing_the_steering_stops_it() -> None:
    """Once closed, nothing steers: new connections reach lazyd's listener."""
    a = ("127.0.0.1", free_port())
    with listener(*a) as lazyd, listener("127.0.0.1") as target:
        s = Steering.open()
        s.add(a, target)
        with connect(a):
            target.accept()[0].close()
        s.close()
        s.close()
        with connect(a):
            lazyd.accept()[0].close()
        assert nothing_pending(target)
        with pytest.raises(ValueError, match="steering is closed"):
            s.add(a, target)


@needs_root
def test_counter_counts_steered_connections_only(steering: Steering) -> None:
    """Each steered connection bumps its entry's count; others and other entries do not."""
    a = ("127.0.0.1", free_port())
    other = ("127.0.0.1", free_port())
    with listener("127.0.0.1") as target, listener(*other), listener("127.0.0.1") as target2:
        steering.add(a, target)
        steering.add(other, target2)
        for _ in range(3):
            with connect(a):
                target.accept()[0].close()
        assert (steering.steered(a), steering.steered(other)) == (3, 0)
        steering.add(a, target)
        assert steering.steered(a) == 0, "a new entry starts counting afresh"


@needs_root
def test_same_port_on_different_addresses_goes_to_different_services(
    steering: Steering,
) -> None:
    """127.0.0.1:A and 127.0.0.2:A steer apart; a wildcard entry takes only the rest."""
    port = free_port()
    one, two, rest = (listener("127.0.0.1") for _ in range(3))
    with one, two, rest:
        steering.add(("127.0.0.1", port), one)
        steering.add(("127.0.0.2", port), two)
        with pytest.raises(ConnectionRefusedError):
            connect(("127.0.0.3", port)).close()

        steering.add(("0.0.0.0", port), rest)
        for host, expected in (("127.0.0.1", one), ("127.0.0.2", two), ("127.0.0.3", rest)):
            with connect((host, port)):
                conn, _ = expected.accept()
                assert conn.getsockname() == (host, port)
                conn.close()
        assert all(nothing_pending(s) for s in (one, two, rest))
        assert steering.steered(("127.0.0.1", port)) == 1
        assert steering.steered(("0.0.0.0", port)) == 1


@needs_root
def test_ipv6_address_is_steered(steering: Steering) -> None:
    """An entry for [::1]:A steers IPv6 connections, and not IPv4 ones to 127.0.0.1:A."""
    try:
        target = listener("::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    port = free_port(host="::1")
    with target:
        steering.add(("::1", port), target)
        with connect(("::1", port)):
            conn, _ = target.accept()
            assert conn.getsockname()[:2] == ("::1", port)
            conn.close()
        with pytest.raises(ConnectionRefusedError):
            connect(("127.0.0.1", port)).close()
        assert steering.steered(("::1", port)) == 1


@needs_root
def test_socket_the_kernel_refuses_leaves_the_connection_to_lazyd(steering: Steering) -> None:
    """IPv4 goes to a dual-stack IPv6 socket; a v6-only one is refused and lazyd gets it."""
    a = ("127.0.0.1", free_port())
    try:
        dual = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        v6only = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as e:
        pytest.skip(f"no IPv6 here: {e}")
    with dual, v6only, listener(*a) as lazyd:
        dual.settimeout(2)
        steering.add(a, dual)
        with connect(a):
            conn, _ = dual.accept()
            assert conn.getsockname()[:2] == (f"::ffff:{a[0]}", a[1])
            conn.close()
        steering.add(a, v6only)
        with connect(a):
            lazyd.accept()[0].close()
        assert nothing_pending(v6only)
        assert steering.steered(a) == 0


@needs_root
def test_closed_service_socket_leaves_the_map_and_traffic_falls_back(
    steering: Steering,
) -> None:
    """When the service's socket closes, its entry goes and lazyd's listener gets the next."""
    a = ("127.0.0.1", free_port())
    with listener(*a) as lazyd:
        target = listener("127.0.0.1")
        steering.add(a, target)
        target.close()
        assert not steering.steering(a)
        with connect(a):
            lazyd.accept()[0].close()
        assert steering.steered(a) == 0


@needs_root
def test_only_listening_tcp_sockets_are_accepted(steering: Steering) -> None:
    """add() refuses a connected socket or a UDP one with a clear error."""
    a = ("127.0.0.1", free_port())
    refused = pytest.raises(ValueError, match=f"127.0.0.1:{a[1]}: fd .* not a listening TCP")
    with listener("127.0.0.1") as server, connect(server.getsockname()) as client, refused:
        steering.add(a, client)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp, pytest.raises(ValueError, match="not a listening TCP"):
        steering.add(a, udp)
    with pytest.raises(ValueError, match="'localhost' is not an IP address"):
        steering.add(("localhost", a[1]), 0)


@needs_root
def test_map_updates_after_dropping_root(steering: Steering) -> None:
    """A child that dropped to nobody, keeping only the fds, adds and removes entries."""
    nobody = pwd.getpwnam("nobody")
    a = ("127.0.0.1", free_port())
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        status = 1
        try:
            os.close(to_child_w)
            os.close(from_child_r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                Steering.open().close()
                status = 2  # still privileged: the test would prove nothing
            except PermissionError:
                own = listener("127.0.0.1")
                steering.add(a, own)
                os.write(from_child_w, b"added\n")
                conn, _ = own.accept()
                conn.sendall(f"uid {os.getuid()}\n".encode())
                conn.close()
                steering.remove(a)
                os.write(from_child_w, b"removed\n")
                os.read(to_child_r, 1)
                status = 0
        finally:
            os._exit(status)
    os.close(to_child_r)
    os.close(from_child_w)
    with os.fdopen(from_child_r) as reports, listener(*a) as lazyd:
        try:
            assert reports.readline() == "added\n"
            with connect(a) as client:
                assert read_line(client) == f"uid {nobody.pw_uid}\n"
            assert reports.readline() == "removed\n"
            with connect(a):
                lazyd.accept()[0].close()
        finally:
            os.close(to_child_w)
            _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@needs_root
def test_diag_counts_open_connections_to_an_address(steering: Steering) -> None:
    """0 connections, then 3 (queued or accepted, steered or not), then 0 after close."""
    a = ("127.0.0.1", free_port())
    other = ("127.0.0.1", free_port())
    with listener(*a) as lazyd, listener(*other) as unrelated, listener("127.0.0.1") as target:
        assert diag.open_connections(a) == 0
        clients = [connect(a), connect(a)]
        noise = connect(other)
        accepted = [lazyd.accept()[0]]
        steering.add(a, target)
        clients.append(connect(a))  # steered into target: its local address is still A
        assert diag.open_connections(a) == 3
        assert diag.open_connections(("0.0.0.0", a[1])) == 3
        assert diag.open_connections(("127.0.0.2", a[1])) == 0
        accepted += [lazyd.accept()[0], target.accept()[0]]
        assert diag.open_connections(a) == 3
        for s in clients + accepted:
            s.close()
        noise.close()
        unrelated.accept()[0].close()
        # The last ACK of a close on loopback takes microseconds; no event marks it.
        deadline = time.monotonic() + 2
        while diag.open_connections(a) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert diag.open_connections(a) == 0


@needs_root
def test_diag_finds_a_listener_only_where_it_listens() -> None:
    """A process's listener fd is found for its address (or its wildcard), never another."""
    with listener("127.0.0.1") as own, listener("0.0.0.0") as wide:
        address = own.getsockname()
        assert diag.listener_fd(os.getpid(), address) == own.fileno()
        assert diag.listener_fd(os.getpid(), ("127.0.0.2", address[1])) is None
        assert diag.listener_fd(os.getpid(), ("127.0.0.1", free_port())) is None
        assert diag.listener_fd(os.getpid(), ("127.0.0.5", wide.getsockname()[1])) == wide.fileno()
    with service("127.0.0.1", free_port()) as child:
        assert diag.take_listener(child.pid, address) is None
    assert diag.take_listener(child.pid, address) is None  # the process is gone


def test_supported_says_why_not_without_root() -> None:
    """Without root, supported() gives a reason naming root instead of failing later."""
    nobody = pwd.getpwnam("nobody")
    if os.geteuid() != 0:
        reason = supported()
        assert reason is not None and "root" in reason
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(write_end, str(supported()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        reason = answer.read().decode()
    os.waitpid(pid, 0)
    assert "needs root" in reason
