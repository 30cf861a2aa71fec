"""When a pass-mode service first accepted: its listeners' accept queues, sampled.

The kernel sends no event when a connection leaves an accept queue, so
`sample_first_accept` looks at the queues (TCP_INFO, one system call each)
at growing intervals: at once, 1 ms later, then each interval 25 % longer
than the one before (~35 samples in 2 s).  The time recorded is the middle
between the last sample that saw every held connection still queued and the
first that saw one gone.  The interval that holds an accept at T seconds
after the first sample is at most T/4 + 1 ms long, so the time recorded is
within an eighth of T plus half a millisecond, either way.

The samples are taken in a low-priority watch thread (`lazyd.watchers`,
which says why): they come while the service starts, often on the CPU it
runs on, and a wake-up of trio's loop costs ~0.15 ms of Python where a
thread's costs ~20 us.  On a CPU the service keeps busy, a sample waits
until the service lets the CPU go (it blocks in accept(), say): the time is
then as close as the samples could come, and the bounds above hold for
samples taken on time.  The thread reads copies of the listeners, so that
an fd the daemon closes meanwhile (a reload) is never read under its number
reused, and it records what it found itself, so that trio's loop is not
woken for it either.  A thread is started before it is needed (`prepare`,
when a pass-mode runner begins) and waits for the next start when done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from socket import socket

import trio

from lazyd import watchers
from lazyd.runtime.binding import accept_queue_length

FIRST_STEP = 0.001  # seconds between the first two samples
GROWTH = 1.25  # each interval is this much longer than the one before


def sample_first_accept(
    listeners: Sequence[socket], held: int, window: float, stop: threading.Event
) -> float | None:
    """Sample until fewer than `held` connections are queued; the time (of
    `time.perf_counter`) it happened, as the module's docstring says.

    None when no listener has an accept queue to read, after `window`
    seconds, or once `stop` is set. Blocks: meant for a thread.
    """
    step = FIRST_STEP
    before = time.perf_counter()
    end = before + window
    while True:
        counts = [accept_queue_length(sock) for sock in listeners]
        now = time.perf_counter()
        known = [count for count in counts if count is not None]
        if not known:
            return None
        if sum(known) < held:
            return (before + now) / 2
        if now >= end or stop.wait(step):
            return None
        before = now
        step *= GROWTH


def prepare() -> None:
    """Start a watch thread now, while nothing waits for the CPU (idempotent)."""
    watchers.prepare()


async def watch_first_accept(
    listeners: Sequence[socket], held: int, window: float,
    running: Callable[[], Awaitable[bool]], found: Callable[[float], None],
) -> None:
    """Have a sampler thread run `sample_first_accept` on copies of
    `listeners`, and stop it once `running()` (awaited in turn: it returns
    once something changed) says the service no longer runs, or after
    `window` seconds.

    The thread itself calls `found` with the time (in trio's clock), and
    closes the copies: telling trio's loop would wake it just as the service
    has accepted and is about to answer, on the CPU it may share. So `found`
    must be safe to call from another thread (setting one attribute is).
    """
    copies = [sock.dup() for sock in listeners]
    stop = threading.Event()
    # trio's clock is perf_counter plus an offset: the thread's times in it.
    offset = trio.current_time() - time.perf_counter()

    def sample() -> None:
        try:
            first = sample_first_accept(copies, held, window, stop)
        finally:
            for copy in copies:
                copy.close()
        if first is not None:
            found(first + offset)

    watchers.submit(sample)
    try:
        with trio.move_on_after(window):
            while await running():
                pass
    finally:
        # However this ends (the service stopped, the runner is cancelled),
        # the thread returns at once.
        stop.set()
