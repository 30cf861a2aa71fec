"""The proxies' budgets: how many fds this process's proxies hold, against
RLIMIT_NOFILE, and how many bytes the byte shovel keeps aside for
destinations that did not take them yet, against PARKED_LIMIT.

Both are one per process, not one per proxy, because what they bound is:
the fd limit is the process's, and so is the memory that many clients that
stop reading could make lazyd hold.  So each is one named object, `FDS` and
`PARKED`, that every proxy (stream and datagram) and the shovel import from
here; nothing else counts fds or kept-aside bytes.  `presize_fd_table`
makes room in the fd table for the fd budget once, at start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import resource
import time

# How often, at most, the fds in use are counted near the limit.
FD_RECOUNT = 0.05
# The fd table lazyd makes room for at start-up (see presize_fd_table): up
# to this many fds, ~8.4 bytes of kernel memory each (512 KiB).
FD_TABLE = 65536
# Bytes all stream proxies together keep aside for destinations that did not
# take them yet: a full 64 KiB chunk for each of 256 directions.  Past it, the
# bytes wait in the kernel's receive buffers (and TCP's window holds the
# senders back), so clients that stop reading cannot make lazyd grow.
PARKED_LIMIT = 16 * 1024 * 1024


class FdBudget:
    """The fds all of this process's proxies hold (connections, datagram
    flows), against RLIMIT_NOFILE.

    Proxied connections may not take the last fds: lazyd needs some to
    receive a spawned service's output pipe, to answer the control socket, to
    take a notify message.  The fds the proxies hold are counted as they open
    and close; the rest of the process's are counted in /proc/self/fd, again
    only near the limit (or once a second), since listing ten thousand fds
    costs milliseconds.
    """

    def __init__(self) -> None:
        self.proxied = 0
        self._other = 0
        self._limit = 0
        self._checked = -math.inf

    @property
    def limit(self) -> int:
        return self._limit

    def opened(self, n: int = 1) -> None:
        self.proxied += n

    def closed(self, n: int = 1) -> None:
        self.proxied -= n

    def reserve(self) -> int:
        """Fds never taken for a new client: a sixteenth of the limit, 16 to 256."""
        return min(max(self._limit // 16, 16), 256)

    def allows(self, reserve: int) -> bool:
        """Whether more than `reserve` fds (reserve() for a new client, half
        of it for an upstream connect) are left free."""
        free = self._limit - self.proxied - self._other
        if free > 2 * reserve and free > self._limit // 2:
            return True  # far from the limit: no clock, no count
        now = time.monotonic()
        since = now - self._checked
        if (free <= 2 * reserve and since >= FD_RECOUNT) or (free <= self._limit // 2
                                                             and since >= 1.0):
            self._recount(now)
        return self._limit - self.proxied - self._other > reserve

    def _recount(self, now: float) -> None:
        self._checked = now
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
        self._other = max(_fds_in_use(self._limit) - self.proxied, 0)


def _fds_in_use(limit: int) -> int:
    """How many fds this process has open."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except PermissionError:
        pass  # not dumpable since it dropped privileges: /proc/self/fd is root's
    except OSError:
        return limit  # EMFILE: not even one fd to spare
    # Ask each fd the table has room for (FDSize in /proc/self/status, which
    # stays readable); a few thousand fcntl calls, and only near the limit.
    size = limit
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("FDSize:"):
                size = min(int(line.split()[1]), limit)
    used = 0
    for fd in range(size):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        used += 1
    return used


def presize_fd_table(limit: int, size: int = FD_TABLE) -> int:
    """Grow this process's fd table now to min(limit, size) slots; return
    how many it was grown to (0: not at all).

    The kernel doubles a process's fd table as fds are opened (64, 128, ...)
    and never shrinks it.  In a process with threads each doubling waits
    for an RCU grace period (expand_fdtable's synchronize_rcu), 10-15 ms
    here, in accept(2): a flood of new connections at a cold start met
    eight of those and the accept queue overflowed behind them (every SYN
    dropped there costs its client a second).  One dup2 onto the highest
    fd grows the table once, now, while nothing waits.
    """
    top = min(limit, size)
    if top <= 1024:
        return 0  # what the kernel starts a process with, near enough
    try:
        fcntl.fcntl(top - 1, fcntl.F_GETFD)
        return 0  # in use (inherited): the table holds it already
    except OSError:
        pass
    spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(spare, top - 1, inheritable=False)
        os.close(top - 1)
    except OSError:
        return 0  # an fd table that cannot grow now will not grow later either
    finally:
        os.close(spare)
    return top


class ParkedBytes:
    """Bytes read from one end of a forwarded connection that the other end
    has not taken yet, kept aside in the process (see lazyd.datapath.shovel:
    at most one 64 KiB chunk per direction; a flow that would need more room
    than is left leaves its bytes in the kernel instead)."""

    def __init__(self, limit: int = PARKED_LIMIT) -> None:
        self.limit = limit
        self.used = 0


# The process's one fd budget: every stream connection, upstream connect
# and datagram flow is counted here as it opens and closes.
FDS = FdBudget()
# The process's kept-aside bytes, for every stream proxy together.
PARKED = ParkedBytes()
