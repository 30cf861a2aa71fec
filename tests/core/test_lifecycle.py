"""lazyd.core.lifecycle: exact-time table tests, and hypothesis hunting for broken promises."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from lazyd.config import Ready as ReadyConfig
from lazyd.config import ReadyKind, Restart, ServiceConfig
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
    UnexpectedEvent,
    Unwatch,
    Watch,
)
from lazyd.levels import Level

STARTED = ReadyConfig(ReadyKind.STARTED)
NOTIFY = ReadyConfig(ReadyKind.NOTIFY)


def config(**changes: object) -> ServiceConfig:
    """A service with the config defaults, changed as the test says."""
    base = ServiceConfig(name="svc", command=("x",), sockets=())
    return replace(base, **changes)  # type: ignore[arg-type]


def begun(cfg: ServiceConfig, now: float = 0.0) -> Lifecycle:
    machine = Lifecycle(cfg.policy, now)
    assert machine.begin(now) == [Watch()]
    return machine


def running(cfg: ServiceConfig, pid: int = 100) -> Lifecycle:
    """A machine whose process was started at 0 and is ready (ready: started)."""
    machine = begun(replace(cfg, ready=STARTED))
    assert machine.handle(Start(), 0.0) == [Spawn(), Unwatch()]
    machine.handle(Spawned(pid), 0.0)
    assert machine.state is State.RUNNING
    return machine


def where(machine: Lifecycle) -> tuple[State, float | None]:
    """State and deadline, read fresh (no narrowing left over from earlier asserts)."""
    return machine.state, machine.deadline


def snapshot(machine: Lifecycle) -> tuple[object, ...]:
    return (
        machine.state, machine.instance, machine.process, machine.watching,
        machine.activations, machine.last, machine.deadline,
    )


# --- a start, step by step ------------------------------------------------------------------


def test_traffic_spawns_and_started_is_ready_at_spawned() -> None:
    """Traffic spawns at once; with ready=started the service is ready when it is executed."""
    machine = begun(config())
    assert machine.handle(Start(), 0.0) == [Spawn(), Unwatch()]
    assert (machine.state, machine.process, machine.instance, machine.watching) == (
        State.STARTING, True, None, False)
    assert machine.activations == 1
    record = Activation(Outcome.READY, "traffic", trigger=0.0, spawned=0.003, ready=0.003)
    assert machine.handle(Spawned(42), 0.003) == [record, ReleaseHeld()]
    assert (machine.state, machine.instance, machine.last, machine.deadline) == (
        State.RUNNING, 42, record, None)
    assert record.total == 0.003


def test_ready_delay_sets_a_deadline_and_tick_makes_it_ready() -> None:
    """ready: {delay: 0.2} after Spawned at 0.003 is ready at exactly 0.203, not before."""
    machine = begun(config(ready=ReadyConfig(ReadyKind.DELAY, 0.2)))
    machine.handle(Start("boot"), 0.0)
    assert machine.handle(Spawned(42), 0.003) == []
    assert where(machine) == (State.STARTING, 0.203)
    assert machine.handle(Tick(), 0.2) == []
    assert where(machine) == (State.STARTING, 0.203)
    record = Activation(Outcome.READY, "boot", trigger=0.0, spawned=0.003, ready=0.203)
    assert machine.handle(Tick(), 0.203) == [record, ReleaseHeld()]
    assert (machine.state, machine.deadline) == (State.RUNNING, None)


def test_ready_notify_waits_for_ready_event() -> None:
    """ready: notify stays starting (start_timeout pending) until the Ready event."""
    machine = begun(config(ready=NOTIFY, start_timeout=2.0))
    machine.handle(Start(), 1.0)
    assert machine.handle(Spawned(42), 1.01) == []
    assert where(machine) == (State.STARTING, 3.0)
    record = Activation(Outcome.READY, "traffic", trigger=1.0, spawned=1.01, ready=1.5)
    assert machine.handle(Ready(), 1.5) == [record, ReleaseHeld()]
    assert where(machine) == (State.RUNNING, None)


def test_start_timeout_stops_then_kills_the_group_then_idles() -> None:
    """Not ready in start_timeout: stop signal, SIGKILL to the group after stop_timeout, idle."""
    cfg = config(ready=NOTIFY, start_timeout=1.0, stop_timeout=0.5, stop_signal=signal.SIGINT)
    machine = begun(cfg)
    machine.handle(Start(), 0.0)
    machine.handle(Spawned(42), 0.01)
    assert where(machine) == (State.STARTING, 1.0)
    assert machine.handle(Tick(), 1.0) == [
        Log("start timed out: not ready within 1 s", Level.ERR),
        Activation(Outcome.TIMED_OUT, "traffic", trigger=0.0, spawned=0.01, ready=None),
        DropHeld("not ready within 1 s"),
        Kill(signal.SIGINT),
    ]
    assert where(machine) == (State.STOPPING, 1.5)
    assert machine.process
    assert machine.handle(Tick(), 1.5) == [
        Log("still running 0.5 s after SIGINT; sending SIGKILL", Level.WARNING),
        Kill(signal.SIGKILL, group=True),
    ]
    assert where(machine) == (State.STOPPING, None)
    assert machine.handle(Exited(-9), 1.6) == [
        Log("stopped (start timeout): killed by SIGKILL"), Watch()]
    assert where(machine) == (State.IDLE, None)
    assert (machine.process, machine.instance) == (False, None)


def test_stop_while_running_sends_stop_signal_and_idles_on_exit() -> None:
    """Stop sends the stop signal once; the exit brings idle and Watch, with no restart."""
    machine = running(config(restart=Restart.ALWAYS, stop_timeout=3.0))
    assert machine.handle(Stop("idle timeout"), 5.0) == [Kill(signal.SIGTERM)]
    assert (machine.state, machine.deadline) == (State.STOPPING, 8.0)
    assert machine.handle(Stop("shutdown"), 6.0) == []
    assert machine.handle(Exited(-15), 6.5) == [
        Log("stopped (idle timeout): killed by SIGTERM"), Watch()]
    assert (machine.state, machine.deadline) == (State.IDLE, None)


# --- restarts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "returncode", "restarts"),
    [
        (Restart.NO, 1, False),
        (Restart.NO, 0, False),
        (Restart.ON_FAILURE, 1, True),
        (Restart.ON_FAILURE, -9, True),
        (Restart.ON_FAILURE, 0, False),
        (Restart.ALWAYS, 0, True),
        (Restart.ALWAYS, 3, True),
    ],
)
def test_exit_while_running_restarts_per_policy(
    restart: Restart, returncode: int, restarts: bool
) -> None:
    """An exit of a running service restarts after 100 ms exactly when the policy says so."""
    machine = running(config(restart=restart))
    actions = machine.handle(Exited(returncode), 2.0)
    assert machine.state is State.IDLE and actions[-1] == Watch()
    assert machine.process is False and machine.instance is None
    if restarts:
        assert Log(f"restarting in 100 ms ({restart.value})") in actions
        assert where(machine) == (State.IDLE, 2.1)
        assert machine.handle(Tick(), 2.1) == [Spawn(), Unwatch()]
        assert where(machine) == (State.STARTING, 2.1 + 30.0)
    else:
        assert machine.deadline is None
        assert machine.handle(Tick(), 2.1) == []


def test_restart_backoff_doubles_up_to_the_cap_and_readiness_resets_it() -> None:
    """Failures in a row wait 0.1, 0.2, 0.4 … 5 s (capped); becoming ready starts over at 0.1."""
    machine = begun(config(ready=NOTIFY, restart=Restart.ON_FAILURE, start_limit=100,
                           start_limit_interval=1.0))
    machine.handle(Start(), 0.0)
    now, delays = 0.0, []
    for pid in range(10):
        machine.handle(Spawned(pid), now)
        machine.handle(Exited(1), now)
        assert machine.deadline is not None
        delays.append(round(machine.deadline - now, 9))
        now = machine.deadline
        assert machine.handle(Tick(), now) == [Spawn(), Unwatch()]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
    machine.handle(Spawned(50), now)
    machine.handle(Ready(), now)
    machine.handle(Exited(1), now)
    assert machine.deadline == now + 0.1


def test_failed_start_is_recorded_and_restarted_per_policy() -> None:
    """An exit before ready is a failed activation, drops what is held, restarts (on-failure)."""
    machine = begun(config(ready=NOTIFY, restart=Restart.ON_FAILURE))
    machine.handle(Start(), 0.0)
    machine.handle(Spawned(7), 0.25)
    record = Activation(Outcome.FAILED, "traffic", trigger=0.0, spawned=0.25, ready=None)
    assert machine.handle(Exited(2), 0.5) == [
        Log("exited with status 2 before it was ready", Level.ERR),
        record,
        DropHeld("exited with status 2 before it was ready"),
        Log("restarting in 100 ms (on-failure)"),
        Watch(),
    ]
    assert (machine.state, machine.deadline, machine.last) == (State.IDLE, 0.6, record)
    assert machine.handle(Tick(), 0.6) == [Spawn(), Unwatch()]
    machine.handle(Spawned(8), 0.7)
    assert machine.handle(Ready(), 0.75) == [
        Activation(Outcome.READY, "restart", trigger=0.6, spawned=0.7, ready=0.75),
        ReleaseHeld(),
    ]


def test_traffic_during_restart_backoff_starts_at_once_and_only_once() -> None:
    """Traffic while a restart is pending spawns now; the restart deadline is gone."""
    machine = running(config(restart=Restart.ALWAYS))
    machine.handle(Exited(0), 1.0)
    assert machine.deadline == 1.1
    assert machine.handle(Start(), 1.05) == [Spawn(), Unwatch()]
    assert machine.deadline == 1.05 + 30.0
    assert machine.handle(Tick(), 1.1) == []


def test_stop_in_idle_cancels_a_pending_restart() -> None:
    """Stop while a restart waits for its backoff cancels that restart."""
    machine = running(config(restart=Restart.ALWAYS))
    machine.handle(Exited(1), 1.0)
    assert where(machine) == (State.IDLE, 1.1)
    assert machine.handle(Stop("shutdown"), 1.05) == []
    assert where(machine) == (State.IDLE, None)
    assert machine.watching
    assert machine.handle(Tick(), 1.1) == []


def test_stop_during_start_timeout_kill_cancels_the_restart() -> None:
    """A Stop that comes while a timed-out start is being killed means no restart afterwards."""
    machine = begun(config(ready=NOTIFY, restart=Restart.ON_FAILURE, start_timeout=1.0))
    machine.handle(Start(), 0.0)
    machine.handle(Spawned(42), 0.0)
    machine.handle(Tick(), 1.0)
    assert machine.state is State.STOPPING
    assert machine.handle(Stop("shutdown"), 1.2) == []
    assert machine.handle(Exited(-15), 1.3) == [
        Log("stopped (shutdown): killed by SIGTERM"), Watch()]
    assert (machine.state, machine.deadline) == (State.IDLE, None)


def test_late_tick_takes_whichever_deadline_came_first() -> None:
    """A Tick that comes after both the start timeout and a later ready delay is a timeout."""
    machine = begun(config(ready=ReadyConfig(ReadyKind.DELAY, 2.0), start_timeout=1.0))
    machine.handle(Start(), 0.0)
    machine.handle(Spawned(42), 0.0)
    assert machine.deadline == 1.0
    actions = machine.handle(Tick(), 2.5)
    assert actions[1] == Activation(Outcome.TIMED_OUT, "traffic", 0.0, 0.0, None)
    assert machine.state is State.STOPPING


# --- the start limit ------------------------------------------------------------------------


def test_start_limit_five_starts_then_failed_for_the_interval() -> None:
    """start_limit 5: five starts in the interval are made, the sixth is not; failed for 10 s."""
    machine = begun(config(start_limit=5, start_limit_interval=10.0))
    for i in range(5):
        assert machine.handle(Start(), float(i)) == [Spawn(), Unwatch()]
        machine.handle(Spawned(i), float(i))
        machine.handle(Exited(0), i + 0.5)
    text = "5 starts within 10 s; not starting again for 10 s"
    assert machine.handle(Start(), 5.0) == [
        Log(f"failed: {text}", Level.ERR), DropHeld(text), Unwatch()]
    assert (machine.state, machine.deadline, machine.process) == (State.FAILED, 15.0, False)
    assert machine.activations == 5
    assert machine.handle(Start(), 6.0) == []
    assert machine.handle(Tick(), 14.9) == []
    assert machine.handle(Tick(), 15.0) == [
        Log("start limit interval over; waiting for traffic again"), Watch()]
    assert (machine.state, machine.deadline) == (State.IDLE, None)
    assert machine.handle(Start(), 15.0) == [Spawn(), Unwatch()]


def test_idle_stops_do_not_count_towards_the_start_limit() -> None:
    """A start that became ready and was stopped on purpose (idle) is forgiven; an exit is not."""
    machine = begun(config(start_limit=2, start_limit_interval=10.0))
    for i in range(5):  # used every second, stopped idle in between: never failed
        assert machine.handle(Start(), float(i)) == [Spawn(), Unwatch()]
        machine.handle(Spawned(i), float(i))  # ready: started
        machine.handle(Stop("idle"), i + 0.5)
        machine.handle(Exited(-15), i + 0.6)
        assert machine.state is State.IDLE
    # Exits of their own still count: two of them fill the window.
    for i in range(5, 7):
        assert machine.handle(Start(), float(i)) == [Spawn(), Unwatch()]
        machine.handle(Spawned(i), float(i))
        machine.handle(Exited(0), i + 0.5)
    assert machine.handle(Start(), 7.0)[0] == Log(
        "failed: 2 starts within 10 s; not starting again for 10 s", Level.ERR)


def test_start_limit_window_is_half_open() -> None:
    """A start exactly start_limit_interval after the oldest one no longer counts that one."""
    machine = begun(config(start_limit=2, start_limit_interval=10.0))
    for t in (0.0, 1.0):
        machine.handle(Start(), t)
        machine.handle(Spawned(1), t)
        machine.handle(Exited(0), t)
    assert machine.handle(Start(), 10.0) == [Spawn(), Unwatch()]


def test_start_limit_interval_over_means_over_despite_rounding() -> None:
    """Failed until t + interval; a start at exactly that time is made, whatever the rounding."""
    machine = begun(config(start_limit=1, start_limit_interval=10.0))
    machine.handle(Start(), 0.001)
    machine.handle(SpawnFailed("no such file: x"), 0.001)
    machine.handle(Start(), 0.001)
    assert where(machine) == (State.FAILED, 0.001 + 10.0)
    machine.handle(Tick(), 0.001 + 10.0)
    assert machine.handle(Start(), 0.001 + 10.0) == [Spawn(), Unwatch()]


def test_restart_refused_by_start_limit_fails() -> None:
    """A restart the start limit forbids puts the service in failed, not in a loop."""
    machine = begun(config(ready=NOTIFY, restart=Restart.ALWAYS, start_limit=2))
    machine.handle(Start(), 0.0)
    machine.handle(SpawnFailed("no such file: x"), 0.0)
    machine.handle(Tick(), 0.1)
    machine.handle(SpawnFailed("no such file: x"), 0.1)
    restart_at = 0.1 + 0.2
    assert where(machine) == (State.IDLE, restart_at)
    actions = machine.handle(Tick(), restart_at)
    assert isinstance(actions[0], Log) and actions[0].text.startswith("failed: 2 starts")
    assert where(machine) == (State.FAILED, restart_at + 10.0)


# --- stops and failures around the spawn ----------------------------------------------------


def test_stop_during_spawn_kills_when_spawned_arrives() -> None:
    """A Stop before Spawned cannot signal anything yet; the Kill goes out with Spawned."""
    machine = begun(config(stop_timeout=2.0))
    machine.handle(Start(), 0.0)
    assert machine.handle(Stop("shutdown"), 0.001) == [
        DropHeld("stopped before it was ready (shutdown)")]
    assert (machine.state, machine.deadline, machine.process) == (State.STOPPING, None, True)
    assert machine.handle(Spawned(42), 0.002) == [Kill(signal.SIGTERM)]
    assert (machine.instance, machine.deadline) == (42, 2.002)
    assert machine.handle(Exited(-15), 0.01) == [
        Log("stopped (shutdown): killed by SIGTERM"), Watch()]
    assert machine.state is State.IDLE


def test_stop_during_spawn_then_spawn_failed_idles() -> None:
    """A Stop before the spawn failed: the failure ends it, idle, no restart."""
    machine = begun(config(restart=Restart.ALWAYS))
    machine.handle(Start(), 0.0)
    machine.handle(Stop("shutdown"), 0.001)
    assert machine.handle(SpawnFailed("no such file: x"), 0.002) == [
        Log("no such file: x", Level.ERR), Watch()]
    assert (machine.state, machine.process, machine.deadline) == (State.IDLE, False, None)


def test_spawn_failed_is_a_failed_activation() -> None:
    """SpawnFailed records a failed activation, drops what is held and watches again."""
    machine = begun(config())
    machine.handle(Start(), 0.0)
    record = Activation(Outcome.FAILED, "traffic", trigger=0.0, spawned=None, ready=None)
    assert machine.handle(SpawnFailed("no such file: x"), 0.001) == [
        Log("no such file: x", Level.ERR), record, DropHeld("no such file: x"), Watch()]
    assert (machine.state, machine.process, machine.deadline) == (State.IDLE, False, None)


def test_start_timeout_before_spawned_waits_for_the_spawn() -> None:
    """A start that times out before Spawned kills the process once it has a pid."""
    machine = begun(config(ready=NOTIFY, restart=Restart.ON_FAILURE, start_timeout=1.0))
    machine.handle(Start(), 0.0)
    actions = machine.handle(Tick(), 1.0)
    assert not any(isinstance(a, Kill) for a in actions)
    assert where(machine) == (State.STOPPING, None)
    assert machine.handle(Spawned(42), 1.5) == [Kill(signal.SIGTERM)]
    assert where(machine) == (State.STOPPING, 11.5)
    machine.handle(Exited(-15), 1.6)
    assert where(machine) == (State.IDLE, 1.6 + 0.1)


def test_start_timeout_then_spawn_failed_restarts_per_policy() -> None:
    """A timed-out start whose spawn then fails is a failure like any other: on-failure restarts."""
    machine = begun(config(ready=NOTIFY, restart=Restart.ON_FAILURE, start_timeout=1.0))
    machine.handle(Start(), 0.0)
    machine.handle(Tick(), 1.0)
    assert machine.handle(SpawnFailed("no such file: x"), 1.5) == [
        Log("no such file: x", Level.ERR), Log("restarting in 100 ms (on-failure)"), Watch()]
    assert (machine.state, machine.deadline) == (State.IDLE, 1.6)


# --- duplicates and stale events ------------------------------------------------------------


def test_connect_exit_connect_spawns_one_process_each_time() -> None:
    """Traffic, exit, traffic: one Spawn per start, never a second while one is alive."""
    machine = begun(config())
    assert machine.handle(Start(), 0.0) == [Spawn(), Unwatch()]
    assert machine.handle(Start(), 0.0) == []
    machine.handle(Spawned(1), 0.001)
    assert machine.handle(Start(), 0.002) == []
    assert machine.handle(Exited(0), 0.003) == [Log("exited with status 0"), Watch()]
    assert machine.handle(Start(), 0.004) == [Spawn(), Unwatch()]
    assert machine.handle(Start(), 0.005) == []
    assert machine.activations == 2


def _in(setup: str) -> Lifecycle:
    machine = begun(config(ready=STARTED, start_limit=1))
    if setup in ("spawning", "running", "failed"):
        machine.handle(Start(), 0.0)
    if setup in ("running", "failed"):
        machine.handle(Spawned(5), 0.0)
    if setup == "failed":
        machine.handle(Exited(0), 0.0)
        machine.handle(Start(), 0.0)
        assert machine.state is State.FAILED
    return machine


@pytest.mark.parametrize(
    ("setup", "event"),
    [
        ("idle", Tick()),
        ("idle", Stop("x")),
        ("running", Ready()),
        ("running", Start()),
        ("running", Tick()),
        ("failed", Start()),
        ("failed", Stop("x")),
    ],
)
def test_requests_with_nothing_to_do_change_nothing(setup: str, event: Event) -> None:
    """A request that finds nothing to do (a Start for a running service, a Stop for an
    idle one, an early Tick, READY=1 said again) changes nothing."""
    machine = _in(setup)
    before = snapshot(machine)
    assert machine.handle(event, 0.5) == []
    assert snapshot(machine) == before


MISFITS = [
    ("idle", Ready()),
    ("idle", Exited(0)),
    ("idle", Spawned(5)),
    ("idle", SpawnFailed("x")),
    ("spawning", Exited(1)),
    ("spawning", Ready()),
    ("running", Spawned(6)),
    ("running", SpawnFailed("x")),
    ("failed", Exited(0)),
    ("failed", Ready()),
]


@pytest.mark.parametrize(("setup", "event"), MISFITS)
def test_a_report_that_does_not_fit_is_a_driver_bug(setup: str, event: Event) -> None:
    """A report that does not fit the state (an exit with no process, a second Spawned)
    raises UnexpectedEvent, and the machine is left as it was."""
    machine = _in(setup)
    before = snapshot(machine)
    with pytest.raises(UnexpectedEvent, match=f"{type(event).__name__} does not fit"):
        machine.handle(event, 0.5)
    assert snapshot(machine) == before


@pytest.mark.parametrize(("setup", "event"), MISFITS)
def test_not_strict_a_misfit_is_logged_as_a_bug_and_changes_nothing(
    setup: str, event: Event
) -> None:
    """Built with strict=False (the daemon's), a misfit is one error line and nothing else."""
    machine = _in(setup)
    machine.strict = False
    before = snapshot(machine)
    (line,) = machine.handle(event, 0.5)
    assert isinstance(line, Log) and line.text.startswith("bug: ignoring an event that ")
    assert line.level is Level.ERR
    assert snapshot(machine) == before


# --- hypothesis: arbitrary sequences against the promises -----------------------------------

START_LIMIT = 3
INTERVAL = 10.0
START_TIMEOUT = 1.0
STOP_TIMEOUT = 0.5

READY_KINDS = [
    STARTED,
    NOTIFY,
    ReadyConfig(ReadyKind.DELAY, 0.25),
    ReadyConfig(ReadyKind.DELAY, START_TIMEOUT),  # ties with the start timeout
    ReadyConfig(ReadyKind.DELAY, 2.0),  # never before the start timeout
]

# Small steps that land between deadlines, the exact durations in play, and long
# ones that cross the start limit interval.
STEPS = st.one_of(
    st.sampled_from([0.001, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, INTERVAL, 30.0]),
    st.floats(min_value=0.0, max_value=12.0, allow_nan=False),
)


class LifecycleWorld(RuleBasedStateMachine):
    """Drives one Lifecycle and plays the outside world its actions talk to.

    The world holds at most what the actions made: `outside` is None (no
    process), "pending" (Spawn was asked for, no answer yet) or "alive"
    (Spawned came).  Events the world could produce right now are realistic
    and move the world; the rest are stale and must change nothing.  Time only
    moves forward and never past the machine's deadline without a Tick at that
    deadline: the daemon's timer, delivered on time.  Subclasses choose the
    restart policy and the ready kind.
    """

    restart = Restart.NO
    ready_config = STARTED

    def __init__(self) -> None:
        super().__init__()
        self.config = config(
            ready=self.ready_config, restart=self.restart, start_limit=START_LIMIT,
            start_limit_interval=INTERVAL, start_timeout=START_TIMEOUT,
            stop_timeout=STOP_TIMEOUT,
        )
        self.now = 0.0
        self.machine = Lifecycle(self.config.policy, self.now)
        self.outside: str | None = None
        self.pid: int | None = None
        self.next_pid = 100
        self.spawn_times: list[float] = []
        self.spawn_at = 0.0
        self.watching = False
        self.sigkill_sent = False
        self.attempt_open = False  # a Spawn was made; held traffic not yet released or dropped
        self.records = 0  # Activation records of the current attempt
        self.stopped = False  # Stop came, and no Start was taken since
        self.stopped_when_ready: float | None = None  # spawn time of a process stopped ready

    @initialize()
    def begin(self) -> None:
        self.check(self.machine.begin(self.now), Tick())

    # -- what the world does with the machine's actions ----------------------

    def check(self, actions: list[Action], event: Event) -> None:
        state = self.machine.state
        for i, action in enumerate(actions):
            rest = actions[i + 1:]
            match action:
                case Spawn():
                    assert self.outside is None, f"second process on {event}"
                    assert not self.stopped, "a spawn after Stop without a Start"
                    interval = self.config.start_limit_interval
                    recent = [t for t in self.spawn_times if t + interval > self.now]
                    assert len(recent) < self.config.start_limit, "start limit broken"
                    self.spawn_times.append(self.now)
                    self.spawn_at = self.now
                    self.outside = "pending"
                    self.sigkill_sent = False
                    self.attempt_open = True
                    self.records = 0
                case Kill(sig, group):
                    assert self.outside == "alive", "a signal for a process without a pid"
                    assert state is State.STOPPING
                    if sig is signal.SIGKILL:
                        assert group
                        self.sigkill_sent = True
                    else:
                        assert sig is self.config.stop_signal and not group
                case Watch():
                    assert not self.watching, "Watch twice"
                    self.watching = True
                case Unwatch():
                    assert self.watching, "Unwatch twice"
                    self.watching = False
                case Activation(outcome, _reason, trigger, spawned, ready):
                    self.records += 1
                    assert self.records == 1, "two records for one attempt"
                    assert trigger == self.spawn_at
                    if spawned is not None:
                        assert self.spawn_at <= spawned <= self.now
                    if outcome is Outcome.READY:
                        assert ready == self.now and spawned is not None
                        assert ReleaseHeld() in rest
                    else:
                        assert ready is None
                        assert any(isinstance(a, DropHeld) for a in rest)
                case ReleaseHeld():
                    assert self.attempt_open and state is State.RUNNING
                    self.attempt_open = False
                case DropHeld():
                    self.attempt_open = False
                case Log(text):
                    assert text

    def send(self, event: Event) -> list[Action]:
        actions = self.machine.handle(event, self.now)
        self.check(actions, event)
        return actions

    def send_stale(self, event: Event) -> None:
        before = snapshot(self.machine)
        assert self.machine.handle(event, self.now) == [], f"stale {event} acted"
        assert snapshot(self.machine) == before, f"stale {event} changed the machine"

    def send_misfit(self, event: Event) -> None:
        before = snapshot(self.machine)
        with pytest.raises(UnexpectedEvent):
            self.machine.handle(event, self.now)
        assert snapshot(self.machine) == before, f"misfit {event} changed the machine"

    # -- rules ---------------------------------------------------------------

    @rule(reason=st.sampled_from(["traffic", "boot"]))
    def start(self, reason: str) -> None:
        was = self.machine.state
        if was is State.IDLE:
            self.stopped = False  # only a Start the machine takes overrides a Stop
        actions = self.send(Start(reason))
        if was is State.IDLE:
            assert self.machine.state in (State.STARTING, State.FAILED)
        else:
            assert actions == []

    # The world's answers come only when the world could give them; everything
    # else goes through `stale`, which must change nothing.

    @precondition(lambda self: self.outside == "pending")
    @rule()
    def spawned(self) -> None:
        self.next_pid += 1
        self.outside = "alive"
        self.pid = self.next_pid
        self.send(Spawned(self.next_pid))

    @precondition(lambda self: self.outside == "pending")
    @rule()
    def spawn_failed(self) -> None:
        self.outside = None
        self.send(SpawnFailed("no such file: x"))

    @precondition(lambda self: self.outside == "alive")
    @rule()
    def ready(self) -> None:
        was = self.machine.state
        self.send(Ready())
        if was is State.STARTING:
            assert self.machine.state is State.RUNNING

    @precondition(lambda self: self.outside == "alive")
    @rule(returncode=st.sampled_from([0, 1, -9, -15]))
    def exited(self, returncode: int) -> None:
        self.outside = None
        self.pid = None
        was = self.machine.state
        self.send(Exited(returncode))
        if (was is State.STOPPING and self.machine.state is State.IDLE
                and self.stopped_when_ready == self.spawn_at):
            # Ready, then stopped on purpose: that start no longer counts.
            self.spawn_times.remove(self.spawn_at)
        self.stopped_when_ready = None

    @rule(event=st.sampled_from([Spawned(7), SpawnFailed("late"), Ready(), Exited(0)]))
    def stale(self, event: Event) -> None:
        """An answer that does not fit the world now: duplicate, late or out of order."""
        fits = {
            Spawned: self.outside == "pending",
            SpawnFailed: self.outside == "pending",
            Ready: self.outside == "alive",
            Exited: self.outside == "alive",
        }
        if not fits[type(event)]:
            self.send_misfit(event)

    @rule(reason=st.sampled_from(["shutdown", "idle timeout"]))
    def stop(self, reason: str) -> None:
        was = self.machine.state
        self.stopped = True
        if was is State.RUNNING:
            self.stopped_when_ready = self.spawn_at
        self.send(Stop(reason))
        if was in (State.STARTING, State.RUNNING):
            assert self.machine.state is State.STOPPING

    @rule(step=STEPS)
    def advance(self, step: float) -> None:
        """Time passes; if that reaches the deadline, the Tick comes exactly then."""
        deadline = self.machine.deadline
        if deadline is None or self.now + step < deadline:
            self.now += step
        else:
            self.tick_at(deadline)

    @precondition(lambda self: self.machine.deadline is not None)
    @rule()
    def until_deadline(self) -> None:
        """Nothing else happens before the deadline: the timer fires."""
        assert self.machine.deadline is not None
        self.tick_at(self.machine.deadline)

    def tick_at(self, deadline: float) -> None:
        self.now = deadline
        was = self.machine.state
        self.send(Tick())
        if was is State.FAILED and self.machine.state is State.IDLE:
            # The next traffic after the interval tries again.
            recent = [t for t in self.spawn_times if t + INTERVAL > self.now]
            assert len(recent) < START_LIMIT

    @precondition(lambda self: self.machine.deadline is None
                  or self.now < self.machine.deadline)
    @rule()
    def tick_early(self) -> None:
        self.send_stale(Tick())

    # -- invariants: the promises --------------------------------------------

    @invariant()
    def one_process_known_to_the_machine(self) -> None:
        assert self.machine.process == (self.outside is not None)
        assert self.machine.instance == (self.pid if self.outside == "alive" else None)

    @invariant()
    def watching_exactly_while_idle(self) -> None:
        assert self.machine.watching == self.watching == (self.machine.state is State.IDLE)

    @invariant()
    def held_traffic_only_while_starting(self) -> None:
        assert self.attempt_open == (self.machine.state is State.STARTING)

    @invariant()
    def nothing_gets_stuck(self) -> None:
        state, deadline = self.machine.state, self.machine.deadline
        if state is State.IDLE or state is State.FAILED:
            assert self.outside is None
        if state is State.FAILED:
            assert deadline is not None
        elif state is State.RUNNING:
            assert self.outside == "alive"
        elif state is State.STARTING:
            # Pending: Spawned or SpawnFailed will come; alive: Exited may never.
            assert self.outside is not None
            assert deadline is not None and deadline <= self.spawn_at + START_TIMEOUT
        elif state is State.STOPPING:
            assert self.outside is not None
            if self.outside == "alive" and not self.sigkill_sent:
                assert deadline is not None

    @invariant()
    def deadline_ahead(self) -> None:
        """After handle(event, now) returns, the deadline is None or later than now.

        This holds because the world never lets time pass a deadline without a
        Tick at exactly that deadline (`advance`, `until_deadline`), as the
        daemon's timer does.  A deadline at or before now would then mean a
        Tick that changed nothing, and a timer that fires again at once.
        """
        deadline = self.machine.deadline
        assert deadline is None or deadline > self.now


# 30 examples for each of the 15 configs keeps the file fast; to hunt, run it once with
# LAZYD_LIFECYCLE_EXAMPLES=5000 (about 15 minutes; it passes).
_EXAMPLES = int(os.environ.get("LAZYD_LIFECYCLE_EXAMPLES", "30"))


@pytest.mark.parametrize("ready", READY_KINDS, ids=str)
@pytest.mark.parametrize("restart", list(Restart), ids=lambda r: r.value)
def test_lifecycle_keeps_its_promises(restart: Restart, ready: ReadyConfig) -> None:
    """No event sequence double-spawns, breaks the start limit, mis-watches or gets stuck."""

    class World(LifecycleWorld):
        pass

    World.restart, World.ready_config = restart, ready
    run_state_machine_as_test(
        World,
        settings=settings(
            max_examples=_EXAMPLES,
            stateful_step_count=50,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
