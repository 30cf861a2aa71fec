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
meanwhile (a reload) is never read under its number reused, and it records
what it found itself, so that trio's loop is not woken for it either.  The
thread is started before it is needed (`prepare`, when a pass-mode runner
begins) and waits for the next start when done.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
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


class _Samplers:
    """Threads that sample, one watch each at a time; started ahead of need.

    Starting a thread costs ~0.2 ms of the daemon's CPU, and a start is just
    when it can spare none: `prepare` starts one while nothing is starting,
    and it waits, blocked, for the watches to come. More are started only
    when several services start at once, and each ends once it is done if
    another is already waiting.
    """

    def __init__(self) -> None:
        self._jobs: deque[Callable[[], None]] = deque()
        self._lock = threading.Condition()
        self._threads = 0
        self._idle = 0

    def prepare(self) -> None:
        """Have at least one sampler thread waiting."""
        with self._lock:
            if self._threads == 0:
                self._start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._idle < len(self._jobs):
                self._start()
            self._lock.notify()

    def _start(self) -> None:
        self._threads += 1
        threading.Thread(target=self._run, name="lazyd-first-accept", daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._idle and not self._jobs:
                        return  # one waiting thread is enough: no idle pile-up
                    self._idle += 1
                    self._lock.wait_for(lambda: bool(self._jobs))
                    self._idle -= 1
                    job = self._jobs.popleft()
                job()  # an exception (a bug) ends this thread with its traceback
        finally:
            with self._lock:
                self._threads -= 1


_SAMPLERS = _Samplers()


def prepare() -> None:
    """Start a sampler thread now, while nothing waits for the CPU (idempotent)."""
    _SAMPLERS.prepare()


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

    _SAMPLERS.submit(sample)
    try:
        with trio.move_on_after(window):
            while await running():
                pass
    finally:
        # However this ends (the service stopped, the runner is cancelled),
        # the thread returns at once.
        stop.set()
