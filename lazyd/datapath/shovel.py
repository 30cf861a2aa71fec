"""The userspace byte shovel: one direction of a forwarded connection at a
time (`Flow`), moved by the proxy's `Shovel` through one shared buffer, or
through a pipe with splice(2) once the flow has carried enough to be bulk,
counting the bytes each way.  The stream proxy decides when a flow moves
(on its fds' events) and what an EOF or an error means for the connection.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable

from lazyd.datapath.budget import FDS, PIPES
from lazyd.net.rights import RIGHTS_SPACE, close_received, received_fds

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
# to splice through a 256 KiB pipe once it has carried SPLICE_AFTER bytes
# and a read has filled the whole buffer (more was waiting than one read
# takes): small exchanges use no pipe at all, bulk transfers spend a third
# less CPU.  Bytes carried alone are no sign of bulk: a keep-alive connection
# carrying thousands of small requests passes any threshold, and splice
# costs a small request more than recv/send do (two pipe operations more in
# the kernel, ~15% more CPU per request, measured with nginx under wrk).
# Not 1 MiB pipes: an unprivileged user may hold only 16384 pipe pages in
# all (fs.pipe-user-pages-soft), and past that Linux hands out 2-page pipes,
# so 1 MiB pipes would run out after 64 of them.
CHUNK = 64 * 1024
# Rounds one flow may run before the others get a turn.
FLOW_TURNS = 16
SPLICE_AFTER = 2 * CHUNK
PIPE_SIZE = 256 * 1024
# The first few bulk flows at a time get 1 MiB pipes (fs.pipe-max-size's
# default): a quarter of the splice calls per gigabyte, measured ~25% less
# CPU for a lone transfer, and 8 of them stay far below the user's quota.
BIG_PIPE_SIZE = 1024 * 1024
BIG_PIPES = 8
_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

Clock = Callable[[], float]


def _close_pipe(r: int, w: int) -> None:
    if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) > PIPE_SIZE:
        PIPES.big -= 1
    os.close(r)
    os.close(w)


def _open_pipe() -> tuple[int, int] | None:
    """A non-blocking pipe for splice, or None when a plain buffer is the better choice."""
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # out of fds: the buffer still works
    # Above fs.pipe-max-size or the user's pipe quota the default size is fine.
    for size in (BIG_PIPE_SIZE, PIPE_SIZE) if PIPES.big < BIG_PIPES else (PIPE_SIZE,):
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            continue
        break
    size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    if size > PIPE_SIZE:
        PIPES.big += 1
    if size < CHUNK:
        # Over the user's pipe quota Linux gives 2-page pipes, which move less
        # per call than the buffer does.
        os.close(r)
        os.close(w)
        return None
    return r, w


def shutdown_write(sock: socket.socket) -> None:
    """Pass a half-close on: EOF from one end becomes shutdown(SHUT_WR) to the other."""
    # A peer that is already gone: the other direction will find out.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


class Flow:
    """One direction of a forwarded connection: src -> dst."""

    __slots__ = ("carried", "done", "dst", "exhaust", "inbound", "may_splice", "pending",
                 "pipe", "queued", "rights", "short_drains", "skip", "src")

    def __init__(self, src: socket.socket, dst: socket.socket, inbound: bool,
                 rights: bool = False, short_drains: bool = False) -> None:
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
        # read with room for them, never splice (see lazyd/net/rights.py).
        self.rights = rights
        self.may_splice = _SPLICE and not rights
        # src is TCP (the caller knows; socket.family costs an enum lookup):
        # a TCP read that returns less than asked for has emptied the receive
        # queue (tcp_recvmsg stops only at an empty queue once it has
        # something), and whatever arrives next is a new edge-triggered
        # event, so the flow may stop there instead of reading once more for
        # the EAGAIN, a syscall and an exception per message.  Not for Unix
        # sockets: their reads also stop where the sender's credentials or
        # attached fds change, with more data queued behind.
        self.short_drains = short_drains
        # Read src until EAGAIN or EOF, not only to a short read: its peer
        # has shut down (EPOLLRDHUP, or an error), and the event for the EOF
        # may have come with the data; or it sent urgent data (EPOLLPRI), at
        # whose mark a read stops short with more queued behind it.
        self.exhaust = False


def stuck(flow: Flow) -> bool:
    """Whether a flow holds data its destination has not taken yet."""
    return bool(flow.pending) or flow.queued > 0


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
        # One buffer for every connection: data goes from recv_into straight
        # to send, and only what the far end would not take is kept aside.
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)

    def turn(self, flow: Flow) -> bool:
        """One round of a flow: False once it would block (or src is known
        to be empty, or dst full), or is done (EOF: `flow.done`).  A reset or
        a broken pipe raises OSError."""
        if flow.pending:
            try:
                sent = flow.dst.send(flow.pending)
            except BlockingIOError:
                return False
            self._sent(flow, sent)
            flow.pending = flow.pending[sent:]
            return not flow.pending  # what is left waits for dst's EPOLLOUT
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
        flow.carried += n
        if sent < n:
            # dst is full: its EPOLLOUT (the kernel marks a socket that
            # refused bytes) takes the flow up again.
            flow.pending = bytes(self._view[sent:n])
            return False
        if n < CHUNK:
            return not flow.short_drains or flow.exhaust
        if flow.may_splice and flow.carried >= SPLICE_AFTER:
            # Bulk: from now on through a pipe, if one is to be had and the
            # fds allow (a pipe costs two).
            flow.may_splice = False
            if FDS.allows(FDS.reserve() + 2):
                flow.pipe = _open_pipe()
                if flow.pipe is not None:
                    FDS.opened(2)
        return True

    def _splice_turn(self, flow: Flow, r: int, w: int) -> bool:
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
        # Left in the pipe: dst is full, and its EPOLLOUT takes the flow up
        # again (asking at once would only fetch the EAGAIN).
        return flow.queued == 0

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
        """Close a flow's pipe, if it has one (its sockets are the connection's)."""
        if flow.pipe is not None:
            _close_pipe(*flow.pipe)
            FDS.closed(2)
            flow.pipe = None
