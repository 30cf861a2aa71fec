"""Readiness `connect`: probe the service's upstream address until a
connection succeeds.  The successful probe's connection can be kept and
handed to the stream proxy (`StreamProxy.adopt`), so that a service that
serves one client at a time serves a real client first, not the probe.
"""

from __future__ import annotations

import errno
import socket

import trio

from lazyd.net.addresses import Address
from lazyd.net.connect import begin_connect, close_socket


async def wait_connectable(
    upstream: Address, *, interval: float = 0.0005, max_interval: float = 0.05,
    keep: bool = False, tight_for: float = 1.0, tight_interval: float = 0.001,
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
    # connect is a few syscalls and a wake-up (~70 us of CPU), and ~1,000 of
    # them a second cost the starting service less than the lateness would
    # (trio's sleeps end on whole milliseconds, epoll's unit: 1 ms is the
    # finest step there is; 2 ms made readiness ~0.5 ms later on median).
    # After that, slower starts back off to `max_interval`.
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
        sock, code = begin_connect(upstream)
    except OSError:
        return False, None
    kept: socket.socket | None = None
    try:
        if code == errno.EINPROGRESS:
            # On loopback the kernel has answered by the time connect(2)
            # returns: a refusal is known now, without the trip through
            # trio's epoll that is most of a failed probe's cost (and a
            # starting service shares the CPU with every probe).
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                return False, None
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
