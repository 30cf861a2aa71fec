"""One connection a stream proxy accepted, from held to closed: its state
and what it holds.  Kept small on purpose: a flood of held clients is a
flood of these, so a held one is an fd, its peer and a few numbers (the
socket object and both flows are made at release).
"""

from __future__ import annotations

import enum
import os
import socket
from typing import Any

from lazyd.datapath.shovel import Flow

# A connect not answered in this time is tried again (then after twice as
# long, up to 2 s): a SYN dropped at a full accept queue is sent again by
# the kernel only after a second, and a local service answers at once.
FIRST_SYN_WAIT = 0.1


class State(enum.Enum):
    """A connection's states, in the order it goes through them.  Compared
    with `is`: a state is a shared singleton, so a held connection costs no
    more for it than the small integer it used to be."""

    HELD = 0  # accepted, waiting for release (and a free slot)
    CONNECTING = 1  # released, its connect to the upstream not yet answered
    OPEN = 2  # forwarding both ways
    CLOSED = 3


HELD, CONNECTING, OPEN, CLOSED = State.HELD, State.CONNECTING, State.OPEN, State.CLOSED


class Connection:
    """One accepted client, from held to closed."""

    __slots__ = ("_client", "attempt", "backoff", "client_fd", "exhaust", "family", "inbound",
                 "last_in", "last_io", "outbound", "peer", "started", "state", "syn_wait",
                 "upstream", "upstream_fd", "watch")

    def __init__(self, family: int, client_fd: int, peer: Any,
                 client: socket.socket | None = None) -> None:
        # A held client is only an fd: the socket object is made when it is
        # needed (at release, mostly), which a flood of them never waits for.
        self.family = family
        self.client_fd = client_fd
        self._client = client
        self.peer = peer
        self.state = HELD
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.inbound: Flow | None = None  # client -> upstream
        self.outbound: Flow | None = None  # upstream -> client
        self.attempt = 0  # connect attempts, to tell a stale timer from a live one
        self.started = 0.0  # when the first connect began
        self.syn_wait = FIRST_SYN_WAIT
        self.backoff = 0.001  # between connects a full Unix backlog refused
        self.last_in = 0.0  # half-closed by the service: when the client last sent
        self.last_io = 0.0  # with an idle timeout: when either end last had something
        self.watch = 0  # the epoll events the client's fd is registered for
        # The client hung up (EPOLLRDHUP) or sent urgent data before the
        # flows were made: the inbound flow starts out knowing it (see
        # Flow.exhaust).
        self.exhaust = False

    @property
    def client(self) -> socket.socket:
        if self._client is None:
            self._client = socket.socket(self.family, socket.SOCK_STREAM, 0, self.client_fd)
        return self._client

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
        else:
            os.close(self.client_fd)


def show_peer(peer: Any) -> str:
    """A client's address for a log line: host:port, [v6]:port or a Unix path."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, bytes):
        peer = peer.decode(errors="replace")
    return str(peer) or "a Unix client"
