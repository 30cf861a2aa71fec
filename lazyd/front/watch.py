"""Pass mode's front: wait, while the service is idle, until one of its
sockets is readable.  Nothing is accepted or read: the kernel keeps every
connection (accept backlog) and datagram (receive buffer) for the service,
which gets the sockets themselves.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

import trio


class PassWatch:
    """Armed (the service is idle), it calls `on_traffic(socket_name)` once one
    of `sockets` is readable; disarmed, it waits for nothing.

    One long-lived task (`run`) does all the waiting, so no two tasks ever wait
    on the same fd (trio forbids it) however quickly arm and disarm follow each
    other.  Most services have one socket: that one is waited for without a
    nursery and a task (per idle service, they would be a fair part of an idle
    daemon's memory).
    """

    def __init__(self, name: str, sockets: Sequence[tuple[str, socket.socket]]) -> None:
        self.name = name
        self.sockets = list(sockets)  # (name, socket), in config order
        self.closing = False  # removed or shutting down: traffic stays queued
        self._armed = trio.Event()
        self._scope: trio.CancelScope | None = None

    def arm(self) -> None:
        self._armed.set()

    def disarm(self) -> None:
        self._armed = trio.Event()
        if self._scope is not None:
            self._scope.cancel()

    def retarget(self, sockets: Sequence[tuple[str, socket.socket]]) -> None:
        """Watch these from now on (a reload changed them); the caller closes
        the old ones, which wakes a wait still on them."""
        self.sockets = list(sockets)
        if self._scope is not None:
            self._scope.cancel()  # start the wait over on the new set

    async def run(self, on_traffic: Callable[[str], None]) -> None:
        while True:
            await self._armed.wait()
            if self.closing:
                # The sockets may be closed any moment now.
                self._armed = trio.Event()
                continue
            closed = [name for name, sock in self.sockets if sock.fileno() == -1]
            if closed:
                # Whoever closes a socket must first take it from the watch
                # (retarget) or end it: waiting on it would fail, and not
                # waiting would spin.
                raise RuntimeError(f"{self.name}: asked to watch closed sockets {closed}")
            readable: list[str] = []
            with trio.CancelScope() as scope:
                self._scope = scope
                if len(self.sockets) == 1:
                    await _wait_readable(*self.sockets[0], readable)
                else:
                    async with trio.open_nursery() as nursery:
                        for name, sock in self.sockets:
                            nursery.start_soon(
                                _wait_readable, name, sock, readable, nursery.cancel_scope
                            )
            self._scope = None
            if self.closing:
                self._armed = trio.Event()
            elif readable and self._armed.is_set():
                on_traffic(readable[0])


async def _wait_readable(
    name: str, sock: socket.socket, readable: list[str], done: trio.CancelScope | None = None
) -> None:
    try:
        await trio.lowlevel.wait_readable(sock)
    except trio.ClosedResourceError:
        return  # a reload closed it; the watch starts over with the new set
    readable.append(name)
    if done is not None:
        done.cancel()
