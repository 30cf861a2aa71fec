"""The userspace byte shovel: one direction of a forwarded connection at a
time (`Flow`), moved by the proxy's `Shovel` through one buffer that every
proxy of the process shares, counting the bytes each way.  The stream proxy
decides when a flow moves (on its fds' events) and what an EOF or an error
means for the connection.
"""

from __future__ import annotations

import contextlib
import mmap
import socket
from collections.abc import Callable

from lazyd.datapath.budget import PARKED
from lazyd.net.rights import RIGHTS_SPACE, close_received, received_fds

# How data is copied, decided by measurement: iperf3 through one loopback
# connection, the proxy and iperf3's receiving end on one CPU, the sender
# on the other (benchmarks/bench_proxy.py --only bulk), GB/s, median of 5,
# all in one run; systemd-socket-proxyd (splice, 256 KiB pipes) 1.42:
#
#     splice(2), 1 MiB pipe (after 128 KiB in 64 KiB reads)   1.23
#     recv_into/send,  64 KiB                                 1.47
#     recv_into/send, 256 KiB                                 1.78
#     recv_into/send,   1 MiB                                 1.87
#     recv_into/send,   2 MiB                                 2.01
#
# splice(2) moves the sender's pages by reference, so the receiving end
# copies out of memory another CPU wrote; recv/send copies once more, but
# the receiver then reads what this CPU has just written, from its cache,
# and gets it in big linear segments.  The proxy's own CPU time per GB came
# out the same either way (0.28-0.32 s/GB): what Python costs is its trip
# around the loop, so what pays is moving more per trip.  So there is no
# splice: a direction starts with 64 KiB reads (CHUNK) and, once it has
# carried BULK_AFTER bytes and a read has filled the whole chunk (more was
# waiting than one read takes), reads BULK at a time.  Bytes carried alone
# are no sign of bulk: a keep-alive connection carrying thousands of small
# requests passes any threshold.
#
# Memory.  A big buffer would cost its size per direction per connection
# if bytes the far end does not take were kept aside, and a client that
# stops reading would make lazyd hold them.  So a bulk read only peeks
# (MSG_PEEK): what the far end takes is then dropped from the source's
# receive queue (MSG_TRUNC: TCP discards it without a copy), and what it
# does not take stays in the kernel, where TCP's own window holds the
# sender back.  A bulk flow therefore keeps nothing aside, ever.  A 64 KiB
# read takes its bytes (one syscall less per small message: a small request
# must not pay for the peek); what the far end leaves of it is kept aside,
# at most CHUNK per direction and PARKED_LIMIT for the whole process
# (`lazyd.datapath.budget.PARKED`).  A flow that would need to keep bytes
# aside while the process is at that limit peeks instead, so the limit
# holds however many clients stop reading.
CHUNK = 64 * 1024
BULK = 2 * 1024 * 1024
BULK_AFTER = 2 * CHUNK
# Rounds one flow may run before the others get a turn.
FLOW_TURNS = 16
_PEEK = socket.MSG_PEEK
_DISCARD = socket.MSG_TRUNC

# One buffer for the process: data goes from recv_into straight to send
# (every proxy runs in the one trio thread, and a turn never yields), and
# only what the far end would not take is kept aside.
# Anonymous memory, not a bytearray: the kernel gives it pages as they are
# first written, so an idle daemon, or one that only ever moves small
# messages, does not carry 2 MiB of zeros in its RSS.
_BUFFER = mmap.mmap(-1, BULK)
_VIEW = memoryview(_BUFFER)

Clock = Callable[[], float]


def shutdown_write(sock: socket.socket) -> None:
    """Pass a half-close on: EOF from one end becomes shutdown(SHUT_WR) to the other."""
    # A peer that is already gone: the other direction will find out.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


class Flow:
    """One direction of a forwarded connection: src -> dst."""

    __slots__ = ("blocked", "bulk", "carried", "done", "dst", "exhaust", "inbound", "may_bulk",
                 "pending", "rights", "short_drains", "skip", "src")

    def __init__(self, src: socket.socket, dst: socket.socket, inbound: bool,
                 rights: bool = False, short_drains: bool = False) -> None:
        self.src = src
        self.dst = dst
        self.inbound = inbound
        # Read from src, not yet taken by dst: kept aside, counted in PARKED.
        self.pending: bytes = b""
        self.skip = 0  # leading bytes of `pending` not to count (the PROXY header)
        self.carried = 0
        # dst refused what src still holds (a peek): dst's EPOLLOUT resumes it.
        self.blocked = False
        self.done = False  # EOF from src passed on
        # src is a Unix socket that cannot refuse fds (a kernel before 6.16):
        # read with room for them (see lazyd/net/rights.py).
        self.rights = rights
        # src is TCP (the caller knows; socket.family costs an enum lookup):
        # a TCP read that returns less than asked for has emptied the receive
        # queue (tcp_recvmsg stops only at an empty queue once it has
        # something), and whatever arrives next is a new edge-triggered
        # event, so the flow may stop there instead of reading once more for
        # the EAGAIN, a syscall and an exception per message.  Not for Unix
        # sockets: their reads also stop where the sender's credentials or
        # attached fds change, with more data queued behind.
        self.short_drains = short_drains
        # Bulk reads (peek BULK, discard what dst took) need MSG_TRUNC's
        # discard without a copy, which only TCP has.
        self.may_bulk = short_drains and not rights
        self.bulk = False
        # Read src until EAGAIN or EOF, not only to a short read: its peer
        # has shut down (EPOLLRDHUP, or an error), and the event for the EOF
        # may have come with the data; or it sent urgent data (EPOLLPRI), at
        # whose mark a read stops short with more queued behind it.
        self.exhaust = False


def stuck(flow: Flow) -> bool:
    """Whether a flow waits for its destination to take data (kept aside, or
    still in the source's receive queue)."""
    return flow.blocked or bool(flow.pending)


class Shovel:
    """Moves the bytes of one proxy's flows and counts them.

    `bytes_in` (client -> upstream) and `bytes_out` count what reached the far
    end (not a PROXY header); `first_byte_at` is the clock time of the first
    inbound byte while `ready` (the proxy sets both when it releases).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.ready = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.first_byte_at: float | None = None

    @staticmethod
    def park(flow: Flow, data: bytes) -> None:
        """Keep `data` aside for `flow`'s dst, ahead of anything read later (the
        PROXY header: a few hundred bytes at most, counted in PARKED too)."""
        flow.pending += data
        PARKED.used += len(data)

    def turn(self, flow: Flow) -> bool:
        """One round of a flow: False once it would block (or src is known
        to be empty, or dst full), or is done (EOF: `flow.done`).  A reset or
        a broken pipe raises OSError."""
        if flow.pending:
            try:
                sent = flow.dst.send(flow.pending)
            except BlockingIOError:
                return False
            PARKED.used -= sent
            self._sent(flow, sent)
            flow.pending = flow.pending[sent:]
            return not flow.pending  # what is left waits for dst's EPOLLOUT
        if flow.bulk or PARKED.used > PARKED.limit - CHUNK:
            return self._peek_turn(flow)
        try:
            if flow.rights:
                n, ancdata, _flags, _ = flow.src.recvmsg_into([_VIEW[:CHUNK]], RIGHTS_SPACE)
                close_received(received_fds(ancdata))
            else:
                n = flow.src.recv_into(_BUFFER, CHUNK)
        except BlockingIOError:
            return False
        if n == 0:
            flow.done = True
            return False
        try:
            sent = flow.dst.send(_VIEW[:n])
        except BlockingIOError:
            sent = 0
        self._sent(flow, sent)
        flow.carried += n
        if sent < n:
            # dst is full: its EPOLLOUT (the kernel marks a socket that
            # refused bytes) takes the flow up again.  There was room for
            # a whole chunk in PARKED before the read.
            flow.pending = bytes(_VIEW[sent:n])
            PARKED.used += n - sent
            return False
        if n < CHUNK:
            return not flow.short_drains or flow.exhaust
        if flow.may_bulk and flow.carried >= BULK_AFTER:
            flow.bulk = True
        return True

    def _peek_turn(self, flow: Flow) -> bool:
        """A round that takes from src only what dst took: a bulk flow's, or
        any flow's while PARKED is full."""
        size = BULK if flow.bulk else CHUNK
        src = flow.src
        flow.blocked = False
        try:
            if flow.rights:
                n, ancdata, _flags, _ = src.recvmsg_into([_VIEW[:size]], RIGHTS_SPACE, _PEEK)
                close_received(received_fds(ancdata))
            else:
                n = src.recv_into(_BUFFER, size, _PEEK)
        except BlockingIOError:
            return False
        if n == 0:
            flow.done = True
            return False
        try:
            sent = flow.dst.send(_VIEW[:n])
        except BlockingIOError:
            sent = 0
        if sent:
            # Drop from src what dst took.  A Unix socket has no discard: it
            # copies again, and only here, with PARKED full.  The read cannot
            # come back short: nothing else reads src.
            if flow.short_drains:
                src.recv_into(_BUFFER, sent, _DISCARD)
            elif flow.rights:
                _n, ancdata, _flags, _ = src.recvmsg_into([_VIEW[:sent]], RIGHTS_SPACE)
                close_received(received_fds(ancdata))
            else:
                src.recv_into(_BUFFER, sent)
            self._sent(flow, sent)
            flow.carried += sent
        if sent < n:
            # dst is full; the rest waits in src's receive queue for dst's
            # EPOLLOUT (a new EPOLLIN from src would find dst still full).
            flow.blocked = True
            return False
        if n < size:
            return not flow.short_drains or flow.exhaust
        if flow.may_bulk and flow.carried >= BULK_AFTER:
            flow.bulk = True
        return True

    def _sent(self, flow: Flow, n: int) -> None:
        if flow.skip:
            header = min(n, flow.skip)
            flow.skip -= header
            n -= header
        if n:
            self._count(n, flow.inbound)

    def _count(self, n: int, inbound: bool) -> None:
        if inbound:
            self.bytes_in += n
            if self.first_byte_at is None and self.ready:
                self.first_byte_at = self.clock()
        else:
            self.bytes_out += n

    @staticmethod
    def close(flow: Flow) -> None:
        """Give back what a closing flow kept aside (its sockets are the
        connection's)."""
        PARKED.used -= len(flow.pending)
        flow.pending = b""
