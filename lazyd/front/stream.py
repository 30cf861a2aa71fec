"""Proxy mode for stream sockets: hold every connection until the service is
ready, then connect it to the service's own `upstream` address and forward
both ways.

The point is the first connections.  systemd-socket-proxyd connects to the
backend as soon as a client arrives and resets the client when nothing listens
yet.  StreamProxy accepts, keeps the connection (what the client already
sent stays in the kernel's receive buffer) until the runner calls
`release()`, and only then connects.  Nobody is refused and nobody has to
retry.

    accept ──> held (bounded: queue_limit) ──release()──> forwarded (max_connections)
                 │                                          │
                 └── drop(reason): closed                   └── closed when both ends are done

Everything runs on lazyd's own non-blocking sockets: one task accepts, one
task forwards every connection from a single edge-triggered epoll set (no
task per connection: a flood of ten thousand must cost microseconds each).
A held connection costs one fd and nothing else: what its client sends
waits in the kernel's receive buffer until release.  Released connections
connect to the upstream at most CONNECTS_IN_FLIGHT at a time, and the
proxies together leave a reserve of fds free (see _FdBudget).
Counters (`held`, `active`, `bytes_in`, `bytes_out`, `first_byte_at`) feed
status, metrics and the start-latency line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import math
import os
import resource
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import trio

from lazyd.net.access import Gate, reset_and_close
from lazyd.net.addresses import Address
from lazyd.net.proxy_protocol import VERSIONS as PROXY_PROTOCOL_VERSIONS
from lazyd.net.proxy_protocol import encode as encode_proxy_header
from lazyd.net.rights import (
    RIGHTS_SPACE,
    allow_rights,
    close_received,
    kernel_refuses_rights,
    received_fds,
    refuse_rights,
)

LogFn = Callable[[str], None]
Clock = Callable[[], float]

# How data is copied, decided by measurement: 200 MB through one loopback
# connection (Python 3.11, trio, sender and receiver in another process), CPU
# time of the forwarding process, best of three:
#
#     recv_into/send,  64 KiB buffer      85 ms
#     recv_into/send, 256 KiB buffer      60 ms
#     recv_into/send,   1 MiB buffer      40 ms
#     splice(2),  64 KiB pipe             79 ms
#     splice(2), 256 KiB pipe             54 ms
#     splice(2),   1 MiB pipe             39 ms
#     StreamProxy as below               ~62 ms   (64 KiB buffers only: ~96 ms)
#
# Wall time hardly moved (~1.5 GB/s; the far ends were the limit).  What
# costs CPU here is Python's trip around the loop, so what pays is moving
# more per trip.  A big user buffer does that too, but costs its size per
# direction per connection, for as long as the connection lives; a pipe moves
# the same amount without the data entering user space and without memory of
# ours.  A pipe costs two fds and ~5 us to create, which a request/response
# of a few kilobytes never pays back.  So each direction starts with the
# proxy's one 64 KiB buffer (shared: data leaves it at once) and switches
# to splice through a 256 KiB pipe once it has carried SPLICE_AFTER bytes:
# small exchanges use no pipe at all, bulk transfers spend a third less CPU.
# Not 1 MiB pipes: an unprivileged user may hold only 16384 pipe pages in
# all (fs.pipe-user-pages-soft), and past that Linux hands out 2-page pipes,
# so 1 MiB pipes would run out after 64 of them.
CHUNK = 64 * 1024
# Connections accepted in a row before other tasks get a turn.
ACCEPT_BATCH = 64
# Released connections connecting to the upstream at once.  Ten thousand
# connects at once would overflow the service's accept queue (4096 at most
# here), and every SYN dropped there costs its client a second.
CONNECTS_IN_FLIGHT = 128
# A connect not answered in this time is tried again (then after twice as
# long, up to 2 s): a SYN dropped at a full accept queue is sent again by
# the kernel only after a second, and a local service answers at once.
FIRST_SYN_WAIT = 0.1
# Events taken from the epoll set at once, and rounds one flow may run
# before the others get a turn.
POLL_EVENTS = 256
FLOW_TURNS = 16
# How often, at most, the fds in use are counted near the limit.
FD_RECOUNT = 0.05
# Once the service has closed its side, the client gets this long without
# sending anything before lazyd closes the connection (HAProxy's "timeout
# client-fin"): a client that never closes would otherwise hold two fds and
# keep an idle service running for ever.  Sending resets it, so an upload
# that goes on after the reply is not cut.
HALF_CLOSED_TIMEOUT = 60.0
_WATCH_HELD = select.EPOLLRDHUP | select.EPOLLET  # the client hanging up only
_WATCH_OPEN = select.EPOLLIN | select.EPOLLOUT | select.EPOLLET
SPLICE_AFTER = 2 * CHUNK
PIPE_SIZE = 256 * 1024
# The first few bulk flows at a time get 1 MiB pipes (fs.pipe-max-size's
# default): a quarter of the splice calls per gigabyte, measured ~25% less
# CPU for a lone transfer, and 8 of them stay far below the user's quota.
BIG_PIPE_SIZE = 1024 * 1024
BIG_PIPES = 8
_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

# A released connection whose upstream does not answer a connect within this
# time is closed (a local service that is ready answers at once).
CONNECT_TIMEOUT = 10.0

# As in trio's serve_listeners: out of fds or memory, accept() fails for every
# connection alike; wait a little for some to close instead of spinning.
ACCEPT_BACKOFF = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Errors accept() reports for one connection that died in the queue (Linux
# passes pending network errors on): try the next one at once.
_ACCEPT_AGAIN = {
    getattr(errno, name)
    for name in (
        "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "EPERM",
    )
    if hasattr(errno, name)
}


class BurstLog:
    """Log the first failure of a burst; say how many there were once it ends.

    A service that refuses a hundred held connections at once should cost one
    log line, not a hundred.
    """

    def __init__(self, log: LogFn, what: str) -> None:
        self._log = log
        self._what = what
        self.failures = 0

    def failed(self, detail: str) -> None:
        self.failures += 1
        if self.failures == 1:
            self._log(f"{self._what} failed: {detail}")

    def succeeded(self) -> None:
        if self.failures > 1:
            self._log(f"{self._what} works again ({self.failures} failures in a row)")
        self.failures = 0


class Activity:
    """How many forwarded connections (or flows) are open, for idle stop.

    `changed` is set, then replaced, whenever `count` changes: read
    `activity.changed` first, then await it.  `last_change` is the clock
    time of the latest change, so "idle for T" is `count == 0 and now -
    last_change >= T`.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.count = 0
        self.last_change = clock()
        self.changed = trio.Event()

    def add(self, delta: int) -> None:
        self.count += delta
        self.last_change = self._clock()
        self.changed.set()
        self.changed = trio.Event()


def close_socket(sock: socket.socket) -> None:
    """Close a socket trio may have registered (wakes any waiter with ClosedResourceError)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
    sock.close()


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _begin_connect(upstream: Address) -> tuple[socket.socket, int]:
    """Start a non-blocking connect; return the socket and 0, EINPROGRESS or EAGAIN."""
    sock = socket.socket(upstream.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if not upstream.is_unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            refuse_rights(sock)  # what the service sends is bytes (see lazyd/rights.py)
        code = sock.connect_ex(upstream.sockaddr())
    except BaseException:
        sock.close()
        raise
    if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        raise OSError(code, os.strerror(code))
    return sock, code


async def wait_connectable(
    upstream: Address, *, interval: float = 0.0005, max_interval: float = 0.05,
    keep: bool = False, tight_for: float = 1.0, tight_interval: float = 0.002,
) -> socket.socket | None:
    """Return once a connection to `upstream` succeeds (readiness `connect`).

    Probes back off from `interval` to `max_interval`; each failed one is
    closed at once.  With `keep`, the successful probe's connection is
    returned, connected and non-blocking, for a client to use (see
    `StreamProxy.adopt`); else it is closed and None returned (as it is when
    a Unix listener's full backlog tells that it listens without a
    connection).  It never gives up: the caller puts a deadline around it.
    """
    # Fine-grained at first: a service that binds within a millisecond of
    # its exec should not wait 10 ms for the second probe (every held client
    # waits with it).  For the first `tight_for` seconds, when most services
    # bind (a Python one after 20-40 ms), probes stay at most `tight_interval`
    # apart, so readiness is seen at most that late: a refused loopback
    # connect is one syscall and a wake-up, ~500 of them a second cost the
    # starting service less than the lateness would.  After that, slower
    # starts back off to `max_interval`.
    delay = interval
    tight_until = trio.current_time() + tight_for
    while True:
        listening, connection = await _probe(upstream, keep)
        if listening:
            return connection
        await trio.sleep(delay)
        cap = tight_interval if trio.current_time() < tight_until else max_interval
        delay = min(delay * 1.5, cap)


async def _probe(upstream: Address, keep: bool) -> tuple[bool, socket.socket | None]:
    """(whether the upstream listens, the connection if kept)."""
    try:
        sock, code = _begin_connect(upstream)
    except OSError:
        return False, None
    kept: socket.socket | None = None
    try:
        if code == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                return False, None
            code = 0
        # 0, or EAGAIN: a Unix listener whose backlog is full is listening.
        if code == 0 and keep:
            kept = sock
        return True, kept
    finally:
        if kept is None:
            close_socket(sock)


class _PipeCount:
    big = 0  # pipes of more than PIPE_SIZE open in this process


_PIPES = _PipeCount()


def _close_pipe(r: int, w: int) -> None:
    if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) > PIPE_SIZE:
        _PIPES.big -= 1
    os.close(r)
    os.close(w)


def _open_pipe() -> tuple[int, int] | None:
    """A non-blocking pipe for splice, or None when a plain buffer is the better choice."""
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # out of fds: the buffer still works
    # Above fs.pipe-max-size or the user's pipe quota the default size is fine.
    for size in (BIG_PIPE_SIZE, PIPE_SIZE) if _PIPES.big < BIG_PIPES else (PIPE_SIZE,):
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            continue
        break
    size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    if size > PIPE_SIZE:
        _PIPES.big += 1
    if size < CHUNK:
        # Over the user's pipe quota Linux gives 2-page pipes, which move less
        # per call than the buffer does.
        os.close(r)
        os.close(w)
        return None
    return r, w


def _shutdown_write(sock: socket.socket) -> None:
    # A peer that is already gone: the other direction will find out.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


class _RawAccept(Protocol):
    def _accept(self) -> tuple[int, Any]: ...


class _Flow:
    """One direction of a forwarded connection: src -> dst."""

    __slots__ = ("carried", "done", "dst", "inbound", "may_splice", "pending", "pipe",
                 "queued", "rights", "skip", "src")

    def __init__(self, src: socket.socket, dst: socket.socket, inbound: bool,
                 rights: bool = False) -> None:
        self.src = src
        self.dst = dst
        self.inbound = inbound
        self.pending: bytes = b""  # read from src, not yet taken by dst
        self.skip = 0  # leading bytes of `pending` not to count (the PROXY header)
        self.carried = 0
        self.pipe: tuple[int, int] | None = None
        self.queued = 0  # bytes in the pipe
        self.done = False  # EOF from src passed on
        # src is a Unix socket that cannot refuse fds (a kernel before 6.16):
        # read with room for them, never splice (see lazyd/rights.py).
        self.rights = rights
        self.may_splice = _SPLICE and not rights


def _stuck(flow: _Flow) -> bool:
    """Whether a flow holds data its destination has not taken yet."""
    return bool(flow.pending) or flow.queued > 0


# A connection's states.
HELD, CONNECTING, OPEN, CLOSED = range(4)
# The `attempt` of an open connection's idle timer (connect attempts count from 1).
_IDLE_TIMER = -1


class _Connection:
    """One accepted client, from held to closed."""

    __slots__ = ("_client", "attempt", "backoff", "client_fd", "family", "inbound", "last_in",
                 "last_io", "outbound", "peer", "started", "state", "syn_wait", "upstream",
                 "upstream_fd")

    def __init__(self, family: int, client_fd: int, peer: Any,
                 client: socket.socket | None = None) -> None:
        # A held client is only an fd: the socket object is made when it is
        # needed (at release, mostly), which a flood of them never waits for.
        self.family = family
        self.client_fd = client_fd
        self._client = client
        self.peer = peer
        self.state = HELD
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.inbound: _Flow | None = None  # client -> upstream
        self.outbound: _Flow | None = None  # upstream -> client
        self.attempt = 0  # connect attempts, to tell a stale timer from a live one
        self.started = 0.0  # when the first connect began
        self.syn_wait = FIRST_SYN_WAIT
        self.backoff = 0.001  # between connects a full Unix backlog refused
        self.last_in = 0.0  # half-closed by the service: when the client last sent
        self.last_io = 0.0  # with an idle timeout: when either end last had something

    @property
    def client(self) -> socket.socket:
        if self._client is None:
            self._client = socket.socket(self.family, socket.SOCK_STREAM, 0, self.client_fd)
        return self._client

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
        else:
            os.close(self.client_fd)


class _FdBudget:
    """The fds all of this process's proxies hold (connections, pipes, datagram
    flows), against RLIMIT_NOFILE.

    Proxied connections may not take the last fds: lazyd needs some to
    receive a spawned service's output pipe, to answer the control socket, to
    take a notify message.  The fds the proxies hold are counted as they open
    and close; the rest of the process's are counted in /proc/self/fd, again
    only near the limit (or once a second), since listing ten thousand fds
    costs milliseconds.
    """

    def __init__(self) -> None:
        self.proxied = 0
        self._other = 0
        self._limit = 0
        self._checked = -math.inf

    @property
    def limit(self) -> int:
        return self._limit

    def opened(self, n: int = 1) -> None:
        self.proxied += n

    def closed(self, n: int = 1) -> None:
        self.proxied -= n

    def reserve(self) -> int:
        """Fds never taken for a new client: a sixteenth of the limit, 16 to 256."""
        return min(max(self._limit // 16, 16), 256)

    def allows(self, reserve: int) -> bool:
        """Whether more than `reserve` fds (reserve() for a new client, half
        of it for an upstream connect) are left free."""
        free = self._limit - self.proxied - self._other
        if free > 2 * reserve and free > self._limit // 2:
            return True  # far from the limit: no clock, no count
        now = time.monotonic()
        since = now - self._checked
        if (free <= 2 * reserve and since >= FD_RECOUNT) or (free <= self._limit // 2
                                                             and since >= 1.0):
            self._recount(now)
        return self._limit - self.proxied - self._other > reserve

    def _recount(self, now: float) -> None:
        self._checked = now
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
        self._other = max(_fds_in_use(self._limit) - self.proxied, 0)


def _fds_in_use(limit: int) -> int:
    """How many fds this process has open."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except PermissionError:
        pass  # not dumpable since it dropped privileges: /proc/self/fd is root's
    except OSError:
        return limit  # EMFILE: not even one fd to spare
    # Ask each fd the table has room for (FDSize in /proc/self/status, which
    # stays readable); a few thousand fcntl calls, and only near the limit.
    size = limit
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("FDSize:"):
                size = min(int(line.split()[1]), limit)
    used = 0
    for fd in range(size):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        used += 1
    return used


_FDS = _FdBudget()
# The same budget for the datagram proxy's flows (a flow costs an fd too).
FDS = _FDS


class Forwarder:
    """What the service runner sees of a proxy, stream or datagram: whether it
    forwards yet, what waits, and the activity that keeps a service from idling."""

    activity: Activity
    _ready: bool
    # The service is `failed`: new traffic is refused at once (a connection
    # is reset, a datagram dropped) rather than held for a start that will
    # not come until the start limit's interval has passed.
    refusing: bool = False
    # Handing over to a new runner (a reload changed how lazyd serves the
    # socket): take nothing more off the socket, the kernel holds it for the
    # new proxy, which takes over once this one's run() has ended.
    paused: bool = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def waiting(self) -> int:
        """Connections or datagrams held for the service."""
        raise NotImplementedError

    @property
    def active(self) -> int:
        """Open forwarded connections, or active datagram flows."""
        return self.activity.count

    @property
    def last_active_change(self) -> float:
        return self.activity.last_change

    @property
    def activity_changed(self) -> trio.Event:
        return self.activity.changed


class StreamProxy(Forwarder):
    """Accepts on one listening socket (TCP or Unix; lazyd's own, non-blocking)
    and forwards each connection to `upstream` (TCP or Unix, any mix).

    Not ready at first: connections are held until `release()`.  The caller
    owns `listener`; StreamProxy never closes it (cancel run() before closing
    it).  run() makes it non-blocking and gives it back in the mode it found
    it in, since O_NONBLOCK lives on the open file description a service
    would share in pass mode.  `on_traffic()` is called for each connection
    accepted while not ready.  `clock` stamps `first_byte_at` and
    `last_active_change`.  Build it inside trio.run().
    """

    def __init__(
        self,
        name: str,
        listener: socket.socket,
        upstream: Address,
        *,
        queue_limit: int,
        max_connections: int | None = None,
        proxy_protocol: str | None = None,
        gate: Gate | None = None,
        on_traffic: Callable[[], None],
        log: LogFn,
        clock: Clock = trio.current_time,
        half_closed_timeout: float = HALF_CLOSED_TIMEOUT,
        idle_timeout: float | None = None,
    ) -> None:
        if queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not upstream.is_stream:
            raise ValueError(f"a stream proxy needs a stream upstream, not {upstream}")
        if proxy_protocol is not None and proxy_protocol not in PROXY_PROTOCOL_VERSIONS:
            raise ValueError(f"unknown PROXY protocol version {proxy_protocol!r}")
        self.name = name
        self.listener = listener
        self.upstream = upstream
        self.queue_limit = queue_limit
        self.max_connections = max_connections
        self.proxy_protocol = proxy_protocol
        self.gate = gate  # allow/deny and max_connections_per_source, if any
        self.half_closed_timeout = half_closed_timeout
        # connection_idle_timeout: a forwarded connection quiet both ways for
        # this long is closed (None: never, the default).
        self.idle_timeout = idle_timeout
        self.on_traffic = on_traffic
        self.log = log
        self.clock = clock
        self.bytes_in = 0  # client -> upstream
        self.bytes_out = 0  # upstream -> client
        self.first_byte_at: float | None = None
        self.activity = Activity(clock)
        self._ready = False
        self._stopping = False
        self._pending: deque[_Connection] = deque()  # held, in arrival order (and some gone)
        self._held = 0
        self._connecting = 0
        self._pumping = False
        self._pump_later = False
        self._fds_short = False
        self._room = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._epoll: select.epoll  # from run()
        self._by_fd: dict[int, _Connection] = {}  # client and upstream fds
        self._hot: list[tuple[_Connection, _Flow]] = []  # flows to go on with unasked
        self._timers: list[tuple[float, int, _Connection | None, int]] = []
        self._timer_seq = 0
        self._timers_compact_at = 64
        self._wait_scope: trio.CancelScope | None = None
        self._spare: socket.socket | None = None  # see adopt()
        # One buffer for every connection: data goes from recv_into straight
        # to send, and only what the far end would not take is kept aside.
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)
        self._accept_log = BurstLog(log, f"{name}: accept")
        self._connect_log = BurstLog(log, f"{name}: connecting to {upstream}")

    # -- what the runner sees (and Forwarder's) ------------------------------

    @property
    def held(self) -> int:
        """Connections accepted and not yet forwarded."""
        return self._held

    @property
    def waiting(self) -> int:
        return self._held

    def adopt(self, upstream: socket.socket) -> None:
        """A connection to the upstream already made (the readiness probe's):
        the first held client is forwarded over it at release() instead of
        connecting again.  Some services serve one client at a time, and a
        probe that connects and leaves is then the first client they serve,
        or fail on."""
        self._close_spare()
        self._spare = upstream
        _FDS.opened()

    def _close_spare(self) -> None:
        if self._spare is not None:
            close_socket(self._spare)
            _FDS.closed()
            self._spare = None

    def release(self) -> None:
        """The upstream is ready: forward every held connection, in arrival
        order, and from now on forward new ones at once."""
        self._ready = True
        self.first_byte_at = None
        self._pump()
        self._close_spare()  # nobody was held: the probe has done its part

    def drop(self, reason: str) -> int:
        """The start failed: close every held connection and return how many.
        Stays not ready, so the next connection is held (and calls on_traffic)."""
        held = [conn for conn in self._pending if conn.state == HELD]
        self._pending.clear()
        self._close_spare()
        for conn in held:
            self._close(conn)
        if held:
            count = len(held)
            self.log(f"{self.name}: closed {count} held connection{'s' if count != 1 else ''}"
                     f" ({reason})")
        return len(held)

    def unready(self) -> None:
        """The service stopped: hold new connections again.  Connections already
        forwarded run on until either end closes them.  Connections that were
        waiting for a free slot stay held, and count as traffic: on_traffic()
        is called for them (soon, not from inside this call)."""
        self._ready = False
        self._close_spare()
        if self._held and self._nursery is not None:
            self._nursery.start_soon(self._report_held)

    async def _report_held(self) -> None:
        if not self._ready and self._held:
            self.on_traffic()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled.  Cancelling closes every connection."""
        self._stopping = False
        was_blocking = self.listener.getblocking()
        self.listener.setblocking(False)
        # Accepted connections inherit it, even those the kernel queued first.
        refused = self.listener.family == socket.AF_UNIX and refuse_rights(self.listener)
        self._epoll = select.epoll()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._poll_loop)
                task_status.started()
                await self._accept_loop()
        finally:
            self._stopping = True
            self._nursery = None
            for conn in list(self._by_fd.values()):
                self._close(conn)
            self._pending.clear()
            self._close_spare()
            trio.lowlevel.notify_closing(self._epoll)
            self._epoll.close()
            if self.listener.fileno() != -1:
                self.listener.setblocking(was_blocking)
                if refused:
                    allow_rights(self.listener)  # a service may inherit it in pass mode

    # -- accepting and holding -------------------------------------------------

    async def _accept_loop(self) -> None:
        # The plain fd (what socket.accept() makes its socket object of): a
        # socket object costs more than holding the connection does.
        accept_fd = cast(_RawAccept, self.listener)._accept
        accepted = 0
        while True:
            if self.paused:
                await trio.sleep_forever()  # until cancelled
            while self._held >= self.queue_limit:
                # Full: accept nothing more.  The kernel's backlog keeps the
                # rest; accepting and closing would turn a wait into a refusal.
                await self._room.wait()
            if not _FDS.allows(_FDS.reserve()):
                # Near the fd limit: leave the rest in the backlog until
                # connections close, rather than take the fds lazyd itself
                # needs (a spawned service's output pipe, the control socket).
                if not self._fds_short:
                    self._fds_short = True
                    self.log(f"{self.name}: near the open-file limit ({_FDS.limit}): new "
                             "connections wait in the backlog until some close")
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                fd, peer = accept_fd()
            except BlockingIOError:
                if self._fds_short:
                    # Said once per burst, when the backlog is empty, not
                    # each time an fd frees.
                    self._fds_short = False
                    self.log(f"{self.name}: every connection that waited for fds is accepted")
                await trio.lowlevel.wait_readable(self.listener)
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._accept_log.failed(f"{describe(exc)}; retrying every 100 ms")
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if exc.errno in _ACCEPT_AGAIN:
                    await trio.lowlevel.checkpoint()
                    continue
                raise
            self._accept_log.succeeded()
            self._admit(fd, peer)
            # Let others run between batches of a long backlog.  A held
            # connection costs no task and no wake-up, so the batch can be
            # long: a flood must come off the kernel's queue faster than it
            # arrives, or the queue overflows and SYNs are dropped.
            accepted += 1
            if accepted % ACCEPT_BATCH == 0:
                await trio.lowlevel.checkpoint()

    def _admit(self, fd: int, peer: Any) -> None:
        if self.refusing:
            reset_and_close(socket.socket(self.listener.family, socket.SOCK_STREAM, 0, fd))
            return
        _FDS.opened()
        client = None
        if self.gate is not None:
            client = socket.socket(self.listener.family, socket.SOCK_STREAM, 0, fd)
            if not self.gate.admit(client, peer):
                _FDS.closed()
                return  # refused: reset, counted and logged; the service is not started
        conn = _Connection(self.listener.family, fd, peer, client)
        # Held, the connection is watched for nothing but its client leaving:
        # what it sends stays in the kernel's receive buffer until release
        # (the client's TCP window closes once that is full).
        try:
            self._epoll.register(fd, _WATCH_HELD)
        except OSError:
            conn.close_client()
            _FDS.closed()
            if self.gate is not None:
                self.gate.release(peer)
            return
        self._by_fd[fd] = conn
        self._pending.append(conn)
        self._held += 1
        if self._ready:
            self._pump()
        else:
            self.on_traffic()

    def _check_held(self, conn: _Connection) -> None:
        """The client hung up while held: forget it, unless it sent a request
        first (a request followed by shutdown(SHUT_WR) is complete, not a
        departure: it goes upstream, then the EOF).  A client that closed
        completely after sending looks the same from here; its reply will
        fail to be delivered, which costs nothing."""
        try:
            if conn.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return
        except BlockingIOError:
            return
        except OSError:
            pass  # reset
        self._close(conn)

    # -- from held to forwarded ------------------------------------------------

    def _pump(self) -> None:
        """Move held connections to forwarding while the service is ready,
        there is a free slot and an fd to spare, in arrival order, at most
        CONNECTS_IN_FLIGHT connecting at once: a burst reaches the service's
        accept queue a batch at a time, not all at once."""
        if self._pumping:
            return
        self._pumping = True
        try:
            moved = False
            while (
                self._ready
                and not self._stopping
                and self._pending
                and self._connecting < CONNECTS_IN_FLIGHT
                and (self.max_connections is None or self.activity.count < self.max_connections)
            ):
                conn = self._pending[0]
                if conn.state != HELD:
                    self._pending.popleft()  # left while held
                    continue
                if not _FDS.allows(_FDS.reserve() // 2):
                    # Out of fds for upstream connects: try again when
                    # connections close, or in a moment.
                    if not self._pump_later:
                        self._pump_later = True
                        self._at(trio.current_time() + ACCEPT_BACKOFF, None)
                    break
                self._pending.popleft()
                self._held -= 1
                moved = True
                conn.state = CONNECTING
                conn.started = trio.current_time()
                self._connecting += 1
                self.activity.add(1)
                self._connect(conn)
            if moved:
                self._room_freed()
        finally:
            self._pumping = False

    def _room_freed(self) -> None:
        self._room.set()
        self._room = trio.Event()

    def _connect(self, conn: _Connection) -> None:
        """One connect attempt; its answer arrives as an event (or at once)."""
        conn.attempt += 1
        if self._spare is not None:
            sock, code, self._spare = self._spare, 0, None  # counted in the budget already
        else:
            try:
                sock, code = _begin_connect(self.upstream)
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._at(trio.current_time() + ACCEPT_BACKOFF, conn)
                    return
                self._connect_failed(conn, exc)
                return
            _FDS.opened()
        if code == errno.EAGAIN:
            # A Unix listener with a full backlog.  TCP would retransmit its
            # SYN by itself; a Unix connect just fails, so try again, backing off.
            sock.close()
            _FDS.closed()
            self._at(trio.current_time() + conn.backoff, conn)
            conn.backoff = min(conn.backoff * 2, 0.1)
            return
        conn.upstream = sock
        conn.upstream_fd = sock.fileno()
        self._by_fd[conn.upstream_fd] = conn
        self._epoll.register(conn.upstream_fd, _WATCH_OPEN)
        if code == 0:
            self._connected(conn)
            return
        # A SYN that met a full accept queue is dropped, and TCP sends it
        # again only after a second.  A local service answers a connect at
        # once, so after FIRST_SYN_WAIT lazyd tries again itself.
        self._at(trio.current_time() + conn.syn_wait, conn)
        conn.syn_wait = min(conn.syn_wait * 2, 2.0)

    def _connect_answered(self, conn: _Connection) -> None:
        assert conn.upstream is not None
        code = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_failed(conn, OSError(code, os.strerror(code)))
        else:
            self._connected(conn)

    def _connect_timer(self, conn: _Connection) -> None:
        if trio.current_time() - conn.started >= CONNECT_TIMEOUT:
            self._connect_failed(conn, TimeoutError(errno.ETIMEDOUT, "no answer to connect"))
            return
        self._drop_upstream(conn)
        self._connect(conn)

    def _connect_failed(self, conn: _Connection, exc: OSError) -> None:
        self._connect_log.failed(
            f"{describe(exc)}; closing the connection from {_show_peer(conn.peer)}"
        )
        self._close(conn)

    def _connected(self, conn: _Connection) -> None:
        self._connect_log.succeeded()
        self._connecting -= 1
        conn.state = OPEN
        client, upstream = conn.client, conn.upstream
        assert upstream is not None
        try:
            client.setblocking(False)
            if client.family in (socket.AF_INET, socket.AF_INET6):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Watched for data both ways from now on; what the client sent
            # while held is read first, so it reaches the service first.
            self._epoll.modify(conn.client_fd, _WATCH_OPEN)
            header = (b"" if self.proxy_protocol is None else
                      encode_proxy_header(self.proxy_protocol, conn.peer, client.getsockname()))
        except OSError:
            self._close(conn)  # reset while held
            return
        takes_rights = not kernel_refuses_rights()
        conn.inbound = _Flow(client, upstream, True,
                             takes_rights and client.family == socket.AF_UNIX)
        conn.outbound = _Flow(upstream, client, False,
                              takes_rights and upstream.family == socket.AF_UNIX)
        conn.inbound.pending = header  # first of all, before the client's bytes
        conn.inbound.skip = len(header)
        if self.idle_timeout is not None:
            conn.last_io = trio.current_time()
            self._at(conn.last_io + self.idle_timeout, conn, _IDLE_TIMER)
        self._flow(conn, conn.inbound)
        if conn.state == OPEN:
            self._flow(conn, conn.outbound)
        self._pump()

    # -- forwarding ------------------------------------------------------------

    async def _poll_loop(self) -> None:
        """Every connection's events, from one epoll set, in this one task:
        a task per connection costs more than the forwarding itself once
        thousands arrive at once."""
        epoll = self._epoll
        while True:
            if self._hot:
                await trio.lowlevel.checkpoint()
            else:
                with trio.CancelScope(deadline=self._timers[0][0] if self._timers else math.inf
                                      ) as self._wait_scope:
                    await trio.lowlevel.wait_readable(epoll)
                self._wait_scope = None
            # No connects until the whole batch is handled: a socket made now
            # could take the number of one just closed, and that one's events
            # later in this batch would be taken for the new socket's.
            self._pumping = True
            try:
                for fd, events in epoll.poll(0, POLL_EVENTS):
                    conn = self._by_fd.get(fd)
                    if conn is not None:
                        self._event(conn, fd, events)
            finally:
                self._pumping = False
            self._pump()
            hot, self._hot = self._hot, []
            for conn, flow in hot:
                if conn.state == OPEN:
                    self._flow(conn, flow)
            self._run_timers()

    def _event(self, conn: _Connection, fd: int, events: int) -> None:
        try:
            if conn.state == HELD:
                self._check_held(conn)
            elif conn.state == CONNECTING:
                if fd == conn.upstream_fd:
                    self._connect_answered(conn)
            elif conn.state == OPEN:
                assert conn.inbound is not None and conn.outbound is not None
                # In: the flow from this fd, unless it waits for its far end
                # to take what it has (that end's "out" resumes it); out: the
                # flow to this fd, if it waits for it.  A socket is nearly
                # always writable, and a wasted try is a syscall and an
                # exception, at every wake-up of a bulk transfer.
                trouble = events & (select.EPOLLERR | select.EPOLLHUP)
                if fd == conn.client_fd:
                    source, sink = conn.inbound, conn.outbound
                else:
                    source, sink = conn.outbound, conn.inbound
                if trouble or (events & select.EPOLLIN and not _stuck(source)):
                    self._flow(conn, source)
                if conn.state == OPEN and (trouble or (events & select.EPOLLOUT and _stuck(sink))):
                    self._flow(conn, sink)
                if conn.state == OPEN and trouble and source.done:
                    # Reset or gone after its EOF: nothing sent its way can
                    # arrive any more, and no later event would say so (the
                    # far end may stay silent for ever).
                    self._close(conn)
        except Exception as exc:
            # Expected failures (resets, refusals) are handled where they
            # happen; anything else is a bug, but it ends this connection only.
            self.log(f"{self.name}: connection from {_show_peer(conn.peer)} failed: {exc!r}")
            self._close(conn)

    def _at(self, deadline: float, conn: _Connection | None, attempt: int | None = None) -> None:
        """Call back at `deadline`: the connect timer of `conn` (or, once open,
        its half-closed timer, or with attempt _IDLE_TIMER its idle timer), or
        (None) the pump."""
        if attempt is None:
            attempt = conn.attempt if conn is not None else 0
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, conn, attempt))
        if len(self._timers) > self._timers_compact_at:
            # Closed connections' timers (a half-closed one's lasts a minute)
            # would otherwise keep them in memory until they expire.
            self._timers = [t for t in self._timers if t[2] is None or t[2].state != CLOSED]
            heapq.heapify(self._timers)
            self._timers_compact_at = 2 * len(self._timers) + 64
        if self._wait_scope is not None and deadline < self._wait_scope.deadline:
            self._wait_scope.deadline = deadline

    def _run_timers(self) -> None:
        now = trio.current_time()
        while self._timers and self._timers[0][0] <= now:
            _, _, conn, attempt = heapq.heappop(self._timers)
            if conn is None:
                self._pump_later = False
                self._pump()
            elif conn.state == CONNECTING and conn.attempt == attempt:
                self._connect_timer(conn)
            elif conn.state == OPEN and attempt == _IDLE_TIMER:
                self._idle_timer(conn, now)
            elif conn.state == OPEN:
                self._half_closed_timer(conn, now)

    def _idle_timer(self, conn: _Connection, now: float) -> None:
        """Close a forwarded connection quiet both ways for idle_timeout (else
        look again when it would be): one timer per connection at a time."""
        assert self.idle_timeout is not None
        quiet_until = conn.last_io + self.idle_timeout
        if now < quiet_until:
            self._at(quiet_until, conn, _IDLE_TIMER)
        else:
            self._close(conn)

    def _half_closed_timer(self, conn: _Connection, now: float) -> None:
        """Close a connection the service has finished with and whose client
        has sent nothing for half_closed_timeout (else look again later)."""
        inbound, outbound = conn.inbound, conn.outbound
        if inbound is None or outbound is None or not outbound.done or inbound.done:
            return  # a stale timer, or nothing half-closed about it
        quiet_until = conn.last_in + self.half_closed_timeout
        if now < quiet_until:
            self._at(quiet_until, conn)
        else:
            self._close(conn)

    def _flow(self, conn: _Connection, flow: _Flow) -> None:
        """Move what can be moved now, src -> dst, until either would block;
        at most FLOW_TURNS rounds, then others get a turn (edge-triggered,
        the flow is taken up again without a new event)."""
        if flow.done:
            return
        if self.idle_timeout is not None:
            conn.last_io = trio.current_time()
        if flow.inbound and conn.outbound is not None and conn.outbound.done:
            conn.last_in = trio.current_time()  # the client still has something to say
        try:
            for _ in range(FLOW_TURNS):
                if not self._flow_turn(flow):
                    break
            else:
                self._hot.append((conn, flow))
                return
        except OSError:
            # A reset or a broken pipe on either side ends the whole
            # connection: the other direction has nowhere left to go.
            self._close(conn)
            return
        if flow.done:
            assert conn.inbound is not None and conn.outbound is not None
            if conn.inbound.done and conn.outbound.done:
                self._close(conn)  # close() sends the FIN shutdown() would
                return
            # EOF from src: pass the half-close on and let the other
            # direction finish (the reply to a request that ended with SHUT_WR).
            _shutdown_write(flow.dst)
            if not flow.inbound:
                conn.last_in = trio.current_time()
                self._at(conn.last_in + self.half_closed_timeout, conn)

    def _flow_turn(self, flow: _Flow) -> bool:
        """One round of a flow: False once it would block, or is done."""
        if flow.pending:
            try:
                sent = flow.dst.send(flow.pending)
            except BlockingIOError:
                return False
            self._sent(flow, sent)
            flow.pending = flow.pending[sent:]
            return True
        if flow.pipe is not None:
            return self._splice_turn(flow, *flow.pipe)
        try:
            if flow.rights:
                n, ancdata, _flags, _ = flow.src.recvmsg_into([self._buffer], RIGHTS_SPACE)
                close_received(received_fds(ancdata))
            else:
                n = flow.src.recv_into(self._buffer)
        except BlockingIOError:
            return False
        if n == 0:
            flow.done = True
            return False
        try:
            sent = flow.dst.send(self._view[:n])
        except BlockingIOError:
            sent = 0
        self._sent(flow, sent)
        if sent < n:
            flow.pending = bytes(self._view[sent:n])
        flow.carried += n
        if flow.may_splice and flow.carried >= SPLICE_AFTER:
            # Bulk: from now on through a pipe, if one is to be had and the
            # fds allow (a pipe costs two).
            flow.may_splice = False
            if _FDS.allows(_FDS.reserve() + 2):
                flow.pipe = _open_pipe()
                if flow.pipe is not None:
                    _FDS.opened(2)
        return True

    def _splice_turn(self, flow: _Flow, r: int, w: int) -> bool:
        # Fill only an empty pipe: then EAGAIN from the first splice means
        # "src has nothing", and from the second "dst is full", never "the
        # pipe is full".
        if flow.queued == 0:
            try:
                flow.queued = os.splice(flow.src.fileno(), w, BIG_PIPE_SIZE,
                                        flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            if flow.queued == 0:
                flow.done = True
                return False
        try:
            moved = os.splice(r, flow.dst.fileno(), flow.queued, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return False
        flow.queued -= moved
        self._count(moved, flow.inbound)
        return True

    def _sent(self, flow: _Flow, n: int) -> None:
        if flow.skip:
            header = min(n, flow.skip)
            flow.skip -= header
            n -= header
        if n:
            self._count(n, flow.inbound)

    def _count(self, n: int, inbound: bool) -> None:
        if inbound:
            self.bytes_in += n
            if self.first_byte_at is None and self._ready:
                self.first_byte_at = self.clock()
        else:
            self.bytes_out += n

    # -- closing -----------------------------------------------------------------

    def _drop_upstream(self, conn: _Connection) -> None:
        if conn.upstream is not None:
            self._by_fd.pop(conn.upstream_fd, None)
            conn.upstream.close()  # leaves the epoll set with it
            _FDS.closed()
            conn.upstream = None
            conn.upstream_fd = -1

    def _close(self, conn: _Connection) -> None:
        """Close both ends of a connection, in whatever state it is."""
        state = conn.state
        if state == CLOSED:
            return
        conn.state = CLOSED
        self._by_fd.pop(conn.client_fd, None)
        conn.close_client()
        _FDS.closed()
        self._drop_upstream(conn)
        for flow in (conn.inbound, conn.outbound):
            if flow is not None and flow.pipe is not None:
                _close_pipe(*flow.pipe)
                _FDS.closed(2)
                flow.pipe = None
        conn.inbound = conn.outbound = None
        if self.gate is not None:
            self.gate.release(conn.peer)
        if state == HELD:
            self._held -= 1
            if len(self._pending) > 2 * self._held + 64:
                # Many left while held: drop them from the queue now, not
                # one at a time from the middle of it.
                self._pending = deque(c for c in self._pending if c.state == HELD)
            self._room_freed()
            return
        if state == CONNECTING:
            self._connecting -= 1
        self.activity.add(-1)
        self._pump()


def _show_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, bytes):
        peer = peer.decode(errors="replace")
    return str(peer) or "a Unix client"
