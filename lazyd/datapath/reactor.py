"""A private epoll reactor with its own timer heap, for one stream proxy.

Every connection's events come from one edge-triggered epoll set and are
handled in one trio task: a task per connection costs more than the
forwarding itself once thousands arrive at once.  trio sees only the epoll
fd (`trio.lowlevel.wait_readable`); the reactor takes the events, calls
back, and sleeps until the next event or the earliest of its timers.

Callbacks are given once per reactor, not once per fd: each fd carries a
key (the proxy's connection) and the reactor calls `on_event(key, fd,
events)`.  A callback object per fd would cost a bound method or a tuple for
every held connection, which is meant to cost one fd and nothing else.
"""

from __future__ import annotations

import heapq
import math
import select
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

# Events taken from the epoll set at once.
POLL_EVENTS = 256

K = TypeVar("K")  # what an fd stands for (a connection)
W = TypeVar("W")  # work to go on with without a new event (a flow)


class Reactor(Generic[K, W]):
    """One epoll set, its fds' keys, a timer heap and a list of work to go
    on with unasked.  run() is the loop; close() closes the epoll set.

    Each round of run(): wait (only a checkpoint if work is left over),
    `before_events()`, take up to POLL_EVENTS events and call `on_event(key,
    fd, events)` for each fd still registered, then `after_events()`, then
    `on_again(key, work)`
    for what was put in `again`, then `on_timer(key, tag, now)` for each
    timer due (`key` None for a timer that stands for no fd's key).
    `stale(key)` tells a timer whose key is gone, to drop it early.
    """

    def __init__(
        self,
        *,
        before_events: Callable[[], None],
        on_event: Callable[[K, int, int], None],
        after_events: Callable[[], None],
        on_again: Callable[[K, W], None],
        on_timer: Callable[[K | None, int, float], None],
        stale: Callable[[K], bool],
    ) -> None:
        self._before_events = before_events
        self._on_event = on_event
        self._after_events = after_events
        self._on_again = on_again
        self._on_timer = on_timer
        self._stale = stale
        self._epoll = select.epoll()
        self._keys: dict[int, K] = {}
        self._timers: list[tuple[float, int, K | None, int]] = []
        self._timer_seq = 0
        self._timers_compact_at = 64
        self._wait_scope: trio.CancelScope | None = None
        # Work to go on with without waiting for an event: an edge-triggered
        # fd that still has data says so only once.
        self.again: list[tuple[K, W]] = []

    # -- fds -------------------------------------------------------------------

    def register(self, fd: int, events: int, key: K) -> None:
        """Watch `fd` for `events` (epoll's flags), calling back with `key`.
        Raises OSError, with nothing registered, if epoll refuses."""
        self._epoll.register(fd, events)
        self._keys[fd] = key

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """Forget `fd` (no more callbacks for it); the caller closes it next,
        which takes it out of the epoll set without a syscall of its own."""
        self._keys.pop(fd, None)

    def registered(self) -> list[K]:
        """Every registered fd's key (a key twice if two fds carry it)."""
        return list(self._keys.values())

    # -- timers ----------------------------------------------------------------

    def at(self, deadline: float, key: K | None, tag: int) -> None:
        """Call `on_timer(key, tag, now)` once `deadline` has passed."""
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, key, tag))
        if len(self._timers) > self._timers_compact_at:
            # Closed connections' timers (a half-closed one's lasts a minute)
            # would otherwise keep them in memory until they expire.
            stale = self._stale
            self._timers = [t for t in self._timers if t[2] is None or not stale(t[2])]
            heapq.heapify(self._timers)
            self._timers_compact_at = 2 * len(self._timers) + 64
        if self._wait_scope is not None and deadline < self._wait_scope.deadline:
            self._wait_scope.deadline = deadline

    def _run_timers(self) -> None:
        now = trio.current_time()
        while self._timers and self._timers[0][0] <= now:
            _, _, key, tag = heapq.heappop(self._timers)
            self._on_timer(key, tag, now)

    # -- the loop --------------------------------------------------------------

    async def run(self) -> None:
        """Handle events and timers until cancelled."""
        epoll, keys = self._epoll, self._keys
        on_event, on_again = self._on_event, self._on_again
        while True:
            if self.again:
                await trio.lowlevel.checkpoint()
            else:
                with trio.CancelScope(deadline=self._timers[0][0] if self._timers else math.inf
                                      ) as self._wait_scope:
                    await trio.lowlevel.wait_readable(epoll)
                self._wait_scope = None
            # Between before_events() and after_events() the callbacks must
            # open no fd: a socket made now could take the number of one just
            # closed, and that one's events later in this batch would be
            # taken for the new socket's.
            self._before_events()
            for fd, events in epoll.poll(0, POLL_EVENTS):
                key = keys.get(fd)
                if key is not None:
                    on_event(key, fd, events)
            self._after_events()
            again, self.again = self.again, []
            for key, work in again:
                on_again(key, work)
            self._run_timers()

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._epoll)
        self._epoll.close()
