"""File descriptors that others send lazyd (SCM_RIGHTS): none of them may stall it.

Closing the last reference to some files blocks.  A TCP socket with SO_LINGER
set and data its peer has not acknowledged waits for up to its linger time; a
FUSE file waits for its daemon to answer FLUSH; a Unix socket takes the fds
still queued in it down with it, and those may block in turn.  And the kernel
closes fds for a receiver by itself: a recv() with no room for ancillary data
(recv_into, splice, trio's receive_some) drops every fd that came with the
data, a recvmsg() with too little room (or no free fd number) drops those that
do not fit.  Either way the last reference goes inside the receiver's own
system call, on the thread that made it: one datagram with an 8 s linger would
stop lazyd's event loop for 8 s, as often as anyone cares to send one.

So, for every Unix socket lazyd reads from:

- where the kernel has SO_PASSRIGHTS (Linux 6.16), a socket that needs no fds
  refuses them (`refuse_rights`): the sender's sendmsg fails with EPERM and
  nothing reaches lazyd.  Accepted sockets inherit it from their listener,
  and it holds for data sent before the accept.
- where it does not, and on the notify socket (which must take the fd that
  comes with BARRIER=1), the reader receives with room for SCM_MAX_FD fds
  (`RIGHTS_SPACE`) and hands what arrived to `close_received`, which closes
  it in a closer thread, never on the event loop.

Why threads, and not SO_LINGER {on, 0} before a close on the loop: zero
linger helps a TCP socket only.  A FUSE file, or a Unix socket with a lingering
socket queued inside it, still blocks; and the option would change a socket
that its sender may still be using.  A closer thread blocked for ever costs a
thread, not an fd (the fd number is free as soon as close() is called); with
all CLOSERS blocked, fds wait in the queue, and a reader that must not let
them pile up waits for `wait_for_room` before it takes more.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
from collections import deque

# The option's number in asm-generic/socket.h (Linux 6.16); Python has no name
# for it yet.  An older kernel says ENOPROTOOPT.
SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)
# The kernel's limit of fds per message (include/net/scm.h): room for this many
# means none is ever dropped for want of room.
SCM_MAX_FD = 253
_FD_SIZE = array.array("i").itemsize
RIGHTS_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE)
# Threads closing received fds at most; started as needed.
CLOSERS = 8
# Received fds waiting for a closer past which `wait_for_room` waits.
MAX_PENDING = 1024


def refuse_rights(sock: socket.socket) -> bool:
    """Make a Unix socket refuse fds, where the kernel can; whether it did."""
    if sock.family != socket.AF_UNIX:
        return True  # nothing but a Unix socket carries fds
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        return False  # ENOPROTOOPT: a kernel older than 6.16
    return True


_refusable: bool | None = None


def kernel_refuses_rights() -> bool:
    """Whether this kernel has SO_PASSRIGHTS (asked once)."""
    global _refusable
    if _refusable is None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            _refusable = refuse_rights(a)
    return _refusable


def allow_rights(sock: socket.socket) -> None:
    """Undo `refuse_rights` (a socket given back for a service to inherit)."""
    if sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 1)


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds in recvmsg()'s ancillary data (whole ones only)."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
            fds.extend(numbers)
    return fds


class _Closer:
    """Threads that close received fds, whatever their close costs."""

    def __init__(self) -> None:
        self._queue: deque[int] = deque()
        self._lock = threading.Condition()
        self._threads = 0
        self._idle = 0

    @property
    def pending(self) -> int:
        """Fds handed over and not closed yet."""
        return len(self._queue) + (self._threads - self._idle)

    def close(self, fds: list[int]) -> None:
        if not fds:
            return
        with self._lock:
            self._queue.extend(fds)
            if self._idle == 0 and self._threads < CLOSERS:
                self._threads += 1
                threading.Thread(target=self._run, name="lazyd-close", daemon=True).start()
            self._lock.notify_all()

    def wait_for_room(self) -> None:
        """Block until fewer than MAX_PENDING fds wait (call it from a thread)."""
        with self._lock:
            self._lock.wait_for(lambda: len(self._queue) < MAX_PENDING)

    def wait_closed(self, timeout: float) -> bool:
        """Block until every fd handed over is closed; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self.pending == 0, timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
                self._lock.notify_all()  # for wait_closed(): one fewer at work
                self._lock.wait_for(lambda: bool(self._queue))
                self._idle -= 1
                fd = self._queue.popleft()
                self._lock.notify_all()
            with contextlib.suppress(OSError):  # nothing more to do with it
                os.close(fd)


_CLOSER = _Closer()


def close_received(fds: list[int]) -> None:
    """Close fds that someone sent, off the event loop; returns at once."""
    _CLOSER.close(fds)


def pending_closes() -> int:
    """Received fds not closed yet."""
    return _CLOSER.pending


def wait_closed(timeout: float) -> bool:
    """Block (in a thread) until every received fd is closed; False on timeout."""
    return _CLOSER.wait_closed(timeout)


def wait_for_room() -> None:
    """Block (in a worker thread) until received fds no longer pile up."""
    _CLOSER.wait_for_room()
