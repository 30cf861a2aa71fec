"""One service, driven: the trio layer that carries out the lifecycle's actions.

`Lifecycle` decides; `ServiceRunner` does.  Events reach the machine through
`dispatch()`, which runs synchronously (trio is single-threaded, so no event
can interleave with another) and carries out the returned actions at once;
anything that must wait (executing the command, reaping the process, waiting
for readable sockets) runs in a task of the runner's nursery and dispatches
its result when it comes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from lazyd import launch
from lazyd.config import ReadyKind, ServiceConfig
from lazyd.errors import LaunchError
from lazyd.lifecycle import (
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
from lazyd.notify import NotifySocket, belongs_to, open_notify_socket
from lazyd.sockets import accept_queue_length

LogFn = Callable[[str], None]


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def format_activation(name: str, record: Activation, waiting: int | None) -> str:
    """The one log line written for each start attempt."""
    if record.outcome is Outcome.READY:
        assert record.ready is not None and record.spawned is not None
        text = (
            f"{name}: ready in {_ms(record.ready - record.trigger)} "
            f"(spawn {_ms(record.spawned - record.trigger)}, "
            f"readiness {_ms(record.ready - record.spawned)})"
        )
        if waiting is not None:
            text += f", {waiting} connection{'s' if waiting != 1 else ''} waiting"
        return text
    return f"{name}: start {record.outcome.value} ({record.reason})"


@dataclass
class Options:
    """What the daemon gives every runner besides its service's config."""

    nofile_soft: int | None = None
    log: LogFn = stderr_log
    output: LogFn = stderr_log


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
        self.machine = Lifecycle(config, trio.current_time())
        self.process: trio.Process | None = None
        self.status_text: str | None = None
        self.main_pid: int | None = None  # MAINPID= may move it from the child we spawned
        self.history: list[Activation] = []
        self.changed = trio.Event()  # set and replaced on every state change
        self._nursery: trio.Nursery | None = None
        self._timer_scope = trio.CancelScope()
        self._armed = trio.Event()
        self._watch_scope: trio.CancelScope | None = None
        self._notify: NotifySocket | None = None
        self._dispatching = False
        # Set once the daemon shuts down: no traffic starts the service again.
        self.closing = False

    # -- public --------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.machine.state

    def queued(self) -> int | None:
        """Connections waiting in the kernel's accept queues (TCP only)."""
        counts = [accept_queue_length(s) for s in self.sockets]
        known = [c for c in counts if c is not None]
        return sum(known) if known else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the sockets and serve traffic until cancelled."""
        try:
            # Every service gets a notify socket, so that a reload may switch
            # it to `ready: notify` without a new one.
            self._notify = open_notify_socket(self.name)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._run_timer)
                nursery.start_soon(self._run_watcher)
                if self._notify is not None:
                    nursery.start_soon(self._run_notify, self._notify)
                self._apply(self.machine.begin(trio.current_time()))
                task_status.started()
        finally:
            if self._notify is not None:
                self._notify.close()

    def cancel(self) -> None:
        """End run(): for a service that was removed and has stopped."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def reconfigure(self, config: ServiceConfig, sockets: Sequence[socket.socket]) -> None:
        """Take new settings; they apply from the next start.  New sockets are
        watched from now on (the caller closes the ones no longer used)."""
        self.config = config
        self.machine.config = config
        if list(sockets) != self.sockets:
            self.sockets = list(sockets)
            # Restart the wait on the new set; the watcher re-arms itself.
            if self._watch_scope is not None:
                self._watch_scope.cancel()

    def start(self, reason: str) -> None:
        if not self.closing:
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
                    self._armed.set()
                case Unwatch():
                    self._armed = trio.Event()
                    if self._watch_scope is not None:
                        self._watch_scope.cancel()
                case Log(text):
                    self.options.log(f"{self.name}: {text}")
                case Activation():
                    self.history.append(action)
                    del self.history[:-100]
                    waiting = self.queued() if action.outcome is Outcome.READY else None
                    self.options.log(format_activation(self.name, action, waiting))
                case ReleaseHeld() | DropHeld():
                    pass  # pass mode holds nothing itself: the kernel does
        deadline = self.machine.deadline
        self._timer_scope.deadline = math.inf if deadline is None else deadline
        self.changed.set()
        self.changed = trio.Event()

    def _kill(self, sig: signal.Signals, group: bool) -> None:
        if self.process is None:
            return
        if group:
            launch.signal_group(self.process, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    # -- tasks ---------------------------------------------------------------

    async def _run_timer(self) -> None:
        """Send Tick whenever the machine's deadline passes."""
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                deadline = self.machine.deadline
                scope.deadline = math.inf if deadline is None else deadline
                await trio.sleep_forever()
            if scope.cancelled_caught:
                self.dispatch(Tick())

    async def _run_watcher(self) -> None:
        """While armed, wait until one of the sockets is readable.

        One long-lived task does all the waiting, so no two tasks ever wait on
        the same fd (trio forbids it) however quickly Watch and Unwatch follow
        each other.  It never accepts or reads: the kernel keeps everything.
        """
        while True:
            await self._armed.wait()
            readable: list[str] = []
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                async with trio.open_nursery() as nursery:
                    for sc, sock in zip(self.config.sockets, self.sockets, strict=True):
                        nursery.start_soon(_wait_readable, sock, sc.name, readable, nursery)
            self._watch_scope = None
            if self.closing:
                self._armed = trio.Event()  # shutting down: traffic stays queued
            elif readable and self._armed.is_set():
                self.start(f"traffic on {readable[0]}")

    async def _run_process(self) -> None:
        env_fds = [s.fileno() for s in self.sockets]
        spec = launch.LaunchSpec(
            name=self.name,
            command=self.config.command,
            fds=env_fds,
            fd_names=[sc.name for sc in self.config.sockets],
            environment=self.config.environment,
            path=self.config.environment.get("PATH"),
            user=self.config.user,
            group=self.config.group,
            workdir=self.config.workdir,
            notify_socket=(
                self._notify.address
                if self._notify is not None and self.config.ready.kind is ReadyKind.NOTIFY
                else None
            ),
            nofile_soft=self.options.nofile_soft,
        )
        try:
            process = await launch.open_service_process(spec)
        except LaunchError as exc:
            self.dispatch(SpawnFailed(str(exc)))
            return
        self.process = process
        self.main_pid = process.pid
        self.status_text = None
        try:
            self.dispatch(Spawned(process.pid))
            async with trio.open_nursery() as nursery:
                if process.stdout is not None:
                    nursery.start_soon(self._relay, process.stdout)
                returncode = await process.wait()
                # Whatever the service left behind in its process group goes
                # with it, so that a stopped service is really gone.
                launch.signal_group(process, signal.SIGKILL)
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    launch.signal_group(process, signal.SIGKILL)
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
        warned: set[int] = set()
        while True:
            try:
                message = await notify.receive()
            except ValueError as exc:
                self.options.log(f"{self.name}: ignoring malformed notify message: {exc}")
                continue
            main = self.main_pid
            if main is None or not belongs_to(message.pid, main):
                if message.pid not in warned:
                    if len(warned) < 64:  # warn once per sender, within bounds
                        warned.add(message.pid)
                    self.options.log(
                        f"{self.name}: ignoring notify message from pid {message.pid}, "
                        "which is not one of the service's processes"
                    )
                continue
            if message.status is not None:
                self.status_text = message.status
            if message.mainpid is not None:
                self.main_pid = message.mainpid
            if message.stopping:
                self.options.log(f"{self.name}: service says it is stopping")
            if message.ready:
                self.dispatch(Ready())


async def _wait_readable(
    sock: socket.socket, name: str, readable: list[str], nursery: trio.Nursery
) -> None:
    try:
        await trio.lowlevel.wait_readable(sock)
    except trio.ClosedResourceError:
        return  # a reload closed it; the watcher starts over with the new set
    readable.append(name)
    nursery.cancel_scope.cancel()
