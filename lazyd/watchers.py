"""Threads that watch a starting service without taking its CPU.

While a service starts, lazyd polls the kernel for two things it sends no
event for: whether a pass-mode service has taken its first connection
(`runtime.first_accept`) and whether a proxied service listens yet
(`readiness.probe`).  Each poll on trio's loop was a wake-up of the loop,
~0.2 ms of Python, on the CPU the service may be starting on: a trace of
one cold start with everything on one CPU had them taking 0.3 ms of a
Python service's pass-mode start and ~2.5 ms of its proxy-mode one.

So the polls run here, in lazyd's own threads under SCHED_IDLE: the kernel
runs them only on a CPU that has nothing else to run.  On a machine with a
free CPU that is at once; on the CPU the service is starting on, a poll
waits until the service sleeps, which for both polls is the moment worth
looking (a service blocks in accept() once it is ready for a connection).
A nice value would not do: the kernel's scheduler still lets a waking
nice-19 thread in ahead of a busy nice-0 one (measured: the same cost at
nice 0, 10 and 19).  The price is paid on a machine whose every CPU is
busy with other work: there the polls wait too (~50 ms, measured against
a busy loop), so the connect probe keeps a slower one of its own on trio's
loop, and a first-accept time may be less close than its promise.

A thread cannot leave SCHED_IDLE without CAP_SYS_NICE, which lazyd has
dropped, so these threads are lazyd's own, not trio's cache (which serves
other work), and stay idle-class for their life.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable


class WatchThreads:
    """A pool of low-priority threads, each running one job at a time.

    Starting a thread costs ~0.2 ms of the daemon's CPU, and a start is just
    when it can spare none: `prepare` starts one while nothing is starting,
    and it waits, blocked, for jobs.  More are started only when several
    jobs run at once, and each ends once it is done if another is already
    waiting, so threads do not pile up after a burst of starts.
    """

    def __init__(self) -> None:
        self._jobs: deque[Callable[[], None]] = deque()
        self._lock = threading.Condition()
        self._threads = 0
        self._idle = 0

    @property
    def threads(self) -> int:
        """How many threads there are now (for tests)."""
        with self._lock:
            return self._threads

    def prepare(self) -> None:
        """Have at least one thread waiting."""
        with self._lock:
            if self._threads == 0:
                self._start()

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job()` in a thread of the pool. It must return by itself
        (give it a threading.Event to stop it) and not raise."""
        with self._lock:
            self._jobs.append(job)
            if self._idle < len(self._jobs):
                self._start()
            self._lock.notify()

    def _start(self) -> None:
        self._threads += 1
        threading.Thread(target=self._run, name="lazyd-watch", daemon=True).start()

    def _run(self) -> None:
        try:
            # Linux keeps the policy per thread: this one alone.  Without it
            # (a sandbox, say) the polls still work, at normal priority.
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
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


WATCHERS = WatchThreads()


def prepare() -> None:
    """Start a watch thread now, while nothing waits for the CPU (idempotent)."""
    WATCHERS.prepare()


def submit(job: Callable[[], None]) -> None:
    """Run `job()` in a low-priority watch thread (see WatchThreads.submit)."""
    WATCHERS.submit(job)
