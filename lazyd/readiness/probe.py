"""Readiness `connect`: probe the service's upstream address until a
connection succeeds.  The successful probe's connection can be kept and
handed to the stream proxy (`StreamProxy.adopt`), so that a service that
serves one client at a time serves a real client first, not the probe.

The probes run in an idle-class watch thread (`lazyd.watchers` says why):
on trio's loop each one was a wake-up of the loop, ~0.2 ms of Python on the
CPU the service is starting on, and a Python service binding after 15 ms
took ~15 of them.  trio's loop is woken once, with the answer.  Where every
CPU is busy with other work the thread waits for one, so trio's loop also
probes itself, `BACKUP_INTERVAL` apart: readiness is never seen later than
that for want of a CPU.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
import time
from collections.abc import Callable

import trio

from lazyd import watchers
from lazyd.net.addresses import Address
from lazyd.net.connect import connector

# The connect probe trio's loop makes itself, in case the thread has no CPU.
BACKUP_INTERVAL = 0.02
# How often a connect still in progress (an upstream that is not on
# loopback) is checked for a stop while the thread waits for it.
_STOP_CHECK = 0.05


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
    connection).  It never gives up: the caller puts a deadline around it,
    and a cancel stops the thread's probing at once.
    """
    connect = connector(upstream)
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    stop = threading.Event()
    lock = threading.Lock()
    result: list[socket.socket | None] = []  # the thread's answer, once it has one

    def job() -> None:
        found: socket.socket | None = None
        failed = True  # until _probe_until returns: a bug must not leave trio waiting
        try:
            found = _probe_until(connect, keep, stop, interval, max_interval,
                                 tight_for, tight_interval)
            failed = False
        finally:
            with lock:
                if stop.is_set() or failed:  # nobody waits for it: ours to drop
                    if found is not None:
                        found.close()
                else:
                    result.append(found)
            with contextlib.suppress(trio.RunFinishedError):  # the daemon is exiting
                token.run_sync_soon(done.set)

    def abandon() -> None:
        """Stop the thread; what it found, or finds from now on, is dropped."""
        with lock:
            stop.set()
            for sock in result:
                if sock is not None:
                    sock.close()

    watchers.submit(job)
    try:
        while True:
            with trio.move_on_after(BACKUP_INTERVAL):
                await done.wait()
            if done.is_set():
                break
            # Without waiting: a connect still in progress is the thread's to follow.
            listening, connection = _probe(connect, keep, stop, wait=False)
            if listening:
                abandon()
                return connection
    except BaseException:
        abandon()
        raise
    if not result:  # the thread failed (its traceback is on stderr)
        raise RuntimeError(f"the connect probe of {upstream} failed")
    return result[0]


def _probe_until(
    connect: Callable[[], tuple[socket.socket, int]], keep: bool, stop: threading.Event,
    interval: float, max_interval: float, tight_for: float, tight_interval: float,
) -> socket.socket | None:
    """Probe until the upstream listens (its kept connection, or None) or
    `stop` is set (None).  Blocks: meant for a watch thread."""
    # Fine-grained at first: a service that binds within a millisecond of
    # its exec should not wait 10 ms for the second probe (every held client
    # waits with it).  For the first `tight_for` seconds, when most services
    # bind (a Python one after 15-40 ms), probes stay at most
    # `tight_interval` apart, so readiness is seen at most that late.  A
    # refused loopback connect costs the thread ~30 us, and on a CPU the
    # service keeps busy the thread waits its turn (see lazyd.watchers).
    # After that, slower starts back off to `max_interval`.
    delay = interval
    tight_until = time.monotonic() + tight_for
    while not stop.is_set():
        listening, connection = _probe(connect, keep, stop)
        if listening:
            return connection
        # A plain sleep while probes are close together: on this kind of
        # machine an Event's timed wait costs ~35 us of CPU, a sleep ~20 us,
        # and a stop is noticed within the millisecond either way.
        if delay <= tight_interval:
            time.sleep(delay)
        elif stop.wait(delay):
            break
        cap = tight_interval if time.monotonic() < tight_until else max_interval
        delay = min(delay * 1.5, cap)
    return None


def _probe(
    connect: Callable[[], tuple[socket.socket, int]], keep: bool, stop: threading.Event,
    wait: bool = True,
) -> tuple[bool, socket.socket | None]:
    """(whether the upstream listens, the connection if kept).  Without
    `wait`, a connect that is not answered at once counts as not listening."""
    try:
        sock, code = connect()
    except OSError:
        return False, None
    kept: socket.socket | None = None
    try:
        if code == errno.EINPROGRESS:
            # On loopback the kernel has answered by the time connect(2)
            # returns: a refusal is known now, without waiting.
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                return False, None
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            while not poller.poll(_STOP_CHECK * 1000 if wait else 0):
                if stop.is_set() or not wait:
                    return False, None
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                return False, None
            code = 0
        # 0, or EAGAIN: a Unix listener whose backlog is full is listening.
        if code == 0 and keep:
            kept = sock
        return True, kept
    finally:
        if kept is None:
            sock.close()
