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
task forwards every connection from a single edge-triggered epoll set
(`lazyd.datapath.reactor`; no task per connection: a flood of ten thousand
must cost microseconds each).  A held connection costs one fd and nothing
else: what its client sends waits in the kernel's receive buffer until
release.  Released connections connect to the upstream at most
CONNECTS_IN_FLIGHT at a time, and the proxies together leave a reserve of
fds free (`lazyd.datapath.budget`).  The bytes of an open connection are
moved by `lazyd.datapath.shovel`.  Counters (`held`, `active`, `bytes_in`,
`bytes_out`, `first_byte_at`) feed status, metrics and the start-latency
line.

Why this module is longer than ~400 lines: it is StreamProxy alone, and
its parts (admission and holding, release pacing with connect retries, an
open connection's timers and half-close) work on one connection table and
end in one `_close()`, which must undo whatever state a connection is in
(held count, arrival queue, gate, fds, activity).  Split across classes,
each part would reach into the others' counters on every close.  What is
not tied to that table lives elsewhere: the connection record
(`lazyd.front.connection`), the event loop (`lazyd.datapath.reactor`), the
bytes (`lazyd.datapath.shovel`), the fds (`lazyd.datapath.budget`).
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import trio

from lazyd.datapath.budget import FDS
from lazyd.datapath.reactor import Reactor
from lazyd.datapath.shovel import FLOW_TURNS, Flow, Shovel, shutdown_write, stuck
from lazyd.front.connection import CLOSED, CONNECTING, HELD, OPEN, Connection, show_peer
from lazyd.front.forwarder import Activity, BurstLog, Clock, Forwarder, LogFn
from lazyd.net.access import Gate, reset_and_close
from lazyd.net.addresses import Address
from lazyd.net.connect import close_socket, connector, describe
from lazyd.net.proxy_protocol import VERSIONS as PROXY_PROTOCOL_VERSIONS
from lazyd.net.proxy_protocol import encode as encode_proxy_header
from lazyd.net.rights import allow_rights, kernel_refuses_rights, refuse_rights

# Connections accepted in a row before other tasks get a turn.
ACCEPT_BATCH = 64
# Connections admitted between two looks at the kernel's accept queue.
ADMIT_SLICE = 64
# Released connections connecting to the upstream at once.  Ten thousand
# connects at once would overflow the service's accept queue (4096 at most
# here), and every SYN dropped there costs its client a second.
CONNECTS_IN_FLIGHT = 128
# Once the service has closed its side, the client gets this long without
# sending anything before lazyd closes the connection (HAProxy's "timeout
# client-fin"): a client that never closes would otherwise hold two fds and
# keep an idle service running for ever.  Sending resets it, so an upload
# that goes on after the reply is not cut.
HALF_CLOSED_TIMEOUT = 60.0
_WATCH_HELD = select.EPOLLRDHUP | select.EPOLLET  # the client hanging up only
# EPOLLRDHUP: a peer's EOF may come in the same event as its last data,
# which the shovel would otherwise not read past (see Flow.short_drains);
# EPOLLPRI: TCP urgent data, at whose mark a read stops short too.
_WATCH_OPEN = (select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLPRI
               | select.EPOLLET)
# Events after which a flow reads its source until EAGAIN or EOF (Flow.exhaust).
_READ_ALL = select.EPOLLRDHUP | select.EPOLLPRI | select.EPOLLHUP | select.EPOLLERR

# A released connection whose upstream does not answer a connect within this
# time is closed (a local service that is ready answers at once).
CONNECT_TIMEOUT = 10.0
# A released connection whose upstream refuses it is held again and tried
# again this often, for at most CONNECT_TIMEOUT: the service has just exited
# (the runner will know in a moment and start it again for this client), or
# is restarting.
REFUSED_RETRY = 0.05
_REFUSED = (errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.ECONNABORTED)

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


class _RawAccept(Protocol):
    def _accept(self) -> tuple[int, Any]: ...


# The `attempt` of an open connection's idle timer (connect attempts count from 1).
_IDLE_TIMER = -1
# The timer that stands for no connection: the pump, tried again.
_PUMP_TIMER = 0



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
        on_warm: Callable[[], None] | None = None,
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
        # Called for each connection accepted while ready (the kernel data
        # path wants to know: it steers new connections past this listener).
        self.on_warm = on_warm
        self.log = log
        self.clock = clock
        self.activity = Activity(clock)
        self._ready = False
        self._holding = False  # ready, but forwarding nothing new: see hold_new()
        # A connect the upstream refused while ready: nothing is connected
        # again before this time (the refused one is first in line).
        self._retry_at = -math.inf
        self._stopping = False
        self._pending: deque[Connection] = deque()  # held, in arrival order (and some gone)
        self._held = 0
        # Accepted and counted in the fd budget, not yet admitted (see
        # _accept_loop): plain (fd, peer) pairs, in arrival order.
        self._arrived: list[tuple[int, Any]] = []
        self._connecting = 0
        self._pumping = False
        self._pump_later = False
        self._fds_short = False
        self._room: trio.Event | None = None  # made when the accept loop waits for room
        self._nursery: trio.Nursery | None = None
        # Every connection's fds (client and upstream) and timers; from run().
        self._reactor: Reactor[Connection, Flow]
        self._shovel = Shovel(clock)
        self._spare: socket.socket | None = None  # see adopt()
        self._begin_connect = connector(upstream)
        self._upstream_unix = upstream.is_unix
        # The listener's family, asked once: socket.family costs an enum lookup.
        self._family = listener.family
        self._accept_log = BurstLog(log, f"{name}: accept")
        self._connect_log = BurstLog(log, f"{name}: connecting to {upstream}")

    # -- what the runner sees (and Forwarder's) ------------------------------

    @property
    def bytes_in(self) -> int:
        """Bytes forwarded client -> upstream."""
        return self._shovel.bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes forwarded upstream -> client."""
        return self._shovel.bytes_out

    @property
    def first_byte_at(self) -> float | None:
        """When the first byte since release() reached the service."""
        return self._shovel.first_byte_at

    @property
    def held(self) -> int:
        """Connections accepted and not yet forwarded."""
        return self._held + len(self._arrived)

    @property
    def waiting(self) -> int:
        return self._held + len(self._arrived)

    def adopt(self, upstream: socket.socket) -> None:
        """A connection to the upstream already made (the readiness probe's):
        the first held client is forwarded over it at release() instead of
        connecting again.  Some services serve one client at a time, and a
        probe that connects and leaves is then the first client they serve,
        or fail on."""
        self._close_spare()
        self._spare = upstream
        FDS.opened()

    def _close_spare(self) -> None:
        if self._spare is not None:
            close_socket(self._spare)
            FDS.closed()
            self._spare = None

    def release(self) -> None:
        """The upstream is ready: forward every held connection, in arrival
        order, and from now on forward new ones at once."""
        self._ready = self._shovel.ready = True
        self._holding = False
        self._retry_at = -math.inf
        self._shovel.first_byte_at = None
        self._pump()
        self._close_spare()  # nobody was held: the probe has done its part

    def hold_new(self) -> None:
        """Ready, but hold what arrives from now on until resume(): for a moment
        in which where new connections should go is being settled (the kernel
        data path re-taking a service's listener).  Forwarded ones run on."""
        self._holding = True

    def resume(self) -> None:
        """Forward what hold_new() held, in arrival order, and what comes next."""
        self._holding = False
        self._pump()

    async def drained(self) -> None:
        """Return once nothing is held here (every held connection forwarded,
        or gone), or once the proxy is no longer ready."""
        while (self._held or self._arrived) and self._ready:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def drop(self, reason: str) -> int:
        """The start failed: close every held connection and return how many.
        Stays not ready, so the next connection is held (and calls on_traffic)."""
        held = [conn for conn in self._pending if conn.state is HELD]
        self._pending.clear()
        self._close_spare()
        for conn in held:
            self._close(conn)
        count = len(held) + self._close_arrived()
        if count:
            self.log(f"{self.name}: closed {count} held connection{'s' if count != 1 else ''}"
                     f" ({reason})")
        return count

    def _close_arrived(self) -> int:
        """Close the connections accepted but not yet admitted; how many."""
        arrived, self._arrived = self._arrived, []
        for fd, _peer in arrived:
            os.close(fd)
            FDS.closed()
        return len(arrived)

    def unready(self) -> None:
        """The service stopped: hold new connections again.  Connections already
        forwarded run on until either end closes them.  Connections that were
        waiting for a free slot stay held, and count as traffic: on_traffic()
        is called for them (soon, not from inside this call)."""
        self._ready = self._shovel.ready = False
        self._holding = False
        self._room_freed()  # drained() returns: not ready any more
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
        self._reactor = Reactor(
            before_events=self._hold_connects, on_event=self._event,
            after_events=self._connect_again, on_again=self._go_on, on_timer=self._timer,
            stale=_closed,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reactor.run)
                task_status.started()
                await self._accept_loop()
        finally:
            self._stopping = True
            self._nursery = None
            for conn in self._reactor.registered():
                self._close(conn)
            self._pending.clear()
            self._close_arrived()
            self._close_spare()
            self._reactor.close()
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
                self._admit_arrived()
                await trio.sleep_forever()  # until cancelled
            while self._held + len(self._arrived) >= self.queue_limit:
                # Full: accept nothing more.  The kernel's backlog keeps the
                # rest; accepting and closing would turn a wait into a refusal.
                self._admit_arrived()
                if self._held < self.queue_limit:
                    break
                if self._room is None:
                    self._room = trio.Event()
                await self._room.wait()
            if not FDS.allows(FDS.reserve()):
                # Near the fd limit: leave the rest in the backlog until
                # connections close, rather than take the fds lazyd itself
                # needs (a spawned service's output pipe, the control socket).
                self._admit_arrived()
                if not self._fds_short:
                    self._fds_short = True
                    self.log(f"{self.name}: near the open-file limit ({FDS.limit}): new "
                             "connections wait in the backlog until some close")
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                fd, peer = accept_fd()
            except BlockingIOError:
                if self._arrived:
                    # A slice, then the kernel's queue again: admitting costs
                    # ~6 times what accept(2) does, and a burst admitted all
                    # at once (10,000 connects: ~0.15 s) would overflow the
                    # queue behind it.  Accepted, a connection waits in
                    # lazyd's own list, bounded by queue_limit, not somaxconn.
                    self._admit_arrived(ADMIT_SLICE)
                    if self._arrived:
                        await trio.lowlevel.checkpoint()
                    continue  # more may have come meanwhile: no wait for that
                if self._fds_short:
                    # Said once per burst, when the backlog is empty, not
                    # each time an fd frees.
                    self._fds_short = False
                    self.log(f"{self.name}: every connection that waited for fds is accepted")
                await trio.lowlevel.wait_readable(self.listener)
                continue
            except OSError as exc:
                self._admit_arrived()
                if exc.errno in _OUT_OF_RESOURCES:
                    self._accept_log.failed(f"{describe(exc)}; retrying every 100 ms")
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if exc.errno in _ACCEPT_AGAIN:
                    await trio.lowlevel.checkpoint()
                    continue
                raise
            self._accept_log.succeeded()
            # Admitted (gate, bookkeeping, epoll) only once the kernel's queue
            # is empty: a burst comes off the queue at the speed of accept(2)
            # alone, several times what the whole of admitting allows, so a
            # flood of connects does not overflow the accept queue (each SYN
            # dropped there costs its client a second) while lazyd works.
            FDS.opened()
            self._arrived.append((fd, peer))
            # Let others run between batches of a long backlog.  A held
            # connection costs no task and no wake-up, so the batch can be
            # long: a flood must come off the kernel's queue faster than it
            # arrives, or the queue overflows and SYNs are dropped.
            accepted += 1
            if accepted % ACCEPT_BATCH == 0:
                await trio.lowlevel.checkpoint()

    def _admit_arrived(self, limit: int | None = None) -> None:
        """Admit what the accept loop took off the kernel's queue, in order:
        all of it, or the first `limit` connections."""
        while self._arrived:
            if limit is None:
                arrived, self._arrived = self._arrived, []
            else:
                arrived = self._arrived[:limit]
                del self._arrived[:limit]
            for n, (fd, peer) in enumerate(arrived):
                try:
                    self._admit(fd, peer)
                except BaseException:
                    for rest, _peer in arrived[n + 1:]:
                        os.close(rest)
                        FDS.closed()
                    raise
            if limit is not None:
                return

    def _admit(self, fd: int, peer: Any) -> None:
        """Admit (or refuse) one accepted connection, already in the fd budget."""
        if self.refusing:
            reset_and_close(socket.socket(self._family, socket.SOCK_STREAM, 0, fd))
            FDS.closed()
            return
        client = None
        if self.gate is not None:
            client = socket.socket(self._family, socket.SOCK_STREAM, 0, fd)
            if not self.gate.admit(client, peer):
                FDS.closed()
                return  # refused: reset, counted and logged; the service is not started
        conn = Connection(self._family, fd, peer, client)
        # Held, the connection is watched for nothing but its client leaving:
        # what it sends stays in the kernel's receive buffer until release
        # (the client's TCP window closes once that is full).  One the pump
        # will forward at once is watched for data from the start instead:
        # one epoll_ctl less than a change of events when it connects.
        watch = (_WATCH_OPEN if self._ready and not self._holding and not self._pending
                 and self._connecting < CONNECTS_IN_FLIGHT
                 and (self.max_connections is None or self.activity.count < self.max_connections)
                 else _WATCH_HELD)
        try:
            self._reactor.register(fd, watch, conn)
            conn.watch = watch
        except OSError:
            conn.close_client()
            FDS.closed()
            if self.gate is not None:
                self.gate.release(peer)
            return
        self._pending.append(conn)
        self._held += 1
        if self._ready:
            if self.on_warm is not None:
                self.on_warm()
            self._pump()
        else:
            self.on_traffic()

    def _check_held(self, conn: Connection) -> None:
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
        if self._pending and self._retry_at > trio.current_time():
            # Refused a moment ago: every reactor batch and every new client
            # calls this, and connecting at each of them would spin.
            if not self._pump_later:
                self._pump_later = True
                self._reactor.at(self._retry_at, None, _PUMP_TIMER)
            return
        self._pumping = True
        try:
            moved = False
            while (
                self._ready
                and not self._holding
                and not self._stopping
                and self._pending
                and self._connecting < CONNECTS_IN_FLIGHT
                and (self.max_connections is None or self.activity.count < self.max_connections)
            ):
                conn = self._pending[0]
                if conn.state is not HELD:
                    self._pending.popleft()  # left while held
                    continue
                if not FDS.allows(FDS.reserve() // 2):
                    # Out of fds for upstream connects: try again when
                    # connections close, or in a moment.
                    if not self._pump_later:
                        self._pump_later = True
                        self._reactor.at(trio.current_time() + ACCEPT_BACKOFF, None,
                                         _PUMP_TIMER)
                    break
                self._pending.popleft()
                self._held -= 1
                moved = True
                conn.state = CONNECTING
                if not conn.started:  # its first release (it may be held again)
                    conn.started = trio.current_time()
                self._connecting += 1
                self.activity.add(1)
                self._connect(conn)
            if moved:
                self._room_freed()
        finally:
            self._pumping = False

    def _room_freed(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def _connect(self, conn: Connection) -> None:
        """One connect attempt; its answer arrives as an event (or at once)."""
        conn.attempt += 1
        if self._spare is not None:
            sock, code, self._spare = self._spare, 0, None  # counted in the budget already
        else:
            try:
                sock, code = self._begin_connect()
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._reactor.at(trio.current_time() + ACCEPT_BACKOFF, conn, conn.attempt)
                    return
                self._connect_failed(conn, exc)
                return
            FDS.opened()
        if code == errno.EAGAIN:
            # A Unix listener with a full backlog.  TCP would retransmit its
            # SYN by itself; a Unix connect just fails, so try again, backing off.
            sock.close()
            FDS.closed()
            self._reactor.at(trio.current_time() + conn.backoff, conn, conn.attempt)
            conn.backoff = min(conn.backoff * 2, 0.1)
            return
        conn.upstream = sock
        conn.upstream_fd = sock.fileno()
        self._reactor.register(conn.upstream_fd, _WATCH_OPEN, conn)
        if code == 0:
            self._connected(conn)
            return
        # A SYN that met a full accept queue is dropped, and TCP sends it
        # again only after a second.  A local service answers a connect at
        # once, so after FIRST_SYN_WAIT lazyd tries again itself.
        self._reactor.at(trio.current_time() + conn.syn_wait, conn, conn.attempt)
        conn.syn_wait = min(conn.syn_wait * 2, 2.0)

    def _connect_answered(self, conn: Connection, events: int) -> None:
        assert conn.upstream is not None
        if events & (select.EPOLLERR | select.EPOLLHUP) or not events & select.EPOLLOUT:
            # A failed connect always says EPOLLERR or EPOLLHUP; a writable
            # socket without either is connected, no need to ask SO_ERROR.
            code = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._connect_failed(conn, OSError(code, os.strerror(code)))
                return
        self._connected(conn, events)

    def _connect_timer(self, conn: Connection) -> None:
        if trio.current_time() - conn.started >= CONNECT_TIMEOUT:
            self._connect_failed(conn, TimeoutError(errno.ETIMEDOUT, "no answer to connect"))
            return
        self._drop_upstream(conn)
        self._connect(conn)

    def _connect_failed(self, conn: Connection, exc: OSError) -> None:
        if (exc.errno in _REFUSED and not self._stopping
                and trio.current_time() - conn.started < CONNECT_TIMEOUT):
            # Ready a moment ago, refused now: the service has most likely
            # just exited, and the runner hears of it in a moment.  Hold the
            # client again, first in line, for the next start (or for this
            # one, should it listen again) rather than close it.
            self._connect_log.failed(
                f"{describe(exc)}; holding the connection from {show_peer(conn.peer)} again"
            )
            self._hold_again(conn)
            return
        self._connect_log.failed(
            f"{describe(exc)}; closing the connection from {show_peer(conn.peer)}"
        )
        self._close(conn)

    def _hold_again(self, conn: Connection) -> None:
        self._drop_upstream(conn)
        self._connecting -= 1
        self.activity.add(-1)
        conn.state = HELD
        conn.attempt += 1  # its connect timers are stale now
        self._reactor.modify(conn.client_fd, _WATCH_HELD)
        conn.watch = _WATCH_HELD
        self._pending.appendleft(conn)
        self._held += 1
        if not self._ready:
            self.on_traffic()
        else:
            # Still believed ready: look again shortly, not at once (no spin).
            self._retry_at = trio.current_time() + REFUSED_RETRY
            if not self._pump_later:
                self._pump_later = True
                self._reactor.at(self._retry_at, None, _PUMP_TIMER)

    def _connected(self, conn: Connection, events: int = select.EPOLLIN) -> None:
        """The upstream connection is made; `events`: what its fd's event
        said (by default, as if it had data: nothing said so)."""
        self._connect_log.succeeded()
        self._connecting -= 1
        conn.state = OPEN
        client, upstream = conn.client, conn.upstream
        assert upstream is not None
        client_unix = conn.family == socket.AF_UNIX
        try:
            client.setblocking(False)
            if not client_unix:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Watched for data both ways from now on; what the client sent
            # while held is read first, so it reaches the service first.
            if conn.watch != _WATCH_OPEN:
                self._reactor.modify(conn.client_fd, _WATCH_OPEN)
                conn.watch = _WATCH_OPEN
            header = (b"" if self.proxy_protocol is None else
                      encode_proxy_header(self.proxy_protocol, conn.peer, client.getsockname()))
        except OSError:
            self._close(conn)  # reset while held
            return
        takes_rights = not kernel_refuses_rights()
        conn.inbound = Flow(client, upstream, True, takes_rights and client_unix,
                            not client_unix)
        conn.outbound = Flow(upstream, client, False, takes_rights and self._upstream_unix,
                             not self._upstream_unix)
        if header:
            Shovel.park(conn.inbound, header)  # first of all, before the client's bytes
            conn.inbound.skip = len(header)
        conn.inbound.exhaust = conn.exhaust
        conn.outbound.exhaust = bool(events & _READ_ALL)
        if self.idle_timeout is not None:
            conn.last_io = trio.current_time()
            self._reactor.at(conn.last_io + self.idle_timeout, conn, _IDLE_TIMER)
        self._flow(conn, conn.inbound)
        if conn.state is OPEN and events & (select.EPOLLIN | _READ_ALL):
            # Only if the service has sent something already: its fd has been
            # watched since the connect, so what it sends later is an event.
            self._flow(conn, conn.outbound)
        self._pump()

    # -- forwarding ------------------------------------------------------------

    # The reactor's callbacks (see lazyd.datapath.reactor for the order).

    def _hold_connects(self) -> None:
        """A batch of events begins: no connects until it is handled (a
        socket made now could take the number of one just closed)."""
        self._pumping = True

    def _connect_again(self) -> None:
        self._pumping = False
        self._pump()

    def _go_on(self, conn: Connection, flow: Flow) -> None:
        """A flow that had more to move when its turns ran out."""
        if conn.state is OPEN:
            self._flow(conn, flow)

    def _event(self, conn: Connection, fd: int, events: int) -> None:
        try:
            if conn.state is HELD:
                if events & _READ_ALL:
                    conn.exhaust = True
                self._check_held(conn)
            elif conn.state is CONNECTING:
                if fd == conn.upstream_fd:
                    self._connect_answered(conn, events)
                elif events & _READ_ALL:
                    # The client's data waits for the connect, but this event
                    # will not come again (edge-triggered): keep what it said.
                    conn.exhaust = True
            elif conn.state is OPEN:
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
                if events & _READ_ALL:
                    source.exhaust = True
                if trouble or (events & select.EPOLLIN and not stuck(source)):
                    self._flow(conn, source)
                if conn.state is OPEN and (trouble or (events & select.EPOLLOUT and stuck(sink))):
                    self._flow(conn, sink)
                if conn.state is OPEN and trouble and source.done:
                    # Reset or gone after its EOF: nothing sent its way can
                    # arrive any more, and no later event would say so (the
                    # far end may stay silent for ever).
                    self._close(conn)
        except Exception as exc:
            # Expected failures (resets, refusals) are handled where they
            # happen; anything else is a bug, but it ends this connection only.
            self.log(f"{self.name}: connection from {show_peer(conn.peer)} failed: {exc!r}")
            self._close(conn)

    def _timer(self, conn: Connection | None, attempt: int, now: float) -> None:
        """A timer is due: the connect timer of `conn` (or, once open, its
        half-closed timer, or with attempt _IDLE_TIMER its idle timer), or
        (None) the pump."""
        if conn is None:
            self._pump_later = False
            self._pump()
        elif conn.state is CONNECTING and conn.attempt == attempt:
            self._connect_timer(conn)
        elif conn.state is OPEN and attempt == _IDLE_TIMER:
            self._idle_timer(conn, now)
        elif conn.state is OPEN:
            self._half_closed_timer(conn, now)

    def _idle_timer(self, conn: Connection, now: float) -> None:
        """Close a forwarded connection quiet both ways for idle_timeout (else
        look again when it would be): one timer per connection at a time."""
        assert self.idle_timeout is not None
        quiet_until = conn.last_io + self.idle_timeout
        if now < quiet_until:
            self._reactor.at(quiet_until, conn, _IDLE_TIMER)
        else:
            self._close(conn)

    def _half_closed_timer(self, conn: Connection, now: float) -> None:
        """Close a connection the service has finished with and whose client
        has sent nothing for half_closed_timeout (else look again later)."""
        inbound, outbound = conn.inbound, conn.outbound
        if inbound is None or outbound is None or not outbound.done or inbound.done:
            return  # a stale timer, or nothing half-closed about it
        quiet_until = conn.last_in + self.half_closed_timeout
        if now < quiet_until:
            self._reactor.at(quiet_until, conn, conn.attempt)
        else:
            self._close(conn)

    def _flow(self, conn: Connection, flow: Flow) -> None:
        """Move what can be moved now, src -> dst, until either would block;
        at most FLOW_TURNS rounds, then others get a turn (edge-triggered,
        the flow is taken up again without a new event)."""
        if flow.done:
            return
        if self.idle_timeout is not None:
            conn.last_io = trio.current_time()
        if flow.inbound and conn.outbound is not None and conn.outbound.done:
            conn.last_in = trio.current_time()  # the client still has something to say
        turn = self._shovel.turn
        try:
            for _ in range(FLOW_TURNS):
                if not turn(flow):
                    break
            else:
                self._reactor.again.append((conn, flow))
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
            shutdown_write(flow.dst)
            if not flow.inbound:
                conn.last_in = trio.current_time()
                self._reactor.at(conn.last_in + self.half_closed_timeout, conn, conn.attempt)

    # -- closing -----------------------------------------------------------------

    def _drop_upstream(self, conn: Connection) -> None:
        if conn.upstream is not None:
            self._reactor.unregister(conn.upstream_fd)
            conn.upstream.close()  # leaves the epoll set with it
            FDS.closed()
            conn.upstream = None
            conn.upstream_fd = -1

    def _close(self, conn: Connection) -> None:
        """Close both ends of a connection, in whatever state it is."""
        state = conn.state
        if state is CLOSED:
            return
        conn.state = CLOSED
        self._reactor.unregister(conn.client_fd)
        conn.close_client()
        FDS.closed()
        self._drop_upstream(conn)
        for flow in (conn.inbound, conn.outbound):
            if flow is not None:
                Shovel.close(flow)
        conn.inbound = conn.outbound = None
        if self.gate is not None:
            self.gate.release(conn.peer)
        if state is HELD:
            self._held -= 1
            if len(self._pending) > 2 * self._held + 64:
                # Many left while held: drop them from the queue now, not
                # one at a time from the middle of it.
                self._pending = deque(c for c in self._pending if c.state is HELD)
            self._room_freed()
            return
        if state is CONNECTING:
            self._connecting -= 1
        self.activity.add(-1)
        self._pump()


def _closed(conn: Connection) -> bool:
    return conn.state is CLOSED
