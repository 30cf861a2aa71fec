from __future__ import annotations

import fcntl
import grp
import os
import pwd
import resource
import socket
import stat
from pathlib import Path

import pytest

from lazyd.config import Config, ServiceConfig, SocketConfig
from lazyd.errors import BindError
from lazyd.net.addresses import Address, Kind, parse_address
from lazyd.runtime.binding import (
    accept_queue_length,
    bind_all,
    bind_socket,
    raise_fd_limit,
    release,
)

TIMEOUT = 5.0  # seconds; every blocking call in these tests is bounded by it


def tcp(host: str, port: int = 0) -> Address:
    return Address(Kind.TCP, host=host, port=port)


def sockconf(listen: Address | str, name: str = "s", **kw: object) -> SocketConfig:
    addr = parse_address(listen) if isinstance(listen, str) else listen
    return SocketConfig(name=name, listen=addr, **kw)  # type: ignore[arg-type]


def config(**services: tuple[SocketConfig, ...]) -> Config:
    return Config(
        path="lazyd.yaml",
        services={
            name: ServiceConfig(name=name, command=("true",), sockets=socks)
            for name, socks in services.items()
        },
    )


def bind(sockets: list[socket.socket], sc: SocketConfig) -> socket.socket:
    sock = bind_socket(sc)
    sockets.append(sock)
    return sock


def client(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.settimeout(TIMEOUT)
    return sock


def assert_stream_works(
    listener: socket.socket, family: socket.AddressFamily, to: tuple[str, int] | str
) -> str:
    """Connect, accept, exchange a byte each way; return the peer address as the server saw it."""
    with client(family, socket.SOCK_STREAM) as c:
        c.connect(to)
        conn, peer = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            c.sendall(b"x")
            assert conn.recv(1) == b"x"
            conn.sendall(b"y")
            assert c.recv(1) == b"y"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def assert_blocking(sock: socket.socket) -> None:
    assert sock.getblocking()
    assert not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    assert not sock.get_inheritable()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_tcp_v4(sockets: list[socket.socket]) -> None:
    """A tcp://127.0.0.1 socket is a blocking IPv4 listener with SO_REUSEADDR."""
    sock = bind(sockets, sockconf(tcp("127.0.0.1")))
    assert sock.family == socket.AF_INET
    assert_blocking(sock)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert_stream_works(sock, socket.AF_INET, sock.getsockname())


def test_tcp_v6_only(sockets: list[socket.socket]) -> None:
    """A tcp://[::1] socket is IPv6 only."""
    sock = bind(sockets, sockconf(tcp("::1")))
    assert sock.family == socket.AF_INET6
    assert_blocking(sock)
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert_stream_works(sock, socket.AF_INET6, sock.getsockname()[:2])


def test_dual_stack_takes_v4_and_v6(sockets: list[socket.socket]) -> None:
    """A bare port accepts both an IPv4 and an IPv6 connection on one socket."""
    addr = Address(Kind.TCP, host="::", port=0, dual_stack=True)
    sock = bind(sockets, sockconf(addr))
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    port = sock.getsockname()[1]
    assert assert_stream_works(sock, socket.AF_INET, ("127.0.0.1", port)) == "::ffff:127.0.0.1"
    assert assert_stream_works(sock, socket.AF_INET6, ("::1", port)) == "::1"


def test_reuse_port(sockets: list[socket.socket]) -> None:
    """reuse_port sets SO_REUSEPORT, so two sockets can share a port."""
    first = bind(sockets, sockconf(tcp("127.0.0.1"), reuse_port=True))
    assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    second = bind(sockets, sockconf(tcp("127.0.0.1", first.getsockname()[1]), reuse_port=True))
    assert second.getsockname() == first.getsockname()


def test_udp(sockets: list[socket.socket]) -> None:
    """A udp socket receives datagrams and is not listening or SO_REUSEADDR."""
    sock = bind(sockets, sockconf(Address(Kind.UDP, host="127.0.0.1", port=0)))
    assert sock.type == socket.SOCK_DGRAM
    assert_blocking(sock)
    assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    with client(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(b"ping", sock.getsockname())
        data, peer = sock.recvfrom(16)
        assert data == b"ping"
        sock.sendto(b"pong", peer)
        assert c.recv(16) == b"pong"


def test_unix_stream(sockets: list[socket.socket], tmp_path: Path) -> None:
    """A unix: socket is a blocking listener at its path, with the default mode 0666."""
    path = str(tmp_path / "s.sock")
    sock = bind(sockets, sockconf(f"unix:{path}"))
    assert_blocking(sock)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    assert_stream_works(sock, socket.AF_UNIX, path)


def test_unix_dgram(sockets: list[socket.socket], tmp_path: Path) -> None:
    """A unix-dgram: socket receives datagrams sent to its path."""
    path = str(tmp_path / "d.sock")
    sock = bind(sockets, sockconf(f"unix-dgram:{path}"))
    assert sock.type == socket.SOCK_DGRAM
    assert_blocking(sock)
    with client(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
        c.sendto(b"log line", path)
        assert sock.recv(64) == b"log line"


def test_abstract(sockets: list[socket.socket], tmp_path: Path) -> None:
    """A unix:@name socket is abstract: it works and creates no file."""
    name = f"@lazyd-test-{os.getpid()}-{tmp_path.name}"
    before = set(os.listdir(tmp_path))
    sock = bind(sockets, sockconf(f"unix:{name}"))
    assert_blocking(sock)
    assert_stream_works(sock, socket.AF_UNIX, "\0" + name[1:])
    assert set(os.listdir(tmp_path)) == before
    assert not os.path.exists(name)


def test_port_in_use_releases_everything(tmp_path: Path) -> None:
    """A busy port names service and socket, and nothing bound before it stays bound."""
    first_port = free_port()
    unix_path = tmp_path / "early.sock"
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        cfg = config(
            db=(sockconf(f"unix:{unix_path}", name="ctl"),),
            web=(
                sockconf(tcp("127.0.0.1", first_port), name="http"),
                sockconf(tcp("127.0.0.1", busy), name="admin"),
            ),
        )
        with pytest.raises(BindError) as info:
            bind_all(cfg)
    assert str(info.value) == (
        f"services.web.sockets.admin (tcp://127.0.0.1:{busy}): cannot bind: Address already in use"
    )
    assert not unix_path.exists()
    # Without SO_REUSEADDR this bind fails if the first socket were still open.
    with socket.socket() as again:
        again.bind(("127.0.0.1", first_port))
        again.listen()


def test_bind_all_in_config_order(tmp_path: Path) -> None:
    """bind_all maps each service to its sockets in config order."""
    cfg = config(
        web=(
            sockconf(tcp("127.0.0.1"), name="http"),
            sockconf(Address(Kind.UDP, host="127.0.0.1", port=0), name="quic"),
        ),
        log=(sockconf(f"unix-dgram:{tmp_path / 'log.sock'}", name="in"),),
    )
    socks = bind_all(cfg)
    try:
        assert list(socks) == ["web", "log"]
        assert [s.type for s in socks["web"]] == [socket.SOCK_STREAM, socket.SOCK_DGRAM]
        assert socks["log"][0].getsockname() == str(tmp_path / "log.sock")
    finally:
        release(cfg, socks)


def test_stale_socket_file_is_replaced(sockets: list[socket.socket], tmp_path: Path) -> None:
    """A socket file nobody answers on, left by a crashed run, is replaced."""
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)
        dead.listen()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    sock = bind(sockets, sockconf(f"unix:{path}"))
    assert_stream_works(sock, socket.AF_UNIX, path)


def test_stale_dgram_socket_file_is_replaced(sockets: list[socket.socket], tmp_path: Path) -> None:
    """The same holds for a datagram socket file."""
    path = str(tmp_path / "d.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
        dead.bind(path)
    sock = bind(sockets, sockconf(f"unix-dgram:{path}"))
    with client(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
        c.sendto(b"x", path)
        assert sock.recv(1) == b"x"


def test_regular_file_is_left_alone(tmp_path: Path) -> None:
    """A regular file at the socket path is an error and is not touched."""
    path = tmp_path / "s.sock"
    path.write_text("precious")
    with pytest.raises(BindError) as info:
        bind_socket(sockconf(f"unix:{path}", name="ctl"))
    assert str(info.value) == (
        f"sockets.ctl (unix:{path}): cannot bind: "
        f"{path} exists and is not a socket; it will not be replaced"
    )
    assert path.read_text() == "precious"


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_live_socket_is_in_use(tmp_path: Path, kind: socket.SocketKind) -> None:
    """A path some live process is bound on is an error, whatever its socket type."""
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, kind) as live:
        live.bind(path)
        if kind == socket.SOCK_STREAM:
            live.listen()
        with pytest.raises(BindError, match="is in use by another process"):
            bind_socket(sockconf(f"unix:{path}"))
        with pytest.raises(BindError, match="is in use by another process"):
            bind_socket(sockconf(f"unix-dgram:{path}"))
        assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_full_backlog_is_in_use(tmp_path: Path) -> None:
    """A live listener whose backlog is full still counts as in use (no blocking probe)."""
    path = str(tmp_path / "s.sock")
    clients: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen(0)
        try:
            for _ in range(4):  # fill it: a backlog of 0 holds one or two
                c = socket.socket(socket.AF_UNIX)
                clients.append(c)
                c.setblocking(False)
                if c.connect_ex(path) != 0:
                    break
            with pytest.raises(BindError, match="is in use by another process"):
                bind_socket(sockconf(f"unix:{path}"))
        finally:
            for c in clients:
                c.close()


def test_missing_directory(tmp_path: Path) -> None:
    """A socket path in a directory that does not exist is a clear error."""
    missing = tmp_path / "no" / "such"
    with pytest.raises(BindError) as info:
        bind_socket(sockconf(f"unix:{missing / 's.sock'}", name="ctl"))
    assert str(info.value).endswith(f"cannot bind: directory {missing} does not exist")


def test_mode_owner_group(sockets: list[socket.socket], tmp_path: Path) -> None:
    """mode, owner and group are applied to the socket file."""
    path = tmp_path / "s.sock"
    bind(sockets, sockconf(f"unix:{path}", mode=0o660, owner="nobody", group="nogroup"))
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == pwd.getpwnam("nobody").pw_uid
    assert st.st_gid == grp.getgrnam("nogroup").gr_gid


def test_group_only(sockets: list[socket.socket], tmp_path: Path) -> None:
    """A group without an owner changes the group and keeps our user."""
    path = tmp_path / "s.sock"
    bind(sockets, sockconf(f"unix-dgram:{path}", mode=0o600, group="nogroup"))
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert st.st_gid == grp.getgrnam("nogroup").gr_gid


def test_unknown_owner_creates_nothing(tmp_path: Path) -> None:
    """An unknown owner is an error raised before any file is created."""
    path = tmp_path / "s.sock"
    with pytest.raises(BindError, match="owner 'no-such-user-lazyd': no such user"):
        bind_socket(sockconf(f"unix:{path}", owner="no-such-user-lazyd"))
    assert not path.exists()


def test_release_unlinks_and_is_idempotent(tmp_path: Path) -> None:
    """release closes every socket, removes the files lazyd made, and can run twice."""
    path = tmp_path / "s.sock"
    cfg = config(
        web=(sockconf(f"unix:{path}", name="http"), sockconf(tcp("127.0.0.1"), name="tcp")),
    )
    socks = bind_all(cfg)
    assert path.exists()
    release(cfg, socks)
    assert not path.exists()
    assert all(s.fileno() == -1 for s in socks["web"])
    release(cfg, socks)


def test_release_spares_a_file_bound_since(tmp_path: Path) -> None:
    """release never removes a socket file that another process bound after lazyd's."""
    path = str(tmp_path / "s.sock")
    cfg = config(web=(sockconf(f"unix:{path}", name="http"),))
    socks = bind_all(cfg)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        release(cfg, socks)
        assert os.path.exists(path)


def test_release_spares_inherited_sockets(tmp_path: Path) -> None:
    """A socket lazyd did not bind itself (say, from LISTEN_FDS) keeps its file."""
    path = str(tmp_path / "s.sock")
    inherited = socket.socket(socket.AF_UNIX)
    inherited.bind(path)
    release(config(web=(sockconf(f"unix:{path}"),)), {"web": [inherited]})
    assert inherited.fileno() == -1
    assert os.path.exists(path)


def test_accept_queue_length(sockets: list[socket.socket]) -> None:
    """accept_queue_length counts connections waiting for accept()."""
    listener = bind(sockets, sockconf(tcp("127.0.0.1")))
    assert accept_queue_length(listener) == 0
    clients = [client(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for c in clients:
            # On loopback the handshake completes inside connect(), so the
            # connection is in the accept queue by the time it returns.
            c.connect(listener.getsockname())
        assert accept_queue_length(listener) == 3
        for _ in clients:
            listener.accept()[0].close()
        assert accept_queue_length(listener) == 0
    finally:
        for c in clients:
            c.close()


def test_accept_queue_length_none_for_others(sockets: list[socket.socket], tmp_path: Path) -> None:
    """accept_queue_length is None for UDP, Unix and non-listening TCP sockets."""
    udp = bind(sockets, sockconf(Address(Kind.UDP, host="127.0.0.1", port=0)))
    assert accept_queue_length(udp) is None
    unix = bind(sockets, sockconf(f"unix:{tmp_path / 's.sock'}"))
    assert accept_queue_length(unix) is None
    with socket.socket() as plain:
        assert accept_queue_length(plain) is None


def test_raise_fd_limit() -> None:
    """raise_fd_limit returns the old limits and leaves soft == hard."""
    original = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = original
    lowered = min(soft, 256)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        assert raise_fd_limit() == (lowered, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, original)
