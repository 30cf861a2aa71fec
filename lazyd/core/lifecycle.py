"""The life of one service, as plain logic: events in, actions out.

Nothing here touches a socket, a process or a clock.  The daemon feeds each
event together with the current time to `Lifecycle.handle()` and carries out
the actions it returns; whenever `Lifecycle.deadline` is set it sends `Tick()`
once that time has come.  Keeping it pure lets the tests drive every path with
exact times, and lets hypothesis look for sequences that break the promises:

- at most one process per service, and no spawn before the last one is reaped;
- lazyd watches the sockets exactly while the service is idle;
- no more than `start_limit` starts within `start_limit_interval` (a start
  that became ready and that lazyd stopped on purpose does not count);
- a service never waits forever: every non-idle state has a way out.

Events are of two kinds.  Requests (`Start`, `Stop`, `Tick`) may come in any
state: a Start for a service already on its way, or a Stop for one that is
idle, simply has nothing to do.  Reports (`Spawned`, `SpawnFailed`,
`Exited`, `Ready`) answer something the machine asked for or a process that
it knows of; a report that does not fit (an exit with no process, a second
Spawned) means the driver lost track, and that is a bug, raised here as
`UnexpectedEvent` at its source (h11's rule) instead of being ignored.
A machine built with `strict=False`, as the daemon's are unless LAZYD_STRICT
is set, logs such a report as a bug and goes on: one confused service must
not end the daemon that holds every other service's sockets.  The one
report that may come late for real is `Ready` from a running (or stopping)
service: a notify service may say READY=1 again after reloading itself.

    idle ──Start──▶ starting ──Ready──▶ running
      ▲               │  ▲                 │
      │  Exited       │  │ Exited, restart │ Stop / Exited
      │               ▼  │ (after backoff) ▼
      └──────────── stopping ◀─────────── (stop signal, then SIGKILL)
    failed: the start limit was hit; back to idle once the interval has passed.
"""

from __future__ import annotations

import contextlib
import enum
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from lazyd.core.policy import Policy, ReadyKind, Restart
from lazyd.levels import Level

# The first restart waits this long; each further one in a row waits twice as
# long, up to the cap.  Readiness resets the sequence.
RESTART_BACKOFF_FIRST = 0.1
RESTART_BACKOFF_MAX = 5.0


class State(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


class Outcome(enum.Enum):
    READY = "ready"
    FAILED = "failed"  # exited, or could not be executed, before it was ready
    TIMED_OUT = "timed out"


# --- events -----------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Something wants the service running: traffic, boot, or a dependent."""

    reason: str = "traffic"


@dataclass(frozen=True)
class Spawned:
    """The service was started (after a Spawn action): a process executed, or a
    container started.  `handle` names that one start: a pid, a container id."""

    handle: int | str


@dataclass(frozen=True)
class SpawnFailed:
    """The process could not be executed (after a Spawn action)."""

    reason: str


@dataclass(frozen=True)
class Ready:
    """The service said it is ready (notify) or the daemon found it ready."""


@dataclass(frozen=True)
class Exited:
    """The main process was reaped.  `returncode` as subprocess gives it:
    negative for a signal."""

    returncode: int


@dataclass(frozen=True)
class Stop:
    """Stop the service: shutdown, idle timeout or reload."""

    reason: str


@dataclass(frozen=True)
class Tick:
    """The deadline the machine asked for has come."""


Event = Start | Spawned | SpawnFailed | Ready | Exited | Stop | Tick


# --- actions ----------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Execute the service; answer with Spawned or SpawnFailed."""


@dataclass(frozen=True)
class Kill:
    """Send a signal to the main process, or to its whole process group."""

    signal: signal.Signals
    group: bool = False


@dataclass(frozen=True)
class Watch:
    """Wait for traffic on the service's sockets (pass mode: readability)."""


@dataclass(frozen=True)
class Unwatch:
    """Stop waiting for traffic: the service has the sockets now."""


@dataclass(frozen=True)
class Log:
    """A line for the log, about this service, and how much it matters."""

    text: str
    level: Level = Level.INFO


@dataclass(frozen=True)
class Activation:
    """One start attempt has ended.  Times are the daemon's clock, in seconds."""

    outcome: Outcome
    reason: str
    trigger: float
    spawned: float | None
    ready: float | None

    @property
    def total(self) -> float | None:
        return None if self.ready is None else self.ready - self.trigger


@dataclass(frozen=True)
class ReleaseHeld:
    """The service is ready: hand it whatever lazyd holds for it."""


@dataclass(frozen=True)
class DropHeld:
    """The start failed: close whatever lazyd holds for it, saying why."""

    reason: str


Action = Spawn | Kill | Watch | Unwatch | Log | Activation | ReleaseHeld | DropHeld


class UnexpectedEvent(Exception):
    """A report that does not fit the machine's state: a bug in its driver."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _due(at: float | None, now: float) -> float | None:
    """`at` if that time has come, else None."""
    return at if at is not None and now >= at else None


class Lifecycle:
    """The state machine of one service.  See the module docstring."""

    def __init__(self, policy: Policy, now: float = 0.0, *, strict: bool = True) -> None:
        self.policy = policy  # may be replaced (a reload): it applies from the next event
        self.strict = strict  # raise UnexpectedEvent (else log it as a bug and go on)
        self.state = State.IDLE
        self.instance: int | str | None = None  # the started service's handle (Spawned)
        # True from the Spawn action until the process is reaped (or failed
        # to execute): the one flag that guards against a second process.
        self.process = False
        self.watching = False
        self.activations = 0
        self.last: Activation | None = None
        self.deadline: float | None = None
        # Start times within the interval, oldest first: at most start_limit
        # of them, so a list (a deque's first block alone is 600 bytes, and
        # an idle daemon keeps one of these per service).
        self._starts: list[float] = []
        self._started_at = now  # when the current process's start was counted
        self._was_ready = False  # the current process became ready
        self._reason = ""
        self._trigger = now
        self._spawned: float | None = None
        self._ready_at: float | None = None  # ready: {delay} elapses
        self._timeout_at: float | None = None  # start_timeout elapses
        self._kill_at: float | None = None  # stop_timeout elapses
        self._restart_at: float | None = None
        self._failed_until: float | None = None
        self._restarts_in_a_row = 0
        self._stop_reason: str | None = None
        self._start_failed = False  # the process now stopping never became ready

    # -- entry point ---------------------------------------------------------

    def begin(self, now: float) -> list[Action]:
        """The first actions: hold the sockets and wait for traffic."""
        return self.handle(Tick(), now)

    def handle(self, event: Event, now: float) -> list[Action]:
        actions: list[Action] = []
        match event:
            case Start(reason):
                self._on_start(reason, now, actions)
            case Spawned(handle):
                if not self.process or self.instance is not None:
                    return self._misfit(event)
                self._on_spawned(handle, now, actions)
            case SpawnFailed(reason):
                if not self.process or self.instance is not None:
                    return self._misfit(event)
                self._on_spawn_failed(reason, now, actions)
            case Ready():
                if self.instance is None:
                    return self._misfit(event)
                if self.state is State.STARTING:
                    self._become_ready(now, actions)
                # else: running or stopping, and it says so again; nothing to do.
            case Exited(returncode):
                if not self.process or self.instance is None:
                    return self._misfit(event)
                self._on_exited(returncode, now, actions)
            case Stop(reason):
                self._on_stop(reason, now, actions)
            case Tick():
                self._on_tick(now, actions)
        self._sync_watch(actions)
        self._update_deadline()
        return actions

    def _misfit(self, event: Event) -> list[Action]:
        """A report that does not fit: raise, or (not strict) say so and change nothing."""
        process = "no process" if not self.process else (
            "a process being executed" if self.instance is None else f"service {self.instance}")
        text = f"{type(event).__name__} does not fit state {self.state.value} with {process}"
        if self.strict:
            raise UnexpectedEvent(text)
        return [Log(f"bug: ignoring an event that {text}", Level.ERR)]

    # -- transitions ---------------------------------------------------------

    def _on_start(self, reason: str, now: float, actions: list[Action]) -> None:
        if self.state is not State.IDLE:
            return  # already on its way, or failed until the interval passes
        self._restart_at = None
        self._trigger = now
        self._reason = reason
        self._spawn(now, actions)

    def _spawn(self, now: float, actions: list[Action]) -> None:
        """Start a process unless the start limit forbids it."""
        interval = self.policy.start_limit_interval
        # `start + interval`, never `now - interval`: it is the sum `failed`
        # waits for, so a start always counts for exactly its interval and
        # rounding cannot keep it one Tick too long (0.001 + 10 - 10 < 0.001).
        while self._starts and self._starts[0] + interval <= now:
            del self._starts[0]
        if len(self._starts) >= self.policy.start_limit:
            self.state = State.FAILED
            self._failed_until = now + interval
            text = (
                f"{self.policy.start_limit} starts within {_seconds(interval)}; "
                f"not starting again for {_seconds(interval)}"
            )
            actions.append(Log(f"failed: {text}", Level.ERR))
            actions.append(DropHeld(text))
            return
        self._starts.append(now)
        self._started_at = now
        self._was_ready = False
        self.state = State.STARTING
        self.process = True
        self.instance = None
        self._spawned = None
        self._ready_at = None
        self._start_failed = False
        self._stop_reason = None
        self._timeout_at = now + self.policy.start_timeout
        self.activations += 1
        actions.append(Spawn())

    def _on_spawned(self, handle: int | str, now: float, actions: list[Action]) -> None:
        self.instance = handle
        self._spawned = now
        if self.state is State.STOPPING:
            # A stop was asked for while the process was being executed.
            actions.append(Kill(self.policy.stop_signal))
            self._kill_at = now + self.policy.stop_timeout
            return
        ready = self.policy.ready
        if ready.kind is ReadyKind.STARTED:
            self._become_ready(now, actions)
        elif ready.kind is ReadyKind.DELAY:
            self._ready_at = now + ready.delay
            if ready.delay <= 0:
                self._become_ready(now, actions)

    def _on_spawn_failed(self, reason: str, now: float, actions: list[Action]) -> None:
        self.process = False
        actions.append(Log(reason, Level.ERR))  # the command could not be executed
        if self.state is State.STOPPING:
            self._kill_at = None
            if self._start_failed:
                # Timed out before it was even executed: a failed start like
                # any other, restarted per policy (as Exited would be).
                self._after_exit(failed=True, now=now, actions=actions)
            else:
                self._go_idle(actions)
            return
        if self.state is State.STARTING:
            self._record(Outcome.FAILED, now, actions)
            actions.append(DropHeld(reason))
        self._after_exit(failed=True, now=now, actions=actions)

    def _become_ready(self, now: float, actions: list[Action]) -> None:
        self.state = State.RUNNING
        self._was_ready = True
        self._ready_at = None
        self._timeout_at = None
        self._restarts_in_a_row = 0
        self._record(Outcome.READY, now, actions)
        actions.append(ReleaseHeld())

    def _on_exited(self, returncode: int, now: float, actions: list[Action]) -> None:
        self.process = False
        self.instance = None
        self._kill_at = None
        how = describe_exit(returncode)
        if self.state is State.STOPPING:
            if self._stop_reason is not None:
                actions.append(Log(f"stopped ({self._stop_reason}): {how}"))
            failed = self._start_failed
            if self._stop_reason is not None and not failed:
                # Stopped on purpose: idle until the next traffic.  A start
                # that became ready and that lazyd itself ended (idle, reload)
                # is no part of a crash loop: it stops counting towards the
                # start limit, or a service used just more often than its
                # idle_timeout would end up `failed`.
                if self._was_ready:
                    with contextlib.suppress(ValueError):
                        self._starts.remove(self._started_at)
                self._go_idle(actions)
                return
            self._after_exit(failed=failed, now=now, actions=actions)
            return
        if self.state is State.STARTING:
            text = f"{how} before it was ready"
            actions.append(Log(text, Level.ERR))
            self._record(Outcome.FAILED, now, actions)
            actions.append(DropHeld(text))
            self._after_exit(failed=True, now=now, actions=actions)
            return
        # A process that died on its own: a crash (or a signal) is a warning.
        actions.append(Log(how, Level.INFO if returncode == 0 else Level.WARNING))
        self._after_exit(failed=returncode != 0, now=now, actions=actions)

    def _after_exit(self, *, failed: bool, now: float, actions: list[Action]) -> None:
        """The process is gone: restart it, or hold the sockets again."""
        restart = self.policy.restart
        if restart is Restart.ALWAYS or (restart is Restart.ON_FAILURE and failed):
            delay = min(
                RESTART_BACKOFF_FIRST * 2**self._restarts_in_a_row, RESTART_BACKOFF_MAX
            )
            self._restarts_in_a_row += 1
            self._restart_at = now + delay
            actions.append(Log(f"restarting in {delay * 1000:g} ms ({restart.value})"))
        self._go_idle(actions)

    def _go_idle(self, actions: list[Action]) -> None:
        self.state = State.IDLE
        self._timeout_at = None
        self._ready_at = None
        self._stop_reason = None

    def _on_stop(self, reason: str, now: float, actions: list[Action]) -> None:
        if self.state in (State.IDLE, State.FAILED):
            self._restart_at = None
            return
        if self.state is State.STOPPING:
            if self._start_failed:
                # Being stopped after a start timeout, which would restart it
                # once it exits: the explicit stop wins, no restart follows.
                self._start_failed = False
                self._stop_reason = reason
            return
        if self.state is State.STARTING:
            actions.append(DropHeld(f"stopped before it was ready ({reason})"))
        self._stop(reason, now, actions)

    def _stop(self, reason: str, now: float, actions: list[Action]) -> None:
        self.state = State.STOPPING
        self._stop_reason = reason
        self._timeout_at = None
        self._ready_at = None
        if self.instance is not None:
            actions.append(Kill(self.policy.stop_signal))
            self._kill_at = now + self.policy.stop_timeout
        # else: still being executed; Spawned will send the signal.

    def _on_tick(self, now: float, actions: list[Action]) -> None:
        if self.state is State.STARTING:
            # A late Tick may find both due: whichever came first decides, and
            # a ready delay that ends exactly at the start timeout is in time.
            ready = _due(self._ready_at, now)
            timeout = _due(self._timeout_at, now)
            if ready is not None and (timeout is None or ready <= timeout):
                self._become_ready(now, actions)
            elif timeout is not None:
                text = f"not ready within {_seconds(self.policy.start_timeout)}"
                actions.append(Log(f"start timed out: {text}", Level.ERR))
                self._record(Outcome.TIMED_OUT, now, actions)
                actions.append(DropHeld(text))
                self._stop("start timeout", now, actions)
                self._start_failed = True
        elif self.state is State.STOPPING:
            if self._kill_at is not None and now >= self._kill_at:
                actions.append(
                    Log(f"still running {_seconds(self.policy.stop_timeout)} after "
                        f"{self.policy.stop_signal.name}; sending SIGKILL", Level.WARNING)
                )
                actions.append(Kill(signal.SIGKILL, group=True))
                self._kill_at = None
        elif self.state is State.FAILED:
            if self._failed_until is not None and now >= self._failed_until:
                self._failed_until = None
                self.state = State.IDLE
                actions.append(Log("start limit interval over; waiting for traffic again"))
        elif self.state is State.IDLE:
            if self._restart_at is not None and now >= self._restart_at:
                self._restart_at = None
                self._trigger = now
                self._reason = "restart"
                self._spawn(now, actions)

    # -- bookkeeping ---------------------------------------------------------

    def _record(self, outcome: Outcome, now: float, actions: list[Action]) -> None:
        record = Activation(
            outcome=outcome,
            reason=self._reason,
            trigger=self._trigger,
            spawned=self._spawned,
            ready=now if outcome is Outcome.READY else None,
        )
        self.last = record
        actions.append(record)

    def _sync_watch(self, actions: list[Action]) -> None:
        want = self.state is State.IDLE
        if want and not self.watching:
            actions.append(Watch())
        elif self.watching and not want:
            actions.append(Unwatch())
        self.watching = want

    def _update_deadline(self) -> None:
        candidates: Sequence[float | None]
        if self.state is State.STARTING:
            candidates = (self._ready_at, self._timeout_at)
        elif self.state is State.STOPPING:
            candidates = (self._kill_at,)
        elif self.state is State.FAILED:
            candidates = (self._failed_until,)
        else:
            candidates = (self._restart_at,)
        times = [t for t in candidates if t is not None]
        self.deadline = min(times) if times else None
