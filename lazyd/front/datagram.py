"""Proxy mode for datagram sockets (UDP and unix-dgram): a flow per client.

No existing tool does this (systemd-socket-proxyd is stream only), yet the
seed's own case, HTTP/3 on udp 443, needs it.

    client A ──┐                 ┌── flow A: own socket, connected to upstream ──┐
               ├── held socket ──┤                                               ├── service
    client B ──┘  (lazyd's own)  └── flow B: own socket, connected to upstream ──┘

Each client address gets its own upstream socket, so the service sees one
peer per client (QUIC keys its connections on that), and whatever the service
sends back on that socket goes to that client, from the held socket, so the
client sees an answer from the address it wrote to.  When the held socket is
bound to a wildcard address, replies carry the address each datagram was sent
to (IP_PKTINFO / IPV6_PKTINFO): a multi-homed host must not answer from
another of its addresses.

Until `release()`, datagrams queue (at most `queue_limit`; past it they are
dropped and counted, since nothing may block the receive loop); then they go
out in arrival order.  A flow that carries nothing either way for
`flow_timeout` is closed; one timer task sleeps until the oldest flow's
deadline, so nothing wakes while nothing happens.
"""

from __future__ import annotations

import socket
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

import trio

from lazyd.datapath.budget import FDS
from lazyd.front.forwarder import Activity, BurstLog, Clock, Forwarder, LogFn
from lazyd.net.access import Gate
from lazyd.net.addresses import Address
from lazyd.net.connect import close_socket, describe
from lazyd.net.rights import RIGHTS_SPACE, allow_rights, close_received, received_fds, refuse_rights

# Big enough for any UDP datagram (65507 bytes of payload over IPv4); a larger
# unix-dgram message is dropped rather than cut short.
MAX_DATAGRAM = 65536
MAX_FLOWS = 4096
# A full table (MAX_FLOWS, or the fd budget) makes room for a new client by
# closing the least recently used flow, if it has carried nothing for this
# long: a client that is still talking keeps its flow, one that has gone
# quiet gives way rather than lock everyone else out for flow_timeout.
EVICT_QUIET = 1.0
# While delivering what queued during the start, a unix-dgram service whose
# receive queue is full (only net.unix.max_dgram_qlen datagrams, 10 by
# default) is waited for this long per datagram before the datagram is dropped.
DELIVERY_WAIT = 1.0

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python < 3.12 lacks the name
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO_SIZE = 20  # in6_addr, ifindex

Cmsg = tuple[int, int, bytes]


class _Flow:
    """One client's datagrams and its own socket to the upstream."""

    def __init__(self, client: Any, sock: socket.socket) -> None:
        self.client = client  # where replies go; None for an unbound unix-dgram client
        self.sock = sock
        self.reply_from: Cmsg | None = None  # PKTINFO for replies on a wildcard socket
        self.peer = client  # as the gate counted it
        self.last = trio.current_time()
        self.scope = trio.CancelScope()


def _flow_key(client: Any) -> Hashable:
    # An IPv6 source is (host, port, flowinfo, scope_id); the flow label may
    # change from one datagram to the next without it being another client.
    if isinstance(client, tuple) and len(client) == 4:
        return (client[0], client[1], client[3])
    return client  # type: ignore[no-any-return]


def _enable_pktinfo(sock: socket.socket) -> int:
    """Ask for each datagram's destination address when the socket is bound
    to a wildcard; return the ancillary buffer size recvmsg needs (0: none)."""
    if sock.family == socket.AF_INET and sock.getsockname()[0] == "0.0.0.0":
        sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        return socket.CMSG_SPACE(_IN_PKTINFO.size)
    if sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        return socket.CMSG_SPACE(_IN6_PKTINFO_SIZE)
    return 0


def _disable_pktinfo(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 0)
    elif sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 0)


def _reply_source(ancdata: list[Cmsg]) -> Cmsg | None:
    """The control message that makes a reply leave from the address the
    client's datagram arrived at."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
            _ifindex, local, _dest = _IN_PKTINFO.unpack(data[: _IN_PKTINFO.size])
            # ipi_spec_dst is the local address; leaving the interface to the
            # routing table is what any UDP server does.
            return (level, kind, _IN_PKTINFO.pack(0, local, bytes(4)))
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            # Same layout for sending: the address to send from, and the
            # interface (needed for a link-local client).
            return (level, kind, bytes(data[:_IN6_PKTINFO_SIZE]))
    return None


class DatagramProxy(Forwarder):
    """Queues datagrams from a held datagram socket (UDP or unix-dgram) until
    the service is ready, then relays them over one upstream socket per
    client, and the service's replies back to each client.

    The caller owns `sock` (cancel run() before closing it); run() makes it
    non-blocking and restores its mode on the way out.  `on_traffic()`
    is called for each datagram that arrives while not ready.  `clock` stamps
    `first_byte_at` and `last_active_change`; flow expiry runs on trio's clock.
    """

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        upstream: Address,
        *,
        queue_limit: int,
        flow_timeout: float = 60.0,
        max_flows: int = MAX_FLOWS,
        gate: Gate | None = None,
        on_traffic: Callable[[], None],
        log: LogFn,
        clock: Clock = trio.current_time,
    ) -> None:
        if queue_limit < 1 or max_flows < 1:
            raise ValueError("queue_limit and max_flows must be at least 1")
        if upstream.is_stream:
            raise ValueError(f"a datagram proxy needs a datagram upstream, not {upstream}")
        self.name = name
        self.sock = sock
        self.upstream = upstream
        self.queue_limit = queue_limit
        self.flow_timeout = flow_timeout
        self.max_flows = max_flows
        self.gate = gate  # allow/deny, if any
        self.on_traffic = on_traffic
        self.log = log
        self.clock = clock
        self.dropped = 0  # queue overflow, too many flows, full buffers, undeliverable replies
        self.datagrams_in = 0  # client -> upstream, delivered
        self.datagrams_out = 0  # upstream -> client, delivered
        self.bytes_in = 0
        self.bytes_out = 0
        self.first_byte_at: float | None = None
        self.activity = Activity(clock)  # counts flows
        self._ready = False
        self._queue: deque[tuple[Any, bytes, Cmsg | None]] = deque()
        self._flows: OrderedDict[Hashable, _Flow] = OrderedDict()  # oldest activity first
        self._flow_added = trio.Event()
        self._deliver = trio.Event()
        self._ancillary = 0
        # Unix-dgram sockets on a kernel that cannot refuse fds: the held one, the flows'.
        self._takes_rights = False
        self._flows_take_rights = False
        self._nursery: trio.Nursery | None = None
        self._flow_log = BurstLog(log, f"{name}: opening a flow to {upstream}")

    # -- what the runner sees (and Forwarder's; `active` counts flows) -------

    @property
    def queued(self) -> int:
        """Datagrams waiting for the service."""
        return len(self._queue)

    @property
    def waiting(self) -> int:
        return self.queued

    @property
    def flows(self) -> int:
        """Clients with an open flow."""
        return len(self._flows)

    def release(self) -> None:
        """The upstream is ready: deliver what queued, in order, then relay at once."""
        self._ready = True
        self.first_byte_at = None
        if self._queue:
            self._deliver.set()

    def drop(self, reason: str) -> int:
        """The start failed: discard every queued datagram and return how many."""
        count = len(self._queue)
        self._queue.clear()
        self.dropped += count
        self._close_flows()
        if count:
            self.log(f"{self.name}: dropped {count} queued datagram{'s' if count != 1 else ''}"
                     f" ({reason})")
        return count

    def unready(self) -> None:
        """The service stopped: queue again, and close every flow (its peer is
        gone).  Datagrams still queued count as traffic: on_traffic() is called
        for them (soon, not from inside this call)."""
        self._ready = False
        self._close_flows()
        if self._queue and self._nursery is not None:
            self._nursery.start_soon(self._report_queued)

    async def _report_queued(self) -> None:
        if not self._ready and self._queue:
            self.on_traffic()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive until cancelled.  Cancelling closes every flow."""
        was_blocking = self.sock.getblocking()
        self.sock.setblocking(False)
        self._ancillary = _enable_pktinfo(self.sock)
        # Anyone who may write to a unix-dgram socket may attach fds, and an
        # fd the kernel drops in our recvmsg closes on the event loop (see
        # lazyd/rights.py): refuse them, or make room and close them elsewhere.
        refused = refuse_rights(self.sock)
        if not refused:
            self._takes_rights = True
            self._ancillary += RIGHTS_SPACE
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._expire_flows)
                nursery.start_soon(self._deliver_queued)
                task_status.started()
                await self._receive()
        finally:
            self._nursery = None
            self._ready = False
            self._close_flows()
            # Leave the socket as it was given: in pass mode a service may
            # inherit it, and would get control messages it never asked for.
            if self.sock.fileno() != -1:
                if self._ancillary:
                    _disable_pktinfo(self.sock)
                if refused:
                    allow_rights(self.sock)
                self.sock.setblocking(was_blocking)

    # -- client -> upstream ------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            if self.paused:
                await trio.sleep_forever()  # handed over (see Forwarder.paused)
            try:
                data, ancdata, flags, client = self.sock.recvmsg(MAX_DATAGRAM, self._ancillary)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except ConnectionRefusedError:
                # An ICMP error for an earlier reply, reported on the next
                # call: it concerns nobody waiting now.
                await trio.lowlevel.checkpoint()
                continue
            if self._takes_rights:
                close_received(received_fds(ancdata))
            if flags & socket.MSG_TRUNC:
                self.dropped += 1
            else:
                self._arrive(client, data, _reply_source(ancdata))
            await trio.lowlevel.checkpoint()

    def _arrive(self, client: Any, data: bytes, reply_from: Cmsg | None) -> None:
        if self.gate is not None and not self.gate.admit_datagram(client):
            return  # refused (and counted): it starts nothing and opens no flow
        if self.refusing:
            self.dropped += 1  # the service is failed: nothing would take it
            return
        # While anything is still queued, newer datagrams queue behind it:
        # release() must not let a late datagram overtake an early one.
        if not self._ready or self._queue:
            if len(self._queue) < self.queue_limit:
                self._queue.append((client, data, reply_from))
            else:
                self.dropped += 1
            if not self._ready:
                self.on_traffic()
            return
        flow = self._flow_for(client, reply_from)
        if flow is None:
            self.dropped += 1
            return
        try:
            flow.sock.send(data)
        except OSError:
            # Full buffer, or ECONNREFUSED left by an earlier datagram nobody
            # took: a datagram service loses this one, as it would anyway.
            self.dropped += 1
            return
        self._sent_up(len(data))

    async def _deliver_queued(self) -> None:
        while True:
            await self._deliver.wait()
            self._deliver = trio.Event()
            while self._ready and self._queue:
                item = self._queue[0]
                client, data, reply_from = item
                if not await self._deliver_one(client, data, reply_from):
                    self.dropped += 1
                # drop() or unready() may have run while we waited.
                if self._queue and self._queue[0] is item:
                    self._queue.popleft()
                await trio.lowlevel.checkpoint()

    async def _deliver_one(self, client: Any, data: bytes, reply_from: Cmsg | None) -> bool:
        flow = self._flow_for(client, reply_from)
        if flow is None:
            return False
        with trio.move_on_after(DELIVERY_WAIT):
            while True:
                try:
                    flow.sock.send(data)
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_writable(flow.sock)
                    except trio.ClosedResourceError:
                        return False  # the flow closed meanwhile
                    continue
                except OSError:
                    return False
                self._sent_up(len(data))
                return True
        return False

    def _sent_up(self, size: int) -> None:
        self.datagrams_in += 1
        self.bytes_in += size
        if self.first_byte_at is None and self._ready:
            self.first_byte_at = self.clock()

    # -- flows -------------------------------------------------------------------

    def _flow_for(self, client: Any, reply_from: Cmsg | None) -> _Flow | None:
        key = _flow_key(client)
        flow = self._flows.get(key)
        if flow is None:
            if self._nursery is None or not self._room_for_a_flow():
                return None
            if self.gate is not None and not self.gate.admit_flow(client):
                return None  # max_connections_per_source: counted and logged
            try:
                sock = self._open_upstream()
            except OSError as exc:
                if self.gate is not None:
                    self.gate.release(client)
                self._flow_log.failed(describe(exc))
                return None
            FDS.opened()
            self._flow_log.succeeded()
            flow = _Flow(client, sock)
            self._flows[key] = flow
            self.activity.add(1)
            self._nursery.start_soon(self._relay_replies, key, flow)
            self._flow_added.set()
            self._flow_added = trio.Event()
        flow.client = client
        if reply_from is not None:
            flow.reply_from = reply_from
        self._touch(key, flow)
        return flow

    def _room_for_a_flow(self) -> bool:
        """Whether a new flow may open: below max_flows and with fds to spare
        (flows take from the same budget as the stream proxies' connections,
        so a datagram spray cannot take the fds lazyd itself needs), if need
        be after closing the least recently used flow, when it is quiet."""
        if len(self._flows) < self.max_flows and FDS.allows(FDS.reserve()):
            return True
        if not self._flows:
            return False
        key, oldest = next(iter(self._flows.items()))
        if trio.current_time() - oldest.last < EVICT_QUIET:
            return False  # every flow is busy: this datagram is dropped
        # One for one: the evicted flow's socket closes as soon as its task
        # runs, so the new flow costs the budget nothing in the end.
        self._close_flow(key, oldest)
        return True

    def _open_upstream(self) -> socket.socket:
        sock = socket.socket(self.upstream.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.upstream.is_unix:
                # An unbound unix-dgram socket cannot be answered.  Binding to
                # "" gives it a unique abstract name (Linux autobind).  Once
                # connected it hears only from the service; fds are refused
                # all the same (a service is not lazyd's to trust either).
                if not refuse_rights(sock):
                    self._flows_take_rights = True
                sock.bind("")
            sock.connect(self.upstream.sockaddr())
        except BaseException:
            sock.close()
            raise
        return sock

    def _touch(self, key: Hashable, flow: _Flow) -> None:
        flow.last = trio.current_time()
        self._flows.move_to_end(key)

    def _close_flow(self, key: Hashable, flow: _Flow) -> None:
        if self._flows.get(key) is flow:
            del self._flows[key]
            self.activity.add(-1)
            if self.gate is not None:
                self.gate.release(flow.peer)
        flow.scope.cancel()  # its task closes the socket

    def _close_flows(self) -> None:
        for key, flow in list(self._flows.items()):
            self._close_flow(key, flow)

    async def _expire_flows(self) -> None:
        while True:
            if not self._flows:
                await self._flow_added.wait()
                continue
            key, flow = next(iter(self._flows.items()))
            due = flow.last + self.flow_timeout
            if trio.current_time() >= due:
                self._close_flow(key, flow)
                continue
            # If the flow sees traffic meanwhile it moves to the end, and
            # waking finds the next oldest: at most one early wake per flow.
            await trio.sleep_until(due)

    # -- upstream -> client ------------------------------------------------------

    async def _relay_replies(self, key: Hashable, flow: _Flow) -> None:
        try:
            with flow.scope:
                while True:
                    try:
                        data = self._recv_reply(flow.sock)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(flow.sock)
                        continue
                    except ConnectionRefusedError:
                        # A datagram found nobody listening (ICMP port
                        # unreachable, or a unix-dgram peer gone).
                        await trio.lowlevel.checkpoint()
                        continue
                    self._reply(flow, data)
                    if self._flows.get(key) is flow:
                        self._touch(key, flow)
                    await trio.lowlevel.checkpoint()
        except OSError as exc:
            self.log(f"{self.name}: flow for {flow.client!r} failed: {describe(exc)}")
        finally:
            self._close_flow(key, flow)
            close_socket(flow.sock)
            FDS.closed()

    def _recv_reply(self, sock: socket.socket) -> bytes:
        if not self._flows_take_rights:
            return sock.recv(MAX_DATAGRAM)
        # A kernel that cannot refuse fds (and the flow's socket is unix-dgram
        # too): take them, to close them off the event loop.
        data, ancdata, _flags, _ = sock.recvmsg(MAX_DATAGRAM, RIGHTS_SPACE)
        close_received(received_fds(ancdata))
        return data

    def _reply(self, flow: _Flow, data: bytes) -> None:
        if flow.client is None:
            self.dropped += 1  # an unbound unix-dgram client has no address to answer
            return
        try:
            if flow.reply_from is not None:
                self.sock.sendmsg([data], [flow.reply_from], 0, flow.client)
            else:
                self.sock.sendto(data, flow.client)
        except OSError:
            self.dropped += 1
            return
        self.datagrams_out += 1
        self.bytes_out += len(data)
