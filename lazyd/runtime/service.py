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

from lazyd.backends.process import launch
from lazyd.backends.process.spawner import ServiceProcess
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
from lazyd.core.starts import StartHistory, StartRecord
from lazyd.errors import LaunchError
from lazyd.front.datagram import DatagramProxy
from lazyd.front.stream import StreamProxy
from lazyd.net.access import Access
from lazyd.net.binding import accept_queue_length
from lazyd.observe.logs import (
    ThrottledLog,
    activation_fields,
    activation_level,
    lifecycle_level,
    log_at,
)
from lazyd.readiness.notify import NotifySocket, belongs_to, open_notify_socket
from lazyd.readiness.probe import wait_connectable

LogFn = Callable[[str], None]

# How long after a pass-mode start lazyd looks for the service's first accept.
FIRST_ACCEPT_WINDOW = 2.0


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def describe_waiting(connections: int | None, datagrams: int | None) -> str | None:
    """`17 connections waiting`, `3 datagrams waiting`, or both; None when
    neither could be counted (a pass-mode datagram socket)."""
    parts = []
    if connections is not None and (connections or not datagrams):
        parts.append(_count(connections, "connection"))
    if datagrams is not None and (datagrams or connections is None):
        parts.append(_count(datagrams, "datagram"))
    return f"{' and '.join(parts)} waiting" if parts else None


def format_activation(name: str, record: Activation, waiting: str | None) -> str:
    """The one log line written for each start attempt; `waiting` as from
    `describe_waiting`."""
    if record.outcome is Outcome.READY:
        assert record.ready is not None and record.spawned is not None
        text = (
            f"{name}: ready in {_ms(record.ready - record.trigger)} "
            f"(spawn {_ms(record.spawned - record.trigger)}, "
            f"readiness {_ms(record.ready - record.spawned)})"
        )
        if waiting is not None:
            text += f", {waiting}"
        return text
    return f"{name}: start {record.outcome.value} ({record.reason})"


def strict_from_environment() -> bool:
    """LAZYD_STRICT=1 (the test suite sets it): a lifecycle event that does not
    fit its state raises, instead of being logged as a bug."""
    return os.environ.get("LAZYD_STRICT") == "1"


@dataclass
class Options:
    """What the daemon gives every runner besides its service's config."""

    nofile_soft: int | None = None
    strict: bool = field(default_factory=strict_from_environment)
    log: LogFn = stderr_log  # a lazyd.observe.logs.Logger also takes a level (see log_at)
    output: LogFn = stderr_log
    # Called as each start attempt ends, with the service's name (the metrics).
    on_activation: Callable[[str, StartRecord], None] | None = None


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
        self.machine = Lifecycle(config, trio.current_time(), strict=options.strict)
        self.process: ServiceProcess | None = None
        self.status_text: str | None = None
        self.main_pid: int | None = None  # MAINPID= may move it from the child we spawned
        self.history = StartHistory()
        self.changed = trio.Event()  # set and replaced on every state change
        self.finished = trio.Event()  # run() has returned
        self._nursery: trio.Nursery | None = None
        self._timer_scope = trio.CancelScope()
        self._timer_running = False
        self._armed = trio.Event()
        self._watch_scope: trio.CancelScope | None = None
        self._notify: NotifySocket | None = None
        self._dispatching = False
        # Set once the lifecycle has begun: traffic that a proxy accepts
        # before then waits, and starts the service right after.
        self._begun = False
        # Set once the daemon shuts down: no traffic starts the service again.
        self.closing = False
        # Proxy mode: lazyd accepts and forwards itself (one proxy per socket).
        self.proxies: list[StreamProxy | DatagramProxy] = []
        # allow/deny and max_connections_per_source: what the proxies refuse.
        self.access = Access(self.name, max_per_source=config.max_connections_per_source,
                             log=options.log)
        self._probe_scope: trio.CancelScope | None = None
        self._running_since = 0.0

    # -- public --------------------------------------------------------------

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
        if not self.proxies:
            return describe_waiting(self.queued(), None)
        streams = [p.waiting for p in self.proxies if not isinstance(p, DatagramProxy)]
        datagrams = [p.waiting for p in self.proxies if isinstance(p, DatagramProxy)]
        return describe_waiting(sum(streams) if streams else None,
                                sum(datagrams) if datagrams else None)

    def active(self) -> int | None:
        """Open proxied connections and datagram flows (proxy mode only)."""
        return sum(p.active for p in self.proxies) if self.proxies else None

    def refused(self) -> int | None:
        """Connections and datagrams refused by allow/deny or
        max_connections_per_source (proxy mode only)."""
        return self.access.refused if self.proxied else None

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
                    await self._run_watcher()
        finally:
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
        self.machine.config = config
        self._open_notify()  # in case it has just become `ready: notify`
        if list(sockets) != self.sockets:
            self.sockets = list(sockets)
            # Restart the wait on the new set; the watcher re-arms itself.
            if self._watch_scope is not None:
                self._watch_scope.cancel()

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
            self._nursery.start_soon(self._probe_upstreams, event.pid)

    # -- actions -------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Spawn():
                    assert self._nursery is not None
                    self._nursery.start_soon(self._run_process)
                    if self.on_spawn is not None:
                        self.on_spawn(self)
                case Kill(sig, group):
                    self._kill(sig, group)
                case Watch():
                    if self.proxied:
                        self._restart_if_held()
                    else:
                        self._armed.set()
                case Unwatch():
                    self._armed = trio.Event()
                    if self._watch_scope is not None:
                        self._watch_scope.cancel()
                case Log(text):
                    log_at(self.options.log, lifecycle_level(text), f"{self.name}: {text}")
                case Activation():
                    record = StartRecord.from_activation(action, trio.current_time())
                    if action.outcome is Outcome.READY:
                        record.held = self.queued()
                        if record.held and not self.proxied:
                            self._nursery_soon(self._watch_first_accept, record)
                    self.history.append(record)
                    log_at(self.options.log, activation_level(record),
                           format_activation(self.name, action, self._waiting_text()),
                           **activation_fields(record))
                    if self.options.on_activation is not None:
                        self.options.on_activation(self.name, record)
                case ReleaseHeld():
                    # Pass mode holds nothing itself: the kernel does.
                    self._running_since = trio.current_time()
                    for proxy in self.proxies:
                        proxy.release()
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

    def _kill(self, sig: signal.Signals, group: bool) -> None:
        if self.process is None:
            return
        if group:
            self.process.signal_group(sig)
        else:
            self.process.send_signal(sig)

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
            )
        return DatagramProxy(
            self.name, sock, sc.upstream,
            queue_limit=self.config.datagram_queue_limit,
            flow_timeout=self.config.flow_timeout, gate=gate,
            on_traffic=on_traffic, log=self.options.log,
        )

    def _nursery_soon(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _watch_first_accept(self, record: StartRecord) -> None:
        """Pass mode: note when the service first accepts, seen as its listeners'
        accept queues shrinking.  The kernel sends no event for that, so this
        samples, for at most FIRST_ACCEPT_WINDOW seconds after the start, at
        growing intervals (1 ms, then 25 % longer each time: ~35 samples in
        all), so that the measurement does not take the CPU from the start it
        measures (a Python service needs ~20 ms of it).  The time recorded is
        the middle between the last sample that saw every connection still
        queued and the first that saw one gone: within an eighth of the time
        since ready, either way."""
        assert record.held is not None
        step, before = 0.001, trio.current_time()
        with trio.move_on_after(FIRST_ACCEPT_WINDOW):
            while self.machine.state is State.RUNNING:
                queued = self.queued()
                now = trio.current_time()
                if queued is None or queued < record.held:
                    if queued is not None:
                        record.first_accept = (before + now) / 2
                    return
                before = now
                await trio.sleep(step)
                step *= 1.25

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

    async def _probe_upstreams(self, pid: int) -> None:
        """Readiness `connect`: ready once every stream upstream accepts.  A
        probe's connection carries the first client held on that socket."""
        with trio.CancelScope() as scope:
            self._probe_scope = scope
            for proxy in self.proxies:
                if not isinstance(proxy, StreamProxy):
                    continue
                connection = await wait_connectable(proxy.upstream, keep=proxy.held > 0)
                if connection is not None:
                    if self.machine.pid == pid and self.machine.state is State.STARTING:
                        proxy.adopt(connection)
                    else:
                        connection.close()
            if self.machine.pid == pid and self.machine.state is State.STARTING:
                self.dispatch(Ready())
        if self._probe_scope is scope:
            self._probe_scope = None

    async def _run_idle_stop(self) -> None:
        """Proxy mode: stop the service after idle_timeout with no open connection
        and no active datagram flow.  Waits on events only; no polling."""
        timeout = self.config.idle_timeout
        assert timeout is not None
        while True:
            deadline = math.inf
            if self.machine.state is State.RUNNING and not any(p.active for p in self.proxies):
                since = max([self._running_since, *(p.last_active_change for p in self.proxies)])
                deadline = since + timeout
            with trio.move_on_at(deadline) as scope:
                await _first_of([self.changed, *(p.activity_changed for p in self.proxies)])
            if scope.cancelled_caught:
                self.stop("idle")

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

    async def _run_watcher(self) -> None:
        """While armed, wait until one of the sockets is readable.

        One long-lived task does all the waiting, so no two tasks ever wait on
        the same fd (trio forbids it) however quickly Watch and Unwatch follow
        each other.  It never accepts or reads: the kernel keeps everything.
        """
        while True:
            await self._armed.wait()
            if self.closing:
                # Removed or shutting down: traffic stays queued in the kernel,
                # and the sockets may be closed any moment now.
                self._armed = trio.Event()
                continue
            closed = [sc.name for sc, sock in zip(self.config.sockets, self.sockets, strict=True)
                      if sock.fileno() == -1]
            if closed:
                # Whoever closes a socket must first take it from the runner
                # (reconfigure) or end the runner: waiting on it would fail,
                # and not waiting would spin.
                raise RuntimeError(f"{self.name}: asked to watch closed sockets {closed}")
            readable: list[str] = []
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                if len(self.sockets) == 1:
                    # Most services have one socket: wait here, without a
                    # nursery and a task (per idle service, they would be a
                    # fair part of an idle daemon's memory).
                    await _wait_readable(self.sockets[0], self.config.sockets[0].name, readable)
                else:
                    async with trio.open_nursery() as nursery:
                        for sc, sock in zip(self.config.sockets, self.sockets, strict=True):
                            nursery.start_soon(
                                _wait_readable, sock, sc.name, readable, nursery.cancel_scope
                            )
            self._watch_scope = None
            if self.closing:
                self._armed = trio.Event()  # shutting down: traffic stays queued
            elif readable and self._armed.is_set():
                self.start(f"traffic on {readable[0]}")

    async def _run_process(self) -> None:
        # What the service is handed (its sockets in pass mode only, its notify
        # socket for ready: notify only) is decided in one place, with the table.
        spec = launch.service_spec(
            self.config,
            self.options.nofile_soft,
            sockets=self.sockets,
            notify_socket=self._notify,
        )
        try:
            process = await launch.open_service_process(spec)
        except LaunchError as exc:
            # The log line gets the service's name in front anyway.
            self.dispatch(SpawnFailed(str(exc).removeprefix(f"{self.name}: ")))
            return
        self.process = process
        self.main_pid = process.pid
        self.status_text = None
        try:
            self.dispatch(Spawned(process.pid))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay, process.stdout)
                # Whatever the service left behind in its process group goes
                # with it (the spawner kills the group as it reaps the process),
                # so that a stopped service is really gone.
                returncode = await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.signal_group(signal.SIGKILL)
                    await process.wait()
        self.process = None
        self.main_pid = None
        self.dispatch(Exited(returncode))

    async def _relay(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            await launch.relay_output(self.name, stream, self.options.output)
        finally:
            await stream.aclose()

    async def _run_notify(self, notify: NotifySocket) -> None:
        # Any local process can write to the socket (an abstract name has no
        # file mode): what it sends is logged once per sender, and no sender,
        # however many pids it uses, can flood the log.
        warned: set[int] = set()
        junk, foreign = ThrottledLog(self.options.log), ThrottledLog(self.options.log)
        while True:
            try:
                message = await notify.receive()
            except ValueError as exc:
                junk.say(f"{self.name}: ignoring malformed notify message: {exc}", "more ignored")
                continue
            main = self.main_pid
            if main is None or not belongs_to(message.pid, main):
                if message.pid not in warned:
                    line = (f"{self.name}: ignoring notify message from pid {message.pid}, "
                            "which is not one of the service's processes")
                    if len(warned) < 64:  # once per sender, for the first 64 senders
                        warned.add(message.pid)
                        self.options.log(line)
                    else:
                        foreign.say(line, "more ignored")
                continue
            if message.status is not None:
                self.status_text = message.status
            if message.mainpid is not None and message.mainpid != main:
                if message.uid == 0 or belongs_to(message.mainpid, main):
                    self.main_pid = message.mainpid
                else:
                    # MAINPID=1 would make every process on the machine "one
                    # of the service's" and let any local user send READY=1
                    # for it.  Only root may name a pid outside the service.
                    foreign.say(f"{self.name}: ignoring MAINPID={message.mainpid}, which is "
                                "not one of the service's processes", "more ignored")
            if message.stopping:
                self.options.log(f"{self.name}: service says it is stopping")
            if message.ready:
                self.dispatch(Ready())


async def _first_of(events: Sequence[trio.Event]) -> None:
    """Return as soon as one of the events is set."""
    async with trio.open_nursery() as nursery:
        for event in events:
            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


async def _wait_readable(
    sock: socket.socket, name: str, readable: list[str], done: trio.CancelScope | None = None
) -> None:
    try:
        await trio.lowlevel.wait_readable(sock)
    except trio.ClosedResourceError:
        return  # a reload closed it; the watcher starts over with the new set
    readable.append(name)
    if done is not None:
        done.cancel()
