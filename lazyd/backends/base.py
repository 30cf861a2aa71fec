"""What the runner needs of a backend: start a service, and then, through the
`Started` handle it gets back, wait for its end, signal it, read its output
and close it.  A new backend (a container engine, a cluster) is a new module
implementing these two protocols, not an `if` in the runner.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Protocol

import trio

from lazyd.readiness.notify import NotifySocket


class Started(Protocol):
    """One start of a service, from its start until `aclose()`."""

    @property
    def handle(self) -> int | str:
        """What names this start (the lifecycle's `Spawned`, status): a pid, a
        container id."""

    @property
    def pid(self) -> int | None:
        """The service's main process as this machine sees it (notify messages are
        believed from it and its descendants), if it has one here."""

    @property
    def output(self) -> trio.abc.ReceiveStream | None:
        """Its stdout and stderr, for the log; None if the backend relays nothing."""

    async def wait(self) -> int:
        """Wait for the service's end: its exit status (negative: killed by a signal)."""

    def signal(self, sig: int, *, group: bool) -> None:
        """Send a signal: to the main process, or (`group`) to all it started."""

    async def aclose(self) -> None:
        """Make sure nothing of this start is left (SIGKILL, reap); idempotent."""


class Backend(Protocol):
    async def start(
        self, sockets: Sequence[socket.socket], notify: NotifySocket | None
    ) -> Started:
        """Start the service, handing it `sockets` and `notify` where its mode
        says so; return once it has started.  Raises LaunchError saying why not."""
