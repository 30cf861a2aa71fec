"""Who may connect: `allow` / `deny` per socket, `max_connections_per_source`
per service (proxy mode, where lazyd itself accepts and receives).

The rules, as in nginx but without an order to get wrong:

- `deny` wins: a client whose address is in a `deny` network is refused;
- if `allow` is given, only clients in one of its networks are admitted;
- an IPv4 client that reaches a dual-stack socket shows up as an IPv4-mapped
  IPv6 address (``::ffff:10.1.2.3``); it is matched, and counted, as the IPv4
  address it is, so ``10.0.0.0/8`` covers it whichever socket it came in on.

A refused connection is closed with a reset (SO_LINGER 0) the moment it is
accepted, so the client learns at once instead of waiting on a connection
nobody will serve; a refused datagram is dropped.  Neither starts the service.
Every refusal is counted (`Access.refused`, shown by status and metrics); the
log gets one line per burst, at most one every REPORT_INTERVAL seconds, saying
how many were refused since the last one, so a scan cannot flood it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from lazyd.logs import ThrottledLog
from lazyd.net.addresses import Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LogFn = Callable[[str], None]
Clock = Callable[[], float]

# The log says at most this often that connections were refused (seconds).
REPORT_INTERVAL = 10.0
# Client addresses whose verdict a gate remembers.  Parsing an address and
# matching it costs 3 to 15 us; a repeat client, or a datagram of a flow,
# costs a dict lookup instead.  A scan from more addresses than this just
# starts the memory over: it is bounded, not clever.
VERDICT_CACHE = 4096

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 seconds: close() sends a reset


def client_address(peer: Any) -> IPAddress | None:
    """The IP address in an accept()/recvfrom() peer, IPv4-mapped IPv6 as IPv4;
    None for a Unix peer (or anything else that is not an IP address)."""
    if not (isinstance(peer, tuple) and peer and isinstance(peer[0], str)):
        return None
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def matches(networks: Sequence[Network], address: IPAddress) -> bool:
    """Whether `address` is in one of `networks` (an IPv4 address is never in an IPv6 one)."""
    return any(address in network for network in networks)


def refusal(
    allow: Sequence[Network] | None, deny: Sequence[Network], address: IPAddress
) -> str | None:
    """Why `allow`/`deny` refuse `address` ("denied", "not allowed"), or None if
    they admit it.  `allow=None` admits everyone not denied; `deny` wins."""
    if matches(deny, address):
        return "denied"
    if allow is not None and not matches(allow, address):
        return "not allowed"
    return None


def reset_and_close(sock: socket.socket) -> None:
    """Close an accepted connection with a reset, so its client learns at once."""
    # A client that has reset already: a plain close is all there is to do.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    sock.close()


class Access:
    """One service's admission: the refusals counted, the connections open per
    client address (for `max_connections_per_source`, across all the
    service's sockets), and the log of refusals."""

    def __init__(
        self, name: str, *, max_per_source: int | None, log: LogFn,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_per_source is not None and max_per_source < 1:
            raise ValueError("max_per_source must be at least 1")
        self.name = name
        self.max_per_source = max_per_source
        self.refused = 0  # connections and datagrams refused, since the runner began
        self.open: dict[IPAddress, int] = {}  # held + forwarded connections per address
        self._log = ThrottledLog(log, REPORT_INTERVAL, clock)

    def gate(
        self, socket_name: str, allow: Sequence[Network] | None = None,
        deny: Sequence[Network] = (), *, counted: bool = True,
    ) -> Gate | None:
        """What a socket's proxy asks before admitting anyone; None when there
        is nothing to ask: no rules, and no per-source limit or a socket whose
        connections it does not count (datagram and Unix sockets)."""
        if allow is None and not deny and not (counted and self.max_per_source is not None):
            return None
        return Gate(self, socket_name, allow, deny)

    def refuse(self, what: str, address: IPAddress, socket_name: str, why: str) -> None:
        """Count a refusal; log it if the log has been quiet for REPORT_INTERVAL."""
        self.refused += 1
        self._log.say(f"{self.name}: refused {what} from {address} on {socket_name} ({why})",
                      "more refused")


class Gate:
    """One socket's check at accept (and, for datagrams, at receive)."""

    def __init__(
        self, access: Access, socket_name: str, allow: Sequence[Network] | None,
        deny: Sequence[Network],
    ) -> None:
        self.access = access
        self.socket_name = socket_name
        self.allow = None if allow is None else tuple(allow)
        self.deny = tuple(deny)
        # Peer host as accept()/recvfrom() gave it -> (its address, why refused).
        self._verdicts: dict[str, tuple[IPAddress, str | None]] = {}

    def _judge(self, peer: Any) -> tuple[IPAddress, str | None] | None:
        """The client's address and why the rules refuse it (None: they admit
        it); None for a client with no IP address."""
        host = peer[0] if isinstance(peer, tuple) and peer else None
        if not isinstance(host, str):
            return None
        verdict = self._verdicts.get(host)
        if verdict is None:
            address = client_address(peer)
            if address is None:
                return None
            if len(self._verdicts) >= VERDICT_CACHE:
                self._verdicts.clear()
            verdict = self._verdicts[host] = (address, refusal(self.allow, self.deny, address))
        return verdict

    def admit(self, client: socket.socket, peer: Any) -> bool:
        """Whether to keep a just-accepted connection.  If not, it is closed
        with a reset, counted and (once per burst) logged.  Each connection
        admitted must be given back to release() once it closes."""
        verdict = self._judge(peer)
        if verdict is None:
            return True  # a Unix client: no address to match or count
        address, why = verdict
        limit = self.access.max_per_source
        if why is None and limit is not None:
            count = self.access.open.get(address, 0)
            if count < limit:
                self.access.open[address] = count + 1
                return True
            why = f"{count} connections open from it, max_connections_per_source {limit}"
        if why is None:
            return True
        reset_and_close(client)
        self.access.refuse("a connection", address, self.socket_name, why)
        return False

    def admit_flow(self, peer: Any) -> bool:
        """Whether a datagram client may open a flow: flows count against
        max_connections_per_source with the connections from that address.
        A refused one is counted; each flow admitted goes back to release()."""
        verdict = self._judge(peer)
        limit = self.access.max_per_source
        if verdict is None or limit is None:
            return True
        address = verdict[0]
        count = self.access.open.get(address, 0)
        if count < limit:
            self.access.open[address] = count + 1
            return True
        self.access.refuse("a flow", address, self.socket_name,
                           f"{count} connections and flows open from it, "
                           f"max_connections_per_source {limit}")
        return False

    def release(self, peer: Any) -> None:
        """A connection admit() (or a flow admit_flow()) let in has closed."""
        verdict = self._judge(peer)
        if verdict is None or self.access.max_per_source is None:
            return
        address = verdict[0]
        count = self.access.open.get(address, 0) - 1
        if count > 0:
            self.access.open[address] = count
        else:
            self.access.open.pop(address, None)

    def admit_datagram(self, peer: Any) -> bool:
        """Whether a datagram from `peer` may go on; a refused one is counted."""
        verdict = self._judge(peer)
        if verdict is None:
            return True
        address, why = verdict
        if why is None:
            return True
        self.access.refuse("a datagram", address, self.socket_name, why)
        return False
