"""Proxy mode for stream sockets: hold every connection until the service is
ready, then connect it to the service's own `upstream` address and forward
both ways.

The point is the first connections.  systemd-socket-proxyd connects to the
backend as soon as a client arrives and resets the client when nothing listens
yet.  StreamProxy accepts, keeps the connection (and up to HOLD_LIMIT bytes
the client already sent) until the runner calls `release()`, and only then
connects.  Nobody is refused and nobody has to retry.

    accept ──> held (bounded: queue_limit) ──release()──> forwarded (max_connections)
                 │                                          │
                 └── drop(reason): closed                   └── closed when both ends are done

Everything runs on lazyd's own non-blocking sockets with trio's low-level
waits, one task per connection (two while forwarding, one per direction).
Counters (`held`, `active`, `bytes_in`, `bytes_out`, `first_byte_at`) feed
status, metrics and the start-latency line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from lazyd.addresses import Address
from lazyd.proxy_protocol import VERSIONS as PROXY_PROTOCOL_VERSIONS
from lazyd.proxy_protocol import encode as encode_proxy_header

LogFn = Callable[[str], None]
Clock = Callable[[], float]

# Bytes read from a held client before lazyd stops reading: enough for any
# request line and headers, small enough that a thousand held connections
# cost 64 MB at worst.  Past it the client's TCP window closes (backpressure).
HOLD_LIMIT = 64 * 1024

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
# of a few kilobytes never pays back.  So each direction starts with a 64 KiB
# buffer and switches to splice through a 256 KiB pipe once it has carried
# SPLICE_AFTER bytes: small exchanges use no pipe at all, bulk transfers
# spend a third less CPU.  Not 1 MiB pipes: an unprivileged user may hold only
# 16384 pipe pages in all (fs.pipe-user-pages-soft), and past that Linux hands
# out 2-page pipes, so 1 MiB pipes would run out after 64 of them.
CHUNK = 64 * 1024
# Connections accepted in a row before other tasks get a turn.
ACCEPT_BATCH = 16
SPLICE_AFTER = 2 * CHUNK
PIPE_SIZE = 256 * 1024
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
        code = sock.connect_ex(upstream.sockaddr())
    except BaseException:
        sock.close()
        raise
    if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        raise OSError(code, os.strerror(code))
    return sock, code


async def _finish_connect(sock: socket.socket, code: int, upstream: Address) -> socket.socket:
    """Complete what _begin_connect started; return the connected socket."""
    if code == errno.EINPROGRESS:
        try:
            await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except BaseException:
            close_socket(sock)
            raise
        if code:
            close_socket(sock)
            raise OSError(code, os.strerror(code))
        return sock
    delay = 0.001
    while code == errno.EAGAIN:
        # A Unix listener with a full backlog.  TCP would retransmit its SYN by
        # itself; a Unix connect just fails, so try again, backing off.
        close_socket(sock)
        await trio.sleep(delay)
        delay = min(delay * 2, 0.1)
        sock, code = _begin_connect(upstream)
    return sock


async def wait_connectable(
    upstream: Address, *, interval: float = 0.01, max_interval: float = 0.05
) -> None:
    """Return once a connection to `upstream` succeeds (readiness `connect`).

    Probes back off from `interval` to `max_interval`; each probe is closed at
    once.  It never gives up: the caller puts a deadline around it.
    """
    delay = interval
    while True:
        if await _probe(upstream):
            return
        await trio.sleep(delay)
        delay = min(delay * 2, max_interval)


async def _probe(upstream: Address) -> bool:
    try:
        sock, code = _begin_connect(upstream)
    except OSError:
        return False
    try:
        if code == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        # 0, or EAGAIN: a Unix listener whose backlog is full is listening.
        return True
    finally:
        close_socket(sock)


def _open_pipe() -> tuple[int, int] | None:
    """A non-blocking pipe for splice, or None when a plain buffer is the better choice."""
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # out of fds: the buffer still works
    # Above fs.pipe-max-size or the user's pipe quota the default size is fine.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < CHUNK:
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


class _Connection:
    """One accepted client, from held to closed."""

    def __init__(self, client: socket.socket, peer: Any) -> None:
        self.client = client
        self.peer = peer
        self.data = bytearray()  # what the client sent while held
        self.eof = False  # the client shut down its sending side while held
        self.gone = False  # the client left while held, or reset
        self.released = False
        self.hold_scope = trio.CancelScope()
        self.upstream: socket.socket | None = None
        self.connect_code = 0
        self.connect_error: OSError | None = None

    def close(self) -> None:
        close_socket(self.client)
        if self.upstream is not None:
            close_socket(self.upstream)


class Forwarder:
    """What the service runner sees of a proxy, stream or datagram: whether it
    forwards yet, what waits, and the activity that keeps a service from idling."""

    activity: Activity
    _ready: bool

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
    accepted while not ready.  `clock` stamps `first_byte_at` and `last_active_change`.  Build it
    inside trio.run().
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
        on_traffic: Callable[[], None],
        log: LogFn,
        clock: Clock = trio.current_time,
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
        self.on_traffic = on_traffic
        self.log = log
        self.clock = clock
        self.bytes_in = 0  # client -> upstream
        self.bytes_out = 0  # upstream -> client
        self.first_byte_at: float | None = None
        self.activity = Activity(clock)
        self._ready = False
        self._stopping = False
        self._pending: deque[_Connection] = deque()
        self._room = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._accept_log = BurstLog(log, f"{name}: accept")
        self._connect_log = BurstLog(log, f"{name}: connecting to {upstream}")

    # -- what the runner sees (and Forwarder's) ------------------------------

    @property
    def held(self) -> int:
        """Connections accepted and not yet forwarded."""
        return len(self._pending)

    @property
    def waiting(self) -> int:
        return self.held

    def release(self) -> None:
        """The upstream is ready: forward every held connection, in arrival
        order, and from now on forward new ones at once."""
        self._ready = True
        self.first_byte_at = None
        self._pump()

    def drop(self, reason: str) -> int:
        """The start failed: close every held connection and return how many.
        Stays not ready, so the next connection is held (and calls on_traffic)."""
        dropped = list(self._pending)
        self._pending.clear()
        for conn in dropped:
            conn.hold_scope.cancel()  # its task closes it
        if dropped:
            count = len(dropped)
            self.log(f"{self.name}: closed {count} held connection{'s' if count != 1 else ''}"
                     f" ({reason})")
            self._room_freed()
        return len(dropped)

    def unready(self) -> None:
        """The service stopped: hold new connections again.  Connections already
        forwarded run on until either end closes them.  Connections that were
        waiting for a free slot stay held, and count as traffic: on_traffic()
        is called for them (soon, not from inside this call)."""
        self._ready = False
        if self._pending and self._nursery is not None:
            self._nursery.start_soon(self._report_held)

    async def _report_held(self) -> None:
        if not self._ready and self._pending:
            self.on_traffic()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled.  Cancelling closes every connection."""
        self._stopping = False
        was_blocking = self.listener.getblocking()
        self.listener.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._accept_loop()
        finally:
            self._stopping = True
            self._nursery = None
            if self.listener.fileno() != -1:
                self.listener.setblocking(was_blocking)

    # -- accepting and holding -------------------------------------------------

    async def _accept_loop(self) -> None:
        accepted = 0
        while True:
            while len(self._pending) >= self.queue_limit:
                # Full: accept nothing more.  The kernel's backlog keeps the
                # rest; accepting and closing would turn a wait into a refusal.
                await self._room.wait()
            try:
                client, peer = self.listener.accept()
            except BlockingIOError:
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
            self._admit(client, peer)
            # Let the connections just admitted (and everyone else) run between
            # batches of a long backlog; a checkpoint per accept halves the rate
            # at which a flood is taken off the kernel's queue.
            accepted += 1
            if accepted % ACCEPT_BATCH == 0:
                await trio.lowlevel.checkpoint()

    def _admit(self, client: socket.socket, peer: Any) -> None:
        try:
            client.setblocking(False)
            if client.family in (socket.AF_INET, socket.AF_INET6):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            client.close()  # reset between accept and here
            return
        assert self._nursery is not None
        conn = _Connection(client, peer)
        self._pending.append(conn)
        self._nursery.start_soon(self._serve, conn)
        if not self._ready:
            self.on_traffic()
        self._pump()

    def _pump(self) -> None:
        """Move held connections to forwarding while the service is ready and
        there is a free slot."""
        moved = False
        while (
            self._ready
            and not self._stopping
            and self._pending
            and (self.max_connections is None or self.active < self.max_connections)
        ):
            conn = self._pending.popleft()
            moved = True
            conn.released = True
            self.activity.add(1)
            # Connect here, synchronously, rather than in each connection's
            # task: trio does not wake tasks in a fixed order, and the service
            # should see its connections in the order the clients came.
            try:
                conn.upstream, conn.connect_code = _begin_connect(self.upstream)
            except OSError as exc:
                conn.connect_error = exc
            conn.hold_scope.cancel()
        if moved:
            self._room_freed()

    def _room_freed(self) -> None:
        self._room.set()
        self._room = trio.Event()

    async def _serve(self, conn: _Connection) -> None:
        try:
            with conn.hold_scope:
                await self._hold(conn)
            if conn.released and not conn.gone:
                await self._relay(conn)
        except Exception as exc:
            # Expected failures (resets, refusals) are handled where they
            # happen; anything else is a bug, but it ends this connection only.
            self.log(f"{self.name}: connection from {_show_peer(conn.peer)} failed: {exc!r}")
        except BaseException:
            # Cancelled (perhaps in a group) from outside: run() is ending.
            # No held connection may start connecting while everything closes.
            self._stopping = True
            raise
        finally:
            conn.close()
            if conn.released:
                self.activity.add(-1)
                self._pump()
            elif conn in self._pending:
                self._pending.remove(conn)
                self._room_freed()

    async def _hold(self, conn: _Connection) -> None:
        """Read what the client sends while the service starts, up to
        HOLD_LIMIT; then wait for release() (or drop()) to cancel us."""
        while len(conn.data) < HOLD_LIMIT and not conn.eof:
            try:
                chunk = conn.client.recv(HOLD_LIMIT - len(conn.data))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn.client)
                continue
            except OSError:
                conn.gone = True
                return
            if chunk:
                conn.data += chunk
            elif conn.data:
                # A request followed by shutdown(SHUT_WR) is a complete
                # request, not a departure: it goes upstream, then the EOF.
                # (A client that closed completely looks the same from here;
                # its reply will fail to be delivered, which costs nothing.)
                conn.eof = True
            else:
                conn.gone = True  # gave up before sending anything
                return
        await trio.sleep_forever()

    # -- forwarding ------------------------------------------------------------

    async def _relay(self, conn: _Connection) -> None:
        try:
            if conn.connect_error is not None:
                raise conn.connect_error
            assert conn.upstream is not None
            with trio.move_on_after(CONNECT_TIMEOUT) as scope:
                conn.upstream = await _finish_connect(
                    conn.upstream, conn.connect_code, self.upstream
                )
            if scope.cancelled_caught:
                raise TimeoutError(errno.ETIMEDOUT, "no answer to connect")
        except OSError as exc:
            self._connect_log.failed(
                f"{describe(exc)}; closing the connection from {_show_peer(conn.peer)}"
            )
            return
        self._connect_log.succeeded()
        upstream, client = conn.upstream, conn.client
        try:
            if self.proxy_protocol is not None:
                header = encode_proxy_header(self.proxy_protocol, conn.peer, client.getsockname())
                await self._send(upstream, header, inbound=None)
            if conn.data:
                await self._send(upstream, conn.data, inbound=True)
                conn.data = bytearray()
        except OSError:
            return  # the upstream reset at once
        if conn.eof:
            _shutdown_write(upstream)
        async with trio.open_nursery() as nursery:
            if not conn.eof:
                nursery.start_soon(self._direction, client, upstream, True, nursery.cancel_scope)
            nursery.start_soon(self._direction, upstream, client, False, nursery.cancel_scope)

    async def _direction(
        self, src: socket.socket, dst: socket.socket, inbound: bool, both: trio.CancelScope
    ) -> None:
        try:
            await self._copy(src, dst, inbound)
        except OSError:
            # A reset or a broken pipe on either side ends the whole
            # connection: the other direction has nowhere left to go.
            both.cancel()
            return
        # EOF from src: pass the half-close on and let the other direction
        # finish (the reply to a request that ended with SHUT_WR).
        _shutdown_write(dst)

    async def _copy(self, src: socket.socket, dst: socket.socket, inbound: bool) -> None:
        """Copy until EOF from src: through a buffer first, through a pipe
        with splice(2) once the flow has shown itself to be bulk."""
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        carried = 0
        may_splice = _SPLICE
        while True:
            try:
                n = src.recv_into(buffer)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                continue
            if n == 0:
                return
            await self._send(dst, view[:n], inbound)
            carried += n
            if may_splice and carried >= SPLICE_AFTER:
                pipe = _open_pipe()
                if pipe is not None:
                    del view, buffer
                    await self._splice(src, dst, pipe, inbound)
                    return
                may_splice = False  # no pipe to be had: stay with the buffer
            await trio.lowlevel.checkpoint()

    async def _splice(
        self, src: socket.socket, dst: socket.socket, pipe: tuple[int, int], inbound: bool
    ) -> None:
        r, w = pipe
        try:
            queued = 0  # bytes in the pipe
            while True:
                # Fill only an empty pipe: then EAGAIN from the first splice
                # means "src has nothing", and from the second "dst is full",
                # never "the pipe is full".
                if queued == 0:
                    try:
                        queued = os.splice(src.fileno(), w, PIPE_SIZE, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(src)
                        continue
                    if queued == 0:
                        return
                try:
                    moved = os.splice(r, dst.fileno(), queued, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
                    continue
                queued -= moved
                self._count(moved, inbound)
                await trio.lowlevel.checkpoint()
        finally:
            os.close(r)
            os.close(w)

    async def _send(self, dst: socket.socket, data: bytes | bytearray | memoryview,
                    inbound: bool | None) -> None:
        """Send all of `data`; count it as client bytes (True), reply bytes
        (False) or neither (None, the PROXY header)."""
        view = memoryview(data)
        while view:
            try:
                sent = dst.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst)
                continue
            view = view[sent:]
            if inbound is not None:
                self._count(sent, inbound)

    def _count(self, n: int, inbound: bool) -> None:
        if inbound:
            self.bytes_in += n
            if self.first_byte_at is None and self._ready:
                self.first_byte_at = self.clock()
        else:
            self.bytes_out += n


def _show_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, bytes):
        peer = peer.decode(errors="replace")
    return str(peer) or "a Unix client"
