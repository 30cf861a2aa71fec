"""One service, driven: the trio layer that carries out the lifecycle's actions.

`Lifecycle` decides; `ServiceRunner` does.  Events reach the machine through
`dispatch()`, which runs synchronously (trio is single-threaded, so no event
can interleave with another) and carries out the returned actions at once;
anything that must wait (executing the command, reaping the process, waiting
for readable sockets) runs in a task of the runner's nursery and dispatches
its result when it comes.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from lazyd import watchers
from lazyd.backends.base import Backend, Started
from lazyd.backends.container.backend import ContainerBackend, StartedContainer
from lazyd.backends.process import launch
from lazyd.backends.process.backend import ProcessBackend
from lazyd.backends.process.spawner import current_spawner
from lazyd.config import Mode, ReadyKind, ServiceConfig, SocketConfig
from lazyd.core.lifecycle import (
    Action,
    Activation,
    DropHeld,
    Event,
    Exited,
    Kill,
    Lifecycle,
    Log,
    Outcome,
    Ready,
    ReleaseHeld,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    State,
    Stop,
    Tick,
    Unwatch,
    Watch,
)
from lazyd.core.starts import StartHistory, StartRecord, describe_waiting
from lazyd.datapath.kernel import KernelPath, ServiceSteering
from lazyd.errors import LaunchError
from lazyd.front.datagram import DatagramProxy
from lazyd.front.stream import StreamProxy
from lazyd.front.watch import PassWatch
from lazyd.logs import log_at
from lazyd.net.access import Access
from lazyd.readiness.notify import NotifySocket, open_notify_socket
from lazyd.readiness.probe import wait_connectable
from lazyd.readiness.sender import SenderPolicy
from lazyd.runtime.binding import accept_queue_length
from lazyd.runtime.first_accept import watch_first_accept

LogFn = Callable[[str], None]

# How long after a pass-mode start lazyd looks for the service's first accept.
FIRST_ACCEPT_WINDOW = 2.0
# The longest new connections wait while the kernel data path takes a
# service's new listener (a round trip to the privileged helper, ~1 ms).
RESTEER_HOLD = 0.5
# How long after the held connections are on their way the kernel data path
# takes the service's listener (see ServiceRunner._steer_soon).
STEER_AFTER = 0.02


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def strict_from_environment() -> bool:
    """LAZYD_STRICT=1 (the test suite sets it): a lifecycle event that does not
    fit its state raises, instead of being logged as a bug."""
    return os.environ.get("LAZYD_STRICT") == "1"


@dataclass
class Options:
    """What the daemon gives every runner besides its service's config."""

    nofile_soft: int | None = None
    strict: bool = field(default_factory=strict_from_environment)
    log: LogFn = stderr_log  # a lazyd.logs.Logger also takes a level (see log_at)
    output: LogFn = stderr_log
    # Called as each start attempt ends, with the service's name (the metrics).
    on_activation: Callable[[str, StartRecord], None] | None = None
    # The kernel data path (lazyd.datapath.kernel), if the daemon opened one.
    kernel: KernelPath | None = None


@dataclass(frozen=True)
class Traffic:
    """A service's traffic at one moment.  None: not known for this service
    (pass mode sees only its TCP accept queues; a kind of socket it has not)."""

    connections_waiting: int | None = None  # held by lazyd, or in the accept queue
    datagrams_waiting: int | None = None
    active: int | None = None  # forwarded connections and datagram flows open
    refused: int | None = None  # by allow/deny and max_connections_per_source
    bytes_in: int | None = None  # client to service
    bytes_out: int | None = None
    datagrams_dropped: int | None = None
    datagrams_in: int | None = None
    datagrams_out: int | None = None


class ServiceRunner:
    """Holds one service's sockets and runs its process when traffic comes."""

    def __init__(
        self,
        config: ServiceConfig,
        sockets: Sequence[socket.socket],
        options: Options,
        on_spawn: Callable[[ServiceRunner], None] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.sockets = list(sockets)
        self.options = options
        self.on_spawn = on_spawn
        self.machine = Lifecycle(config.policy, trio.current_time(), strict=options.strict)
        # Where the service comes from, and the start now running, if any.
        self.backend: Backend = self._backend(config)
        self.started: Started | None = None
        self.status_text: str | None = None
        # Who is believed on the notify socket; MAINPID= may move the main pid.
        self.senders = SenderPolicy(self.name, options.log)
        self.history = StartHistory()
        self.changed = trio.Event()  # set and replaced on every state change
        self.finished = trio.Event()  # run() has returned
        self._nursery: trio.Nursery | None = None
        self._timer_scope = trio.CancelScope()
        self._timer_running = False
        # Pass mode: what waits for traffic while the service is idle.
        self.watch = PassWatch(self.name, self._named(sockets))
        self._notify: NotifySocket | None = None
        self._dispatching = False
        # Set once the lifecycle has begun: traffic that a proxy accepts
        # before then waits, and starts the service right after.
        self._begun = False
        # Proxy mode: lazyd accepts and forwards itself (one proxy per socket).
        self.proxies: list[StreamProxy | DatagramProxy] = []
        # allow/deny and max_connections_per_source: what the proxies refuse.
        self.access = Access(self.name, max_per_source=config.max_connections_per_source,
                             log=options.log)
        self._probe_scope: trio.CancelScope | None = None
        self._idle_wake: trio.Event | None = None  # see _run_idle_stop
        self._running_since = 0.0
        # The kernel data path: this service's entries in the steering map.
        self.steering = ServiceSteering(
            self.name, options.kernel or KernelPath(None, None, options.log), options.log)
        self._steered_busy_at = -math.inf  # the last idle check that found steered traffic

    # -- public --------------------------------------------------------------

    @property
    def main_pid(self) -> int | None:
        """The service's main process (MAINPID= may have moved it from the one
        started), or None when it has none here."""
        return self.senders.main_pid

    @property
    def closing(self) -> bool:
        """Set once the service is removed or the daemon shuts down: no traffic
        starts it again."""
        return self.watch.closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self.watch.closing = value

    def _backend(self, config: ServiceConfig) -> Backend:
        """Where the service comes from: the one place that chooses."""
        if config.container is not None:
            return ContainerBackend(config, self.options.log)
        return ProcessBackend(config, self.options.nofile_soft)

    def container_status(self) -> dict[str, object] | None:
        """A container service's container (name, engine, id, state); None for a process."""
        return self.backend.status() if isinstance(self.backend, ContainerBackend) else None

    def _named(self, sockets: Sequence[socket.socket]) -> list[tuple[str, socket.socket]]:
        return [(sc.name, sock) for sc, sock in zip(self.config.sockets, sockets, strict=True)]

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def proxied(self) -> bool:
        return self.config.mode is Mode.PROXY

    def queued(self) -> int | None:
        """Connections (and datagrams) waiting: held by lazyd in proxy mode, in
        the kernel's accept queues in pass mode (TCP only)."""
        if self.proxies:
            return sum(p.waiting for p in self.proxies)
        counts = [accept_queue_length(s) for s in self.sockets]
        known = [c for c in counts if c is not None]
        return sum(known) if known else None

    def _waiting_text(self) -> str | None:
        traffic = self.traffic()
        return describe_waiting(traffic.connections_waiting, traffic.datagrams_waiting)

    @property
    def kernel_path(self) -> bool:
        """Whether this service is steered once warm (its config and the daemon allow it)."""
        return self.steering.kernel.uses_kernel(self.config)

    def traffic(self) -> Traffic:
        """What this service's proxies (or, in pass mode, the kernel) hold and
        carry: the one place status, metrics and the ready line take it from."""
        if not self.proxies:
            return Traffic(connections_waiting=self.queued())
        streams = [p for p in self.proxies if isinstance(p, StreamProxy)]
        datagrams = [p for p in self.proxies if isinstance(p, DatagramProxy)]

        def total(values: list[int], present: bool) -> int | None:
            return sum(values) if present else None

        return Traffic(
            connections_waiting=total([p.held for p in streams], bool(streams)),
            datagrams_waiting=total([p.queued for p in datagrams], bool(datagrams)),
            active=sum(p.active for p in self.proxies),
            refused=self.access.refused,
            # On the kernel path most bytes never pass through lazyd: unknown.
            bytes_in=None if self.kernel_path else sum(p.bytes_in for p in self.proxies),
            bytes_out=None if self.kernel_path else sum(p.bytes_out for p in self.proxies),
            datagrams_dropped=total([p.dropped for p in datagrams], bool(datagrams)),
            datagrams_in=total([p.datagrams_in for p in datagrams], bool(datagrams)),
            datagrams_out=total([p.datagrams_out for p in datagrams], bool(datagrams)),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the sockets and serve traffic until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # First the notify socket: whatever starts the service must
                # find it there, to put it in the service's environment.
                self._open_notify()
                if self.proxied:
                    # A proxy accepts as soon as it runs, and may hold a client
                    # before the others run: it cannot start the service yet
                    # (start() waits for _begun), the check below does.
                    for sc, sock in zip(self.config.sockets, self.sockets, strict=True):
                        proxy = self._make_proxy(sc, sock)
                        self.proxies.append(proxy)
                        await nursery.start(proxy.run)
                    if self.config.idle_timeout is not None:
                        nursery.start_soon(self._run_idle_stop)
                # Its first start will want a watch thread, to time the first
                # accept or to probe the upstream: started now, it costs that
                # start nothing.
                watchers.prepare()
                self._apply(self.machine.begin(trio.current_time()))
                self._begun = True
                for sc, proxy in zip(self.config.sockets, self.proxies, strict=False):
                    if proxy.waiting:
                        self.start(f"traffic on {sc.name}")
                        break
                task_status.started()
                if not self.proxied:
                    # This task watches the sockets itself: a task fewer per
                    # idle service.
                    await self.watch.run(lambda name: self.start(f"traffic on {name}"))
        finally:
            # Whatever ended the runner (a bug included), nothing stays steered
            # into a service it no longer looks after.
            self.steering.unsteer()
            if self._notify is not None:
                self._notify.close()
            self.finished.set()

    def _open_notify(self) -> None:
        """A notify socket for a `ready: notify` service (only: one socket and
        one task per service is what an idle daemon's memory is made of)."""
        if (
            self._notify is None
            and self.config.ready.kind is ReadyKind.NOTIFY
            and self._nursery is not None
        ):
            self._notify = open_notify_socket(self.name)
            self._nursery.start_soon(self._run_notify, self._notify)

    def retire(self, reason: str) -> None:
        """Removed from the config: stop the service, refuse new traffic at
        once, and hold nothing.  The caller closes the sockets once `finished`
        (after `cancel()`)."""
        self.closing = True
        for proxy in self.proxies:
            proxy.refusing = True
        self.stop(reason)

    def hand_over(self, reason: str) -> None:
        """Replaced by a new runner on (some of) the same sockets: stop the
        service and take nothing more off the sockets, so that the kernel
        holds new traffic for the new runner."""
        self.closing = True
        for proxy in self.proxies:
            proxy.paused = True
        self.stop(reason)

    def cancel(self) -> None:
        """End run(): for a service that was removed and has stopped."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def reconfigure(self, config: ServiceConfig, sockets: Sequence[socket.socket]) -> None:
        """Take new settings; they apply from the next start.  New sockets are
        watched from now on (the caller closes the ones no longer used)."""
        self.config = config
        self.machine.policy = config.policy
        self.backend = self._backend(config)  # from the next start
        self._open_notify()  # in case it has just become `ready: notify`
        if list(sockets) != self.sockets:
            self.sockets = list(sockets)
            self.watch.retarget(self._named(sockets))

    def start(self, reason: str) -> None:
        # Only an idle service can be started; in proxy mode this is called for
        # every connection accepted while starting, so skip the dispatch then.
        if self._begun and not self.closing and self.machine.state is State.IDLE:
            self.dispatch(Start(reason))

    def stop(self, reason: str) -> None:
        self.dispatch(Stop(reason))

    async def wait_stopped(self) -> None:
        """Return once no process of this service is left."""
        while self.machine.process:
            await self.changed.wait()

    def dispatch(self, event: Event) -> None:
        assert not self._dispatching, "dispatch() is not re-entrant"
        self._dispatching = True
        try:
            actions = self.machine.handle(event, trio.current_time())
        finally:
            self._dispatching = False
        self._apply(actions)
        if (
            isinstance(event, Spawned)
            and self.config.ready.kind is ReadyKind.CONNECT
            and self.machine.state is State.STARTING
            and self._nursery is not None
        ):
            self._nursery.start_soon(self._probe_upstreams, event.handle)
        if (
            isinstance(event, Spawned)
            and self.config.ready.kind is ReadyKind.HEALTH
            and self.machine.state is State.STARTING
            and isinstance(self.started, StartedContainer)
            and self._nursery is not None
        ):
            self._nursery.start_soon(self._wait_healthy, self.started, event.handle)

    # -- actions -------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        if self.machine.state is not State.RUNNING:
            # First of all, before any stop signal: new connections go to
            # lazyd's listener again, and are held there.
            self.steering.unsteer()
        for action in actions:
            match action:
                case Spawn():
                    assert self._nursery is not None
                    self._nursery.start_soon(self._run_service)
                    if self.on_spawn is not None:
                        self.on_spawn(self)
                case Kill(sig, group):
                    self._kill(sig, group)
                case Watch():
                    if self.proxied:
                        self._restart_if_held()
                    else:
                        self.watch.arm()
                case Unwatch():
                    self.watch.disarm()
                case Log(text, level):
                    log_at(self.options.log, level, f"{self.name}: {text}")
                case Activation():
                    record = StartRecord.from_activation(action, trio.current_time())
                    if action.outcome is Outcome.READY:
                        record.held = self.queued()
                        if record.held and not self.proxied:
                            self._nursery_soon(self._watch_first_accept, record)
                    self.history.append(record)
                    log_at(self.options.log, record.level,
                           record.line(self.name, self._waiting_text()), **record.fields())
                    if self.options.on_activation is not None:
                        self.options.on_activation(self.name, record)
                case ReleaseHeld():
                    # Pass mode holds nothing itself: the kernel does.
                    self._running_since = trio.current_time()
                    for proxy in self.proxies:
                        proxy.release()
                    self._steer_soon()
                case DropHeld(reason):
                    for proxy in self.proxies:
                        proxy.drop(reason)  # each logs what it closed, and why
        if self.machine.state is not State.RUNNING:
            for proxy in self.proxies:
                if proxy.ready:
                    proxy.unready()  # from now on, new traffic is held again
        if not self.closing:
            refusing = self.machine.state is State.FAILED
            for proxy in self.proxies:
                proxy.refusing = refusing
        if self.machine.state is not State.STARTING and self._probe_scope is not None:
            self._probe_scope.cancel()
        deadline = self.machine.deadline
        if deadline is None:
            self._timer_scope.cancel()  # the timer task, if any, ends
        elif self._timer_running:
            self._timer_scope.deadline = deadline
        elif self._nursery is not None:
            self._timer_running = True
            self._nursery.start_soon(self._run_timer)
        self.changed.set()
        self.changed = trio.Event()
        if self._idle_wake is not None:
            self._idle_wake.set()

    def _kill(self, sig: signal.Signals, group: bool) -> None:
        if self.started is not None:
            self.started.signal(sig, group=group)

    # -- proxy mode ----------------------------------------------------------

    def _make_proxy(self, sc: SocketConfig, sock: socket.socket) -> StreamProxy | DatagramProxy:
        assert sc.upstream is not None  # the config requires it in proxy mode
        on_traffic = functools.partial(self.start, f"traffic on {sc.name}")
        counted = not sc.listen.is_unix  # per source: IP clients' connections and flows
        gate = self.access.gate(sc.name, sc.allow, sc.deny, counted=counted)
        if sc.listen.is_stream:
            return StreamProxy(
                self.name, sock, sc.upstream,
                queue_limit=self.config.queue_limit,
                max_connections=self.config.max_connections,
                proxy_protocol=sc.proxy_protocol, gate=gate,
                on_traffic=on_traffic, log=self.options.log,
                idle_timeout=self.config.connection_idle_timeout,
                on_warm=self._warm_arrival if self.kernel_path else None,
            )
        return DatagramProxy(
            self.name, sock, sc.upstream,
            queue_limit=self.config.datagram_queue_limit,
            flow_timeout=self.config.flow_timeout, gate=gate,
            on_traffic=on_traffic, log=self.options.log,
        )

    def _steer_soon(self) -> None:
        """Ready on the kernel path: steer new connections into the service's own
        listeners (held ones were released to userspace, and drain there)."""
        started = self.started
        if not self.kernel_path or started is None or started.pid is None:
            return
        handle = started.handle

        def still() -> bool:
            return self.machine.instance == handle and self.machine.state is State.RUNNING

        async def steer() -> None:
            # Only once every held connection is on its way: a newcomer steered
            # now would overtake clients that waited through the cold start,
            # and compete with them for the service's accept queue.
            for proxy in self.proxies:
                if isinstance(proxy, StreamProxy):
                    await proxy.drained()
            # Taking the listener costs the helper and the daemon about a
            # millisecond of CPU, often the CPU the service is answering its
            # first clients on: not in the middle of the cold start's first
            # answer.  Connections meanwhile are forwarded as before.
            await trio.sleep(STEER_AFTER)
            if not still():
                return
            take = current_spawner().take_listener
            await self.steering.steer(self.config, started.pid or 0, take, still)

        self._nursery_soon(steer)

    def _warm_arrival(self) -> None:
        """A connection reached lazyd's listener while the service is ready on
        the kernel path: if the service's listener left the map, hold new
        connections for the moment it takes to steer into its new one, so that
        those right behind this one (a client's second connection, say) go
        straight to the service instead of through lazyd."""
        now = trio.current_time()
        if self.machine.state is not State.RUNNING or not self.steering.wants_resteer(now):
            return
        streams = [p for p in self.proxies if isinstance(p, StreamProxy)]
        for proxy in streams:
            proxy.hold_new()

        async def resteer() -> None:
            try:
                with trio.move_on_after(RESTEER_HOLD):
                    await self.steering.resteer(now)
            finally:
                for proxy in streams:
                    if proxy.ready:
                        proxy.resume()

        self._nursery_soon(resteer)

    def _nursery_soon(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _watch_first_accept(self, record: StartRecord) -> None:
        """Pass mode: note when the service first accepts, for at most
        FIRST_ACCEPT_WINDOW seconds after the start (`first_accept` says how,
        and how closely: within an eighth of the time since ready, plus half
        a millisecond)."""
        assert record.held is not None

        async def running() -> bool:
            if self.machine.state is not State.RUNNING:
                return False
            await self.changed.wait()
            return self.machine.state is State.RUNNING

        def found(first: float) -> None:  # called in the sampling thread
            record.first_accept = first

        await watch_first_accept(self.sockets, record.held, FIRST_ACCEPT_WINDOW, running, found)

    def refresh_first_byte(self) -> None:
        """Proxy mode: fill in the latest start's first forwarded byte."""
        if not self.history or not self.proxies:
            return
        record = self.history[-1]
        if record.first_byte is None and record.ready is not None:
            times = [p.first_byte_at for p in self.proxies if p.first_byte_at is not None]
            times = [t for t in times if t >= record.ready]
            if times:
                record.first_byte = min(times)

    def _restart_if_held(self) -> None:
        """Back to idle with traffic already held (it came while the service was
        stopping): start again, as queued traffic does in pass mode."""
        if self._begun and self._nursery is not None and any(p.waiting for p in self.proxies):
            self._nursery.start_soon(self._start_soon, "traffic held while stopping")

    async def _start_soon(self, reason: str) -> None:
        self.start(reason)

    async def _probe_upstreams(self, handle: int | str) -> None:
        """Readiness `connect`: ready once every stream upstream accepts.  A
        probe's connection carries the first client held on that socket."""
        with trio.CancelScope() as scope:
            self._probe_scope = scope
            for proxy in self.proxies:
                if not isinstance(proxy, StreamProxy):
                    continue
                connection = await wait_connectable(proxy.upstream, keep=proxy.held > 0)
                if connection is not None:
                    if self.machine.instance == handle and self.machine.state is State.STARTING:
                        proxy.adopt(connection)
                    else:
                        connection.close()
            if self.machine.instance == handle and self.machine.state is State.STARTING:
                self.dispatch(Ready())
        if self._probe_scope is scope:
            self._probe_scope = None

    async def _wait_healthy(self, started: StartedContainer, handle: int | str) -> None:
        """Readiness `health`: ready once the container's own healthcheck passes."""
        with trio.CancelScope() as scope:
            self._probe_scope = scope
            await started.wait_healthy()
            if self.machine.instance == handle and self.machine.state is State.STARTING:
                self.dispatch(Ready())
        if self._probe_scope is scope:
            self._probe_scope = None

    async def _run_idle_stop(self) -> None:
        """Proxy mode: stop the service after idle_timeout with no open connection
        and no active datagram flow.  Waits on events only; no polling."""
        timeout = self.config.idle_timeout
        assert timeout is not None
        # One event, set by a state change or by a proxy's activity going to
        # or from zero: a wait on several events would cost a task for each,
        # every time (~0.1 ms of a cold start).
        for proxy in self.proxies:
            proxy.activity.on_idle_change = self._wake_idle_stop
        while True:
            self._idle_wake = wake = trio.Event()
            deadline = math.inf
            if self.machine.state is State.RUNNING and not any(p.active for p in self.proxies):
                since = max([self._running_since, self._steered_busy_at,
                             *(p.last_active_change for p in self.proxies)])
                deadline = since + timeout
            # Decided on what holds now, not on the wait having timed out: a
            # datagram or a connection forwarded in the same turn of the loop
            # as the deadline passed would otherwise go to a service being
            # stopped under it.
            if trio.current_time() >= deadline:
                own = {sc.name: p.waiting + p.active
                       for sc, p in zip(self.config.sockets, self.proxies, strict=True)}
                if not self.steering.quiet(own):
                    # Steered connections came or are open: lazyd did not see
                    # them, the kernel did.  Look again one idle_timeout later.
                    self._steered_busy_at = trio.current_time()
                else:
                    self.stop("idle")
                    if self.machine.state is State.RUNNING:
                        # Not stopped (a lifecycle bug, logged as one): wait
                        # for a change rather than ask again at once.
                        await self.changed.wait()
                continue
            with trio.move_on_at(deadline):
                await wake.wait()

    def _wake_idle_stop(self) -> None:
        if self._idle_wake is not None:
            self._idle_wake.set()

    # -- tasks ---------------------------------------------------------------

    async def _run_timer(self) -> None:
        """Send Tick whenever the machine's deadline passes; runs only while
        there is a deadline (an idle service has none, and no task for it)."""
        try:
            while (deadline := self.machine.deadline) is not None:
                with trio.CancelScope(deadline=deadline) as scope:
                    self._timer_scope = scope
                    await trio.sleep_forever()
                if trio.current_time() >= scope.deadline:
                    self.dispatch(Tick())
        finally:
            self._timer_running = False

    async def _run_service(self) -> None:
        """One start: through the backend, then wait for its end."""
        try:
            started = await self.backend.start(self.sockets, self._notify)
        except LaunchError as exc:
            # The log line gets the service's name in front anyway.
            self.dispatch(SpawnFailed(str(exc).removeprefix(f"{self.name}: ")))
            return
        self.started = started
        self.senders.main_pid = started.pid
        self.status_text = None
        try:
            self.dispatch(Spawned(started.handle))
            async with trio.open_nursery() as nursery:
                if started.output is not None:
                    nursery.start_soon(self._relay, started.output)
                returncode = await started.wait()
        finally:
            await started.aclose()
        self.started = None
        self.senders.main_pid = None
        self.dispatch(Exited(returncode))

    async def _relay(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            await launch.relay_output(self.name, stream, self.options.output)
        finally:
            await stream.aclose()

    async def _run_notify(self, notify: NotifySocket) -> None:
        """Take what the service says on its notify socket (see readiness.sender)."""
        while True:
            try:
                message = await notify.receive()
            except ValueError as exc:
                self.senders.malformed(str(exc))
                continue
            if not self.senders.believe(message):
                continue
            if message.status is not None:
                self.status_text = message.status
            if message.stopping:
                self.options.log(f"{self.name}: service says it is stopping")
            if message.ready:
                self.dispatch(Ready())
