"""Steering new TCP connections for an address into another process's listening socket.

One small, fixed program runs in the network namespace's socket lookup (a BPF
`sk_lookup` program): for each new TCP connection it looks up the connection's
local address and port in a socket map and, if an entry is there, hands the
connection to that socket. All policy lives in userspace, in which entries the
map holds: lazyd adds one when a proxied service is warm (the service's own
listening socket, keyed by lazyd's address) and removes it when the service
stops, so new connections come back to lazyd's listener and are held there.

The key is (protocol, family, local address, local port). An entry for
127.0.0.1:80 takes only connections to 127.0.0.1:80, so a service listening on
127.0.0.2:80 keeps its own; a wildcard entry (0.0.0.0:80 or [::]:80) takes the
connections to that port on any address of its family for which no exact
entry exists, just as the kernel prefers an exact bind over a wildcard one.
A dual-stack listener on [::]:80 receives IPv4 connections too: give it two
entries, ("::", 80) and ("0.0.0.0", 80). An IPv4-mapped address
(::ffff:127.0.0.1) is keyed as the IPv4 address it stands for, which is how
the connection reaches the program.

The accepted socket's local address is the address the client dialled
(lazyd's), not the service's own: the client sees nothing change.

The program counts the connections it steers per entry (a hash map with the
same key, bumped atomically), so lazyd can tell that traffic goes on without
seeing it; `diag.open_connections` tells how many are still open.

What needs root: `Steering.open()` (creating maps needs CAP_BPF, loading and
linking an sk_lookup program CAP_BPF and CAP_NET_ADMIN). Everything else works
with the fds alone, in a process that has dropped root: the kernel checks
privileges when an fd is made, not when it is used. Nothing is pinned: when
the last copy of the link fd closes, the program stops running, and when the
last copies of the map fds close, the maps go. A socket in the map that its
owners close leaves the map by itself, so connections then fall back to the
ordinary lookup (lazyd's listener) instead of going to a dead socket.

BPF fds are close-on-exec, but a fork keeps them: a child forked after
`open()` that lives on (a helper process) keeps the program attached until it
closes its copy of the link fd too.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from . import insn as i
from . import syscall as bpf

Address = tuple[str, int]

# struct key { u8 addr[16]; u32 port; u16 family; u16 protocol; }, in host byte
# order except addr (network order; IPv4 in the first 4 bytes, the rest zero).
# The program builds it on its stack at r10 - 24, from the lookup context.
KEY = struct.Struct("=16sIHH")
_KEY_AT = -KEY.size
_COUNT = struct.Struct("=Q")
# A sockhash value is a socket fd when written and the socket's cookie when read.
_SOCKET = struct.Struct("=Q")

# struct bpf_sk_lookup offsets (include/uapi/linux/bpf.h): every field read
# here is a u32 the verifier allows loading whole.
_CTX_FAMILY = 8
_CTX_PROTOCOL = 12
_CTX_LOCAL_IP4 = 40
_CTX_LOCAL_IP6 = 44
_CTX_LOCAL_PORT = 60  # host byte order

SK_PASS = 1
DEFAULT_MAX_ENTRIES = 256


def key(address: Address, protocol: int = socket.IPPROTO_TCP) -> bytes:
    """The map key of a listening address such as ("127.0.0.1", 80) or ("::", 443).

    Raises ValueError when the host is not an IP address or the port is out of range.
    """
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return KEY.pack(ip.packed, port, family, protocol)


def program(sockets_fd: int, counters_fd: int) -> bytes:
    """The sk_lookup program over these two maps, as the kernel's bytes."""
    R0, R1, R2, R3, R6, R7, R8, R10 = (
        i.Reg.R0, i.Reg.R1, i.Reg.R2, i.Reg.R3, i.Reg.R6, i.Reg.R7, i.Reg.R8, i.Reg.R10,
    )  # fmt: skip
    W, H, DW = i.Size.W, i.Size.H, i.Size.DW
    ipv6, lookup, found, done = (i.Label(n) for n in ("ipv6", "lookup", "found", "done"))
    k = _KEY_AT  # the key's offsets from the frame pointer: addr k..k+16, then port, family, proto
    return i.assemble([
        i.mov(R6, R1),  # r6 = ctx, kept across calls
        # Only TCP: UDP replies would come from the service's own port.
        i.ldx(W, R2, R6, _CTX_PROTOCOL),
        i.jmp_imm(i.Cond.NE, R2, socket.IPPROTO_TCP, done),
        i.stx(H, R10, k + 22, R2),
        i.ldx(W, R2, R6, _CTX_FAMILY),
        i.stx(H, R10, k + 20, R2),
        i.ldx(W, R3, R6, _CTX_LOCAL_PORT),
        i.stx(W, R10, k + 16, R3),
        i.jmp_imm(i.Cond.EQ, R2, socket.AF_INET6, ipv6),
        i.jmp_imm(i.Cond.NE, R2, socket.AF_INET, done),
        i.ldx(W, R3, R6, _CTX_LOCAL_IP4),
        i.stx(W, R10, k, R3),
        i.st_imm(W, R10, k + 4, 0),
        i.st_imm(DW, R10, k + 8, 0),
        i.jmp(lookup),
        ipv6,
        *(
            insn
            for word in range(4)
            for insn in (
                i.ldx(W, R3, R6, _CTX_LOCAL_IP6 + 4 * word),
                i.stx(W, R10, k + 4 * word, R3),
            )
        ),
        lookup,
        # r0 = the socket for the exact address, else for the family's wildcard.
        i.ld_map_fd(R1, sockets_fd),
        i.mov(R2, R10),
        i.add_imm(R2, k),
        i.call(i.Helper.MAP_LOOKUP_ELEM),
        i.jmp_imm(i.Cond.NE, R0, 0, found),
        i.st_imm(DW, R10, k, 0),
        i.st_imm(DW, R10, k + 8, 0),
        i.ld_map_fd(R1, sockets_fd),
        i.mov(R2, R10),
        i.add_imm(R2, k),
        i.call(i.Helper.MAP_LOOKUP_ELEM),
        i.jmp_imm(i.Cond.EQ, R0, 0, done),
        found,
        # The lookup took a reference on the socket: assign, then always release.
        i.mov(R7, R0),
        i.mov(R1, R6),
        i.mov(R2, R7),
        i.mov_imm(R3, 0),
        i.call(i.Helper.SK_ASSIGN),
        i.mov(R8, R0),
        i.mov(R1, R7),
        i.call(i.Helper.SK_RELEASE),
        # A socket the kernel refuses (not listening, wrong family) leaves the
        # connection to the ordinary lookup: lazyd's listener, never a drop.
        i.jmp_imm(i.Cond.NE, R8, 0, done),
        i.ld_map_fd(R1, counters_fd),
        i.mov(R2, R10),
        i.add_imm(R2, k),
        i.call(i.Helper.MAP_LOOKUP_ELEM),
        i.jmp_imm(i.Cond.EQ, R0, 0, done),
        i.mov_imm(R1, 1),
        i.atomic_add(DW, R0, 0, R1),
        done,
        i.mov_imm(R0, SK_PASS),
        i.exit_(),
    ])


@dataclass(frozen=True)
class SteeringFds:
    """The fds behind a Steering, e.g. to pass them to another process."""

    sockets: int
    counters: int
    link: int


class Steering:
    """The kernel data path of one network namespace: its maps and its attached program.

    Open it (root) with `Steering.open()`; everything else needs only the fds.
    Not thread-safe; each call is one or two short syscalls that never block.
    """

    def __init__(self, fds: SteeringFds) -> None:
        """Take ownership of already opened fds (see `open` and `fds`)."""
        self._fds: SteeringFds | None = fds

    @classmethod
    def open(
        cls, *, max_entries: int = DEFAULT_MAX_ENTRIES, netns: str = "/proc/self/ns/net"
    ) -> Steering:
        """Create the maps, load the program and attach it to netns (root).

        Raises OSError saying which step failed (VerifierError if the kernel
        rejects the program).
        """
        made: list[int] = []
        try:
            sockets = bpf.map_create(
                bpf.MAP_SOCKHASH, KEY.size, _SOCKET.size, max_entries, "lazyd_sockets"
            )
            made.append(sockets)
            counters = bpf.map_create(
                bpf.MAP_HASH, KEY.size, _COUNT.size, max_entries, "lazyd_steered"
            )
            made.append(counters)
            prog = load(sockets, counters)
            made.append(prog)
            ns = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                link = bpf.link_create(prog, ns, bpf.ATTACH_SK_LOOKUP)
            finally:
                os.close(ns)
        except BaseException:
            for fd in made:
                os.close(fd)
            raise
        # The link holds the program; its own fd is not needed any more.
        os.close(prog)
        return cls(SteeringFds(sockets, counters, link))

    @property
    def fds(self) -> SteeringFds:
        """The open fds (still owned by this object)."""
        if self._fds is None:
            raise ValueError("steering is closed")
        return self._fds

    def add(self, address: Address, listener: int | socket.socket) -> None:
        """Steer new TCP connections for address into listener, a listening TCP socket.

        Replaces any entry for address and starts its steered count at 0. The
        map keeps no fd: closing this process's copy of listener is fine while
        the service still holds its own.
        """
        fds = self.fds
        k = key(address)
        fd = listener if isinstance(listener, int) else listener.fileno()
        _check_listener(fd, address)
        try:
            bpf.map_update(fds.counters, k, _COUNT.pack(0))
            bpf.map_update(fds.sockets, k, _SOCKET.pack(fd))
        except OSError as e:
            raise OSError(e.errno, f"steering {_show(address)} to fd {fd}: {e.strerror}") from None

    def remove(self, address: Address) -> bool:
        """Stop steering address (new connections reach its own listener again).

        False if there was no entry (never added, or its socket has closed).
        The steered count stays readable until the next `add`.
        """
        return bpf.map_delete(self.fds.sockets, key(address))

    def steering(self, address: Address) -> bool:
        """Whether address has an entry now (False once its socket has closed)."""
        return bpf.map_lookup(self.fds.sockets, key(address), _SOCKET.size) is not None

    def steered(self, address: Address) -> int:
        """How many connections were steered for address since its last `add`."""
        value = bpf.map_lookup(self.fds.counters, key(address), _COUNT.size)
        return 0 if value is None else int(_COUNT.unpack(value)[0])

    def close(self) -> None:
        """Detach the program (first, so nothing is steered to a half-gone map) and
        close the maps. Idempotent."""
        if self._fds is None:
            return
        fds, self._fds = self._fds, None
        os.close(fds.link)
        os.close(fds.sockets)
        os.close(fds.counters)

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(sockets_fd: int, counters_fd: int) -> int:
    """The loaded (not yet attached) program's fd (root)."""
    return bpf.prog_load(
        bpf.PROG_SK_LOOKUP,
        program(sockets_fd, counters_fd),
        # sk_assign and sk_release are GPL-only helpers.
        license="GPL",
        name="lazyd_steer",
        expected_attach_type=bpf.ATTACH_SK_LOOKUP,
    )


def _check_listener(fd: int, address: Address) -> None:
    # The map would take an established socket too, and the kernel would then
    # refuse every assignment: say so now rather than silently fall back.
    try:
        probe = socket.socket(fileno=fd)
    except OSError as e:
        raise ValueError(f"steering {_show(address)}: fd {fd} is not a socket ({e})") from None
    try:
        accepting = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        protocol = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    finally:
        probe.detach()
    if kind != socket.SOCK_STREAM or protocol != socket.IPPROTO_TCP or not accepting:
        raise ValueError(f"steering {_show(address)}: fd {fd} is not a listening TCP socket")


def _show(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
