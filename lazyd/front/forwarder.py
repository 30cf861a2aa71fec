"""What the service runner sees of a proxy, stream or datagram (`Forwarder`),
with the two small pieces both proxies share: `Activity` (open connections
or flows, for idle stop) and `BurstLog` (one log line per burst of failures).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

LogFn = Callable[[str], None]
Clock = Callable[[], float]


class BurstLog:
    """Log the first failure of a burst; say how many there were once it ends.

    A service that refuses a hundred held connections at once should cost one
    log line, not a hundred.
    """

    def __init__(self, log: LogFn, what: str) -> None:
        self._log = log
        self._what = what
        self.failures = 0

    def failed(self, detail: str) -> None:
        self.failures += 1
        if self.failures == 1:
            self._log(f"{self._what} failed: {detail}")

    def succeeded(self) -> None:
        if self.failures > 1:
            self._log(f"{self._what} works again ({self.failures} failures in a row)")
        self.failures = 0


class Activity:
    """How many forwarded connections (or flows) are open, for idle stop.

    `changed` is set, then replaced, whenever `count` changes: read
    `activity.changed` first, then await it.  `last_change` is the clock
    time of the latest change, so "idle for T" is `count == 0 and now -
    last_change >= T`.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.count = 0
        self.last_change = clock()
        # Called when the count goes to or from zero: all the idle stop needs
        # to hear of (a wake-up per connection would cost every connection).
        self.on_idle_change: Callable[[], None] | None = None
        # Made when someone asks for it: a proxy changes its count twice per
        # connection, and the runner looks at most once per wake-up.
        self._changed: trio.Event | None = None

    @property
    def changed(self) -> trio.Event:
        if self._changed is None:
            self._changed = trio.Event()
        return self._changed

    def add(self, delta: int) -> None:
        was = self.count
        self.count += delta
        self.last_change = self._clock()
        if self.on_idle_change is not None and (was == 0) != (self.count == 0):
            self.on_idle_change()
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class Forwarder:
    """What the service runner sees of a proxy, stream or datagram: whether it
    forwards yet, what waits, and the activity that keeps a service from idling."""

    activity: Activity
    _ready: bool
    # The service is `failed`: new traffic is refused at once (a connection
    # is reset, a datagram dropped) rather than held for a start that will
    # not come until the start limit's interval has passed.
    refusing: bool = False
    # Handing over to a new runner (a reload changed how lazyd serves the
    # socket): take nothing more off the socket, the kernel holds it for the
    # new proxy, which takes over once this one's run() has ended.
    paused: bool = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def waiting(self) -> int:
        """Connections or datagrams held for the service."""
        raise NotImplementedError

    @property
    def active(self) -> int:
        """Open forwarded connections, or active datagram flows."""
        return self.activity.count

    @property
    def last_active_change(self) -> float:
        return self.activity.last_change

    @property
    def activity_changed(self) -> trio.Event:
        return self.activity.changed
