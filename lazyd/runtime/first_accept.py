"""When a pass-mode service first accepted: its listeners' accept queues, sampled.

The kernel sends no event when a connection leaves an accept queue, so
`sample_first_accept` looks at the queues (TCP_INFO, one system call each)
at growing intervals: at once, 1 ms later, then each interval 25 % longer
than the one before (~35 samples in 2 s).  The time recorded is the middle
between the last sample that saw every held connection still queued and the
first that saw one gone.  The interval that holds an accept at T seconds
after the first sample is at most T/4 + 1 ms long, so the time recorded is
within an eighth of T plus half a millisecond, either way.

The samples are taken in a thread of their own (`watch_first_accept`): they
come while the service starts, often on the CPU it runs on, and a wake-up of
trio's loop costs ~0.15 ms of Python where a thread's costs ~20 us.  The
thread reads copies of the listeners, so that an fd the daemon closes
meanwhile (a reload) is never read under its number reused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from socket import socket

import trio

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


async def watch_first_accept(
    listeners: Sequence[socket], held: int, window: float,
    running: Callable[[], Awaitable[bool]],
) -> float | None:
    """`sample_first_accept` on copies of `listeners`, in a thread, while
    `running()` (awaited in turn: it returns once something changed) says
    the service still runs; the time in trio's clock, or None.
    """
    copies = [sock.dup() for sock in listeners]
    stop = threading.Event()
    # trio's clock is perf_counter plus an offset: the thread's times in it.
    offset = trio.current_time() - time.perf_counter()
    found: list[float | None] = [None]
    try:
        async with trio.open_nursery() as nursery:

            async def sample() -> None:
                found[0] = await trio.to_thread.run_sync(
                    partial(sample_first_accept, copies, held, window, stop))
                nursery.cancel_scope.cancel()

            nursery.start_soon(sample)
            try:
                while await running():
                    pass
            finally:
                # However this ends (the service stopped, the runner is
                # cancelled), the thread returns at once.
                stop.set()
    finally:
        for copy in copies:
            copy.close()
    return None if found[0] is None else found[0] + offset
