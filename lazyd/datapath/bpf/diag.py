"""What the kernel knows about TCP sockets: open connections to an address, and listeners.

Once connections are steered, lazyd no longer sees them, yet idle stop must
still mean "no open connection". The kernel's socket table answers that: this
module asks it over a NETLINK_SOCK_DIAG socket (what `ss` uses) with the
kernel doing the filtering (an inet_diag bytecode condition on the local
address and port), so a busy host's other connections never cross into
userspace. It is a few syscalls, meant to be called when a timer is due, not
in a loop.

It also finds which fd of a process is the listening socket bound to an
address (the socket's inode, from sock_diag, matched against the
`socket:[INODE]` links in /proc/PID/fd), so the root helper can take that
socket with pidfd_getfd (`take_listener`).

Counting needs no privilege; reading another user's /proc/PID/fd needs root.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from . import syscall

Address = tuple[str, int]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x01
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
# (sport, dport big-endian; src, dst as 16 bytes; ifindex; cookie).
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s") # the rest (if, cookie) is host order, zero here
_SOCKID_TAIL = 12
# inet_diag_msg: family, state, timer, retrans, sockid, expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_RTA = struct.Struct("=HH")
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_SKV6ONLY = 11
# One bytecode op: code, jump if yes, jump if no; then a host condition:
# family, prefix length, port (-1: any), address.
_BC_OP = struct.Struct("=BBH")
_BC_HOSTCOND = struct.Struct("=BBxxi")
_INET_DIAG_BC_S_COND = 7

# TCP states (include/net/tcp_states.h).
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11

# "Open" means a connection some process still has to deal with: from the
# handshake to the last ACK of a close. TIME_WAIT is only the kernel's memory
# of a closed connection, and LISTEN is not a connection.
OPEN_STATES = frozenset({
    TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_FIN_WAIT1, TCP_FIN_WAIT2,
    TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING,
})  # fmt: skip

_BUFFER = 1 << 16


@dataclass(frozen=True)
class TcpSocket:
    """One socket as sock_diag reports it."""

    family: int
    state: int
    local: Address
    remote: Address
    inode: int
    v6only: bool


def open_connections(address: Address) -> int:
    """How many TCP connections whose local end is address are open (see OPEN_STATES).

    address is a listening address as lazyd binds it: ("127.0.0.1", 80)
    counts connections to that address and port; ("0.0.0.0", 80) to port 80 on
    any IPv4 address (and IPv4 connections on dual-stack sockets); ("::", 80)
    to port 80 on any address of either family, as a dual-stack listener
    receives them. Every process's connections count: lazyd's held ones as
    much as those steered into the service.
    """
    host, port = address
    ip = _ip(host)
    if ip.is_unspecified:
        # A prefix of 0 matches any address, but the kernel still wants one of
        # the family's size (and none for AF_UNSPEC).
        cond_family = socket.AF_INET if ip.version == 4 else socket.AF_UNSPEC
        prefix, packed = 0, bytes(4) if ip.version == 4 else b""
    else:
        cond_family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        prefix, packed = 8 * len(ip.packed), ip.packed
    cond = _BC_HOSTCOND.pack(cond_family, prefix, port) + packed
    # Jumping exactly to the end accepts; 4 bytes past it rejects.
    accept = _BC_OP.size + len(cond)
    bytecode = _BC_OP.pack(_INET_DIAG_BC_S_COND, accept, accept + 4) + cond
    states = sum(1 << s for s in OPEN_STATES)
    count = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        for sock in _dump(family, states, bytecode):
            # The kernel has filtered already; this guards its reading of the filter.
            if sock.local[1] == port:
                count += 1
    return count


def listeners(family: int) -> list[TcpSocket]:
    """Every listening TCP socket of family (AF_INET or AF_INET6) in this namespace."""
    return list(_dump(family, 1 << TCP_LISTEN, b""))


def listening_inode(address: Address) -> int | None:
    """The inode of the TCP socket listening on address, or None.

    An exact bind wins over a wildcard one of the same family, which wins over
    a dual-stack [::] socket for an IPv4 address, as the kernel would choose.
    """
    host, port = address
    ip = _ip(host)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    wildcard = "0.0.0.0" if family == socket.AF_INET else "::"
    found = {(s.family, s.local[0]): s for s in listeners(family) if s.local[1] == port}
    for candidate in ((family, str(ip)), (family, wildcard)):
        if candidate in found:
            return found[candidate].inode
    if family == socket.AF_INET:
        for s in listeners(socket.AF_INET6):
            if s.local == ("::", port) and not s.v6only:
                return s.inode
            if s.local == (f"::ffff:{ip}", port):
                return s.inode
    return None


def listener_fd(pid: int, address: Address) -> int | None:
    """Which fd of process pid is the TCP socket listening on address, or None.

    The answer is a number in pid's fd table, valid at the time of asking;
    `take_listener` finds and takes the socket in one step, safely.
    """
    inode = listening_inode(address)
    if inode is None:
        return None
    return fd_of_inode(pid, inode)


def take_listener(pid: int, address: Address) -> int | None:
    """A copy, in this process, of process pid's TCP socket listening on address (root).

    None if pid has no such socket (or has gone). The process is pinned with a
    pidfd before its fds are read, and the copy's inode is checked against the
    listener's, so a pid reused or an fd number recycled meanwhile yields None
    rather than some other file. The copy is close-on-exec and the caller's to close.
    """
    try:
        pidfd = syscall.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        inode = listening_inode(address)
        if inode is None:
            return None
        fd = fd_of_inode(pid, inode)
        return None if fd is None else take_socket(pidfd, fd, inode)
    finally:
        os.close(pidfd)


def take_socket(pidfd: int, fd: int, inode: int) -> int | None:
    """A copy of the pinned process's `fd` if it is still the socket `inode`, else None
    (closed or reused since it was looked up, or the process has gone)."""
    try:
        taken = syscall.pidfd_getfd(pidfd, fd)
    except OSError as e:
        if e.errno in (errno.EBADF, errno.ESRCH):
            return None
        raise
    if os.fstat(taken).st_ino != inode:
        os.close(taken)
        return None
    return taken


def fd_of_inode(pid: int, inode: int) -> int | None:
    """The lowest fd of process pid that is the socket with this inode, or None."""
    wanted = f"socket:[{inode}]"
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    fds: list[int] = []
    for name in names:
        # An fd closed between the listing and the readlink is simply not it.
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"{directory}/{name}") == wanted:
                fds.append(int(name))
    return min(fds) if fds else None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _dump(family: int, states: int, bytecode: bytes) -> Iterator[TcpSocket]:
    """Every TCP socket of family in one of states (a bit mask), filtered by bytecode."""
    req = _REQ.pack(family, socket.IPPROTO_TCP, 0, states)
    req += _SOCKID.pack(0, 0, b"", b"") + bytes(_SOCKID_TAIL)
    if bytecode:
        req += _RTA.pack(_RTA.size + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    header = _NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY,
                         _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)  # fmt: skip
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                       _NETLINK_SOCK_DIAG) as nl:  # fmt: skip
        nl.sendto(header + req, (0, 0))
        while True:
            data = nl.recv(_BUFFER)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    raise OSError(errno.EPROTO, "sock_diag: malformed netlink message")
                body = data[offset + _NLMSG.size : offset + length]
                offset += (length + 3) & ~3
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body)
                    if code == 0:
                        continue
                    raise OSError(-code, f"sock_diag dump: {os.strerror(-code)}")
                yield _parse(body)


def _parse(body: bytes) -> TcpSocket:
    family, state, _, _ = _MSG.unpack_from(body)
    sport, dport, src, dst = _SOCKID.unpack_from(body, _MSG.size)
    at = _MSG.size + _SOCKID.size + _SOCKID_TAIL
    _, _, _, _, inode = _MSG_TAIL.unpack_from(body, at)
    at += _MSG_TAIL.size
    v6only = False
    while at + _RTA.size <= len(body):
        length, kind = _RTA.unpack_from(body, at)
        if length < _RTA.size:
            break
        if kind == _INET_DIAG_SKV6ONLY:
            v6only = bool(body[at + _RTA.size])
        at += (length + 3) & ~3
    size = 4 if family == socket.AF_INET else 16
    local = (socket.inet_ntop(family, src[:size]), sport)
    remote = (socket.inet_ntop(family, dst[:size]), dport)
    return TcpSocket(family, state, local, remote, inode, v6only)
