"""The kernel data path, as the daemon and a service's runner use it.

`KernelPath` is the daemon's: opened as root before the privilege drop, and
only when some service wants it (`open_kernel_path`), it holds the one
`Steering` (the attached sk_lookup program and its maps, `lazyd.datapath.bpf`)
for the daemon's lifetime, and says, once per service, when a service that
asked for `auto` stays on the userspace path, and why.

`ServiceSteering` is one runner's: the entries its service has in the map.
The runner calls `steer()` once the service is ready (it gets each socket's
listener from the privileged helper, adds it keyed by lazyd's own listen
address and closes its copy at once: the map holds no reference, so a socket
the service closes, or a service that dies, leaves the map by itself) and
`unsteer()` before anything stops the service, so that new connections land
on lazyd's listener again and are held there.  Connections already steered
belong to the service; lazyd never sees them.

Idle stop cannot watch steered connections, so `quiet()` answers, when the
idle timer is due and only then, whether the time since the last check was
idle: no new steered connection (the program's per-entry counter did not
move), none open now and none open at the previous check (the kernel's
socket table, `diag.open_connections`, less what lazyd holds itself).  A
service on the kernel path therefore stops between one and two idle_timeouts
after its last connection closed, never earlier.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from lazyd.config import Config, ServiceConfig, SocketConfig
from lazyd.config.datapath import Datapath, fallback
from lazyd.datapath.bpf import diag, supported
from lazyd.datapath.bpf.steering import Steering
from lazyd.errors import LazydError
from lazyd.logs import Level, log_at

LogFn = Callable[[str], None]
BpfAddress = tuple[str, int]
# Asks the privileged helper for a copy of the listener that process pid
# binds for the named socket (Spawner.take_listener).
TakeListener = Callable[[int, str], Awaitable[int]]
# After a failed attempt to take a service's listener again, the next one
# waits this long (see ServiceSteering.wants_resteer).
RESTEER_BACKOFF = 1.0
# Why a service a reload adds cannot have the kernel path: see KernelPath.check.
_NOT_OPENED = ("no service asked for the kernel path when lazyd started, and it is set up "
               "then only (before the privilege drop); restart lazyd")


def wants_kernel(service: ServiceConfig) -> bool:
    """Whether the config puts `service` on the kernel path (kernel, or an auto
    that nothing in the config keeps off it)."""
    if service.datapath is Datapath.KERNEL:
        return True
    return service.datapath is Datapath.AUTO and not fallback(service)


class KernelPath:
    """The daemon's kernel data path: the steering, if it could be opened."""

    def __init__(self, steering: Steering | None, unavailable: str | None, log: LogFn) -> None:
        self.steering = steering
        # Why there is no steering although a service wanted it (None: none did,
        # or there is one).
        self.unavailable = unavailable
        self._log = log
        self._said: set[tuple[str, str]] = set()

    def uses_kernel(self, service: ServiceConfig) -> bool:
        """Whether `service` is steered once warm, here and now."""
        return self.steering is not None and wants_kernel(service)

    def announce(self, services: Iterable[ServiceConfig]) -> None:
        """Log, once per service and reason, each `auto` service that stays on the
        userspace path, and why."""
        for service in services:
            if service.datapath is not Datapath.AUTO:
                continue
            why = "; ".join(fallback(service)) or (
                None if self.steering is not None else self.unavailable or _NOT_OPENED)
            if why is None or (service.name, why) in self._said:
                continue
            self._said.add((service.name, why))
            log_at(self._log, Level.INFO,
                   f"{service.name}: datapath auto: using the userspace path: {why}")

    def check(self, services: Iterable[ServiceConfig]) -> None:
        """Raise LazydError for a `datapath: kernel` service this daemon cannot steer
        (a reload's new service, when no steering was opened at start-up)."""
        for service in services:
            if service.datapath is Datapath.KERNEL and self.steering is None:
                why = self.unavailable or _NOT_OPENED
                raise LazydError(f"services.{service.name}.datapath: kernel: {why}")

    def close(self) -> None:
        """Detach the program: nothing is steered any more. Idempotent."""
        if self.steering is not None:
            self.steering.close()


def open_kernel_path(config: Config, log: LogFn) -> KernelPath:
    """The daemon's kernel path for `config`, opened now (as root, before the drop)
    if any service wants it.  Raises LazydError, saying why, when a `datapath:
    kernel` service cannot have it; an `auto` one falls back (see `announce`)."""
    wanted = [svc for svc in config.services.values() if wants_kernel(svc)]
    if not wanted:
        return KernelPath(None, None, log)
    why = supported()
    steering = None
    if why is None:
        try:
            steering = Steering.open()
        except OSError as exc:
            why = f"the kernel refused the steering program: {exc}"
    kernel = KernelPath(steering, why, log)
    kernel.check(wanted)
    return kernel


@dataclass(frozen=True)
class _Target:
    """The start that is steered: what steer() was given."""

    service: ServiceConfig
    pid: int
    take: TakeListener
    still: Callable[[], bool]


@dataclass
class _Entry:
    """One socket's steering: lazyd's listen address, as map keys."""

    sc: SocketConfig
    keys: list[BpfAddress]
    counted: int = 0  # connections steered through these keys before their last add


@dataclass
class ServiceSteering:
    """The entries of one service in the steering map (see the module's docstring)."""

    name: str
    kernel: KernelPath
    log: LogFn
    entries: list[_Entry] = field(default_factory=list)
    steered_total: int = 0  # steered connections of the entries removed so far
    _last_steered: int = 0
    _open_at_last: bool = False
    _target: _Target | None = None  # the start being steered, for resteer()
    _resteering: bool = False
    _resteer_after: float = -math.inf
    _said_resteer: bool = False

    @property
    def steering(self) -> bool:
        """Whether new connections go straight to the service now."""
        return bool(self.entries)

    async def steer(
        self, service: ServiceConfig, pid: int, take: TakeListener, still: Callable[[], bool]
    ) -> None:
        """Steer each TCP socket of `service` (ready, main process `pid`) into its own
        listener.  `still()` says whether the service is still the ready one by the
        time a listener arrives; if not, nothing is added."""
        self._target = None
        if self.kernel.steering is None or not self.kernel.uses_kernel(service):
            return
        self._target = _Target(service, pid, take, still)
        self._said_resteer = False
        self._last_steered, self._open_at_last = self.steered(), False
        if await self._add_all(self._target) is not None:
            self._target = None  # this start stays in userspace (said why)
            return
        if self.entries:
            where = ", ".join(str(e.sc.listen) for e in self.entries)
            log_at(self.log, Level.INFO, f"{self.name}: kernel data path: new connections to "
                   f"{where} go straight to the service")

    def wants_resteer(self, now: float) -> bool:
        """Whether a connection that reached lazyd's own listener, while the
        service is steered, should make lazyd take the service's listener again.

        Steered, a new connection reaches lazyd only when the program found no
        entry: the service closed the listener it was steered into (some
        services, iperf3 among them, make a new one for each client).  The
        kernel says nothing when a socket leaves the map, so this is how lazyd
        learns of it.  After a failed attempt it waits RESTEER_BACKOFF before
        trying again, so that a service with no listener for a while does not
        cost every client a round trip to the helper."""
        target = self._target
        # The entry may still be in the map: a listener shut down (not closed)
        # stays there, and the program's assignment to it fails.  A connection
        # lazyd had queued before the entries were added costs one needless try.
        return (target is not None and self.kernel.steering is not None
                and not self._resteering and target.still() and now >= self._resteer_after)

    async def resteer(self, now: float) -> None:
        """Take the service's current listeners and steer into them (see
        wants_resteer); the caller holds new connections meanwhile."""
        target = self._target
        if target is None or self._resteering:
            return
        self._resteering = True
        try:
            self.unsteer()
            self._target = target  # unsteer() forgets it; this is the same start
            failed = await self._add_all(target, quiet=True)
            if failed is None:
                self._resteer_after = now
                return
            self._resteer_after = now + RESTEER_BACKOFF
            if not self._said_resteer:
                self._said_resteer = True
                log_at(self.log, Level.WARNING, f"{self.name}: kernel data path: cannot take "
                       f"the service's listener again ({failed}); new connections go through "
                       f"lazyd until it can (tried again at most every {RESTEER_BACKOFF:g} s)")
        finally:
            self._resteering = False

    async def _add_all(self, target: _Target, quiet: bool = False) -> str | None:
        """Add an entry for each socket of the target's service; None, or why not
        (after a warning unless `quiet`; entries added so far are removed)."""
        steering = self.kernel.steering
        assert steering is not None
        for sc in target.service.sockets:
            try:
                fd = await target.take(target.pid, sc.name)
            except Exception as exc:  # the helper said why
                self.unsteer(forget=False)
                if not quiet:
                    log_at(self.log, Level.WARNING, f"{self.name}: socket {sc.name}: the "
                           f"kernel data path is not used for this start: {exc}")
                return f"socket {sc.name}: {exc}"
            try:
                if not target.still():
                    self.unsteer(forget=False)
                    return "the service is no longer the ready one"
                entry = _Entry(sc, _keys(sc, fd))
                for address in entry.keys:
                    steering.add(address, fd)
                self.entries.append(entry)
            except (OSError, ValueError) as exc:
                self.unsteer(forget=False)
                if not quiet:
                    log_at(self.log, Level.WARNING, f"{self.name}: socket {sc.name}: cannot "
                           f"steer connections into the service's listener: {exc}")
                return f"socket {sc.name}: {exc}"
            finally:
                os.close(fd)  # the map holds no reference: the socket is the service's
        return None

    def unsteer(self, forget: bool = True) -> None:
        """Remove every entry: new connections reach lazyd's listeners again.
        Unless `forget` is False, nothing is steered again for this start."""
        if forget:
            self._target = None
        steering = self.kernel.steering
        if steering is None or not self.entries:
            return
        for entry in self.entries:
            for address in entry.keys:
                self.steered_total += steering.steered(address)
                steering.remove(address)
        self.entries = []

    def steered(self) -> int:
        """Connections steered into the service since lazyd started."""
        steering = self.kernel.steering
        now = 0
        if steering is not None:
            now = sum(steering.steered(a) for e in self.entries for a in e.keys)
        return self.steered_total + now

    def quiet(self, own: Mapping[str, int]) -> bool:
        """Whether the service was idle since the last call (or since it was steered):
        call only when the idle timer is due.  `own`: per socket name, the
        connections lazyd itself holds or forwards on that listener, which the
        kernel's count includes."""
        steering = self.kernel.steering
        if steering is None or not self.entries:
            return True
        count = self.steered()  # never goes down, whatever was re-steered meanwhile
        open_now = sum(
            max(0, diag.open_connections(_listen(e.sc)) - own.get(e.sc.name, 0))
            for e in self.entries
        )
        quiet = open_now == 0 and count == self._last_steered and not self._open_at_last
        self._last_steered, self._open_at_last = count, open_now > 0
        return quiet


def _listen(sc: SocketConfig) -> BpfAddress:
    assert sc.listen.host is not None and sc.listen.port is not None
    return (sc.listen.host, sc.listen.port)


def _keys(sc: SocketConfig, fd: int) -> list[BpfAddress]:
    """The map keys for lazyd's listen address that the service's listener (fd)
    can take: its family, and IPv4 too for a dual-stack IPv6 listener."""
    host, port = _listen(sc)
    probe = socket.socket(fileno=fd)
    try:
        family = probe.family
        v6only = family == socket.AF_INET6 and bool(
            probe.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    finally:
        probe.detach()
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        v4: list[BpfAddress] = [(host, port)]
        v6: list[BpfAddress] = []
    else:
        v6 = [(host, port)]
        # A dual-stack [::] listener of lazyd's takes IPv4 connections too.
        v4 = [("0.0.0.0", port)] if ip.is_unspecified and sc.listen.dual_stack else []
    keys = v4 if family == socket.AF_INET else v6 + ([] if v6only else v4)
    if not keys:
        raise ValueError(f"the service listens on {family.name}, lazyd on {sc.listen}")
    return keys
