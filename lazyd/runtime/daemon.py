"""The daemon: bind everything, run every service's runner, answer control
requests, and stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import signal
import socket
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from lazyd import config as config_mod
from lazyd.backends.container.backend import check_containers
from lazyd.backends.process import launch
from lazyd.backends.process.spawner import Spawner, SpawnError, open_spawner
from lazyd.config import Activate, Config
from lazyd.config.reload import Change, plan_reload, socket_key
from lazyd.core.starts import StartRecord
from lazyd.datapath.budget import presize_fd_table
from lazyd.datapath.kernel import KernelPath, open_kernel_path
from lazyd.errors import ConfigError, LazydError
from lazyd.logs import Level, log_at
from lazyd.observe.status import daemon_status
from lazyd.runtime import control, privileges, systemd
from lazyd.runtime.backlog import capped_backlogs, somaxconn
from lazyd.runtime.binding import (
    bind_all,
    bind_socket,
    needs_privilege,
    raise_fd_limit,
    release,
    release_socket,
)
from lazyd.runtime.service import Options, ServiceRunner, stderr_log

# How long a reload waits for the spawner to read the config file (it starts
# an interpreter that imports lazyd's config loader: well under a second).
RELOAD_READ_TIMEOUT = 30.0


class Daemon:
    """Every service of one config, run together."""

    def __init__(
        self,
        config: Config,
        sockets: dict[str, list[socket.socket]],
        options: Options,
        *,
        spawner: Spawner | None = None,
        user: privileges.User | None = None,
        supervisor: systemd.Supervisor | None = None,
    ) -> None:
        self.config = config
        # lazyd's own supervisor (READY=1, RELOADING=1, STOPPING=1); none here
        # unless serve() found one.
        self.supervisor = supervisor or systemd.Supervisor(options.log, environ={})
        self.options = options
        # Reloads re-read the spawner's table through it (None: tests without one).
        self.spawner = spawner
        self.user = user  # who the daemon became after binding; None: it did not change
        self.started_at = trio.current_time()
        self.runners: dict[str, ServiceRunner] = {
            name: ServiceRunner(svc, sockets[name], options, on_spawn=self._started)
            for name, svc in config.services.items()
        }
        self.closing = False
        self.stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reloading = False

    def _started(self, runner: ServiceRunner) -> None:
        # requires: start the dependencies at the same moment, in no order;
        # their sockets are held already, so early messages wait there.
        for name in runner.config.requires:
            self.runners[name].start(f"required by {runner.name}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every service until shutdown() is called or the task is cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for runner in self.runners.values():
                await nursery.start(self._run_runner, runner)
            for runner in self.runners.values():
                if runner.config.activate is Activate.EAGER:
                    runner.start("eager")
            task_status.started()

    async def shutdown(self) -> None:
        """Stop every service (stop signal, then SIGKILL), then end run()."""
        if self.closing:
            return
        self.closing = True
        self.supervisor.notify("STOPPING=1")
        for runner in self.runners.values():
            runner.closing = True
            runner.stop("shutdown")
        async with trio.open_nursery() as nursery:
            for runner in self.runners.values():
                nursery.start_soon(runner.wait_stopped)
        self.stopped.set()

    async def reload(self) -> list[str]:
        """Re-read the config file and apply it; return its problems (none: applied).

        Sockets whose address did not change stay open throughout, so no
        client is refused.  Removed services are stopped and their sockets
        closed; added ones are bound and held; changed ones take their new
        settings at their next start, and a running one is restarted at once
        only if what it was started with (command, user, group, environment,
        sockets) changed.  A config with errors, or a new socket that cannot be
        bound, changes nothing.  The spawner reads the file too (as the user
        lazyd was started as) and starts only what it read there; after the
        drop of privileges, a new port below 1024 is refused.
        """
        if self.closing or self._reloading:
            return ["a reload or shutdown is already under way"]
        self._reloading = True
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.supervisor.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            return await self._reload()
        finally:
            self._reloading = False
            _trim_memory()
            self.supervisor.notify("READY=1")

    async def _reload(self) -> list[str]:
        log = self.options.log
        fresh: list[socket.socket] = []
        try:
            if self.user is not None:
                _check_readable(self.config.path, self.user.name)
            # The spawner reads the file first, as the user lazyd was started as:
            # what it may start comes from the file, never from this daemon,
            # and it can see every program, which this daemon may no longer.
            names = await self._read_spawner_table()
            new = config_mod.load(
                self.config.path,
                # Checked as what lazyd was started as: a service must still name its user.
                host=config_mod.Machine.after_privilege_drop() if self.user is not None else None,
            )
            if names is not None and set(names) != set(new.services):
                raise LazydError(f"{new.path} changed while it was read; reload again")
            change = plan_reload(self.config, new)
            kernel = self.options.kernel or KernelPath(None, None, log)
            kernel.check(new.services.values())  # steering is set up before the drop only
            held = {
                socket_key(sc): sock
                for runner in self.runners.values()
                for sc, sock in zip(runner.config.sockets, runner.sockets, strict=True)
            }
            plan: dict[str, list[socket.socket]] = {}
            for name, svc in new.services.items():
                plan[name] = []
                for sc, key in zip(svc.sockets, change.sockets[name], strict=True):
                    if key is not None:
                        plan[name].append(held[key])
                        continue
                    if self.user is not None and needs_privilege(sc.listen):
                        raise LazydError(
                            f"services.{name}.sockets.{sc.name}: cannot bind {sc.listen} as "
                            f"user {self.user.name} after dropping privileges; restart lazyd "
                            "to add it"
                        )
                    sock = bind_socket(sc, service=name)
                    fresh.append(sock)
                    plan[name].append(sock)
            if names is not None:
                assert self.spawner is not None
                try:
                    await self.spawner.commit()
                except SpawnError as exc:
                    raise LazydError(f"lazyd's spawner: {exc}") from None
        except LazydError as exc:
            for sock in fresh:
                release_socket(sock)
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            for problem in problems:
                log_at(log, Level.ERR, f"lazyd: reload: {problem}")
            log_at(log, Level.ERR, "lazyd: reload failed; the running config stays in force")
            return problems

        old_runners = self.runners
        removed = [old_runners[name] for name in change.removed]
        for warning in change.warnings:
            log_at(log, Level.WARNING, f"lazyd: reload: {warning}")
        self.config = new
        self.runners = {}
        replaced: list[ServiceRunner] = []
        for name, svc in new.services.items():
            what = change.changes[name]
            if what is Change.ADD:
                runner = ServiceRunner(svc, plan[name], self.options, on_spawn=self._started)
                self.runners[name] = runner
                assert self._nursery is not None
                await self._nursery.start(self._run_runner, runner)
                log(f"lazyd: reload: added {name}")
                if svc.activate is Activate.EAGER:
                    runner.start("eager")
                continue
            runner = old_runners[name]
            if what is Change.KEEP:
                self.runners[name] = runner
                continue
            log(f"lazyd: reload: changed {name}")
            if what is Change.REPLACE:
                # The proxies own their sockets' accept loops: a new runner takes
                # over once the old one is gone; meanwhile the kernel holds traffic.
                fresh_runner = ServiceRunner(svc, plan[name], self.options, on_spawn=self._started)
                self.runners[name] = fresh_runner
                replaced.append(runner)
                # Handed over now, not when _replace gets to run: a client
                # arriving in between would be forwarded to the process this
                # reload is about to stop, and lose its answer.
                was_running = runner.machine.process
                runner.hand_over("reload")
                self._nursery_start(self._replace, runner, fresh_runner, was_running)
                continue
            self.runners[name] = runner
            runner.reconfigure(svc, plan[name])
            if what is Change.RESTART and runner.machine.process:
                self._nursery_start(self._restart, runner)
        for runner in removed:
            log(f"lazyd: reload: removed {runner.name}")
            runner.retire("removed by reload")
        # Sockets nobody holds any more: close them once every runner that
        # served them has ended (a kept runner has let go of its old ones in
        # reconfigure(); a running process keeps its own copy).
        orphans = [held[key] for key in change.retired]
        self._nursery_start(self._retire, removed, replaced, orphans)
        kernel.announce(new.services.values())
        log(f"lazyd: reloaded {new.path}")
        return []

    async def _read_spawner_table(self) -> list[str] | None:
        """Have the spawner read its table from the config file; the services in it."""
        if self.spawner is None:
            return None
        try:
            with trio.fail_after(RELOAD_READ_TIMEOUT):
                return await self.spawner.reload()
        except trio.TooSlowError:
            raise LazydError(
                f"lazyd's spawner could not read {self.config.path} within "
                f"{RELOAD_READ_TIMEOUT:.0f} s"
            ) from None
        except SpawnError as exc:
            if exc.problems:
                raise ConfigError(exc.problems) from None
            raise LazydError(f"lazyd's spawner: {exc}") from None

    def _nursery_start(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _replace(self, old: ServiceRunner, new: ServiceRunner, was_running: bool) -> None:
        """Once `old` (handed over already) has stopped and ended, `new` takes over."""
        await old.wait_stopped()
        old.cancel()
        await old.finished.wait()
        assert self._nursery is not None
        if self.runners.get(new.name) is not new or self.closing:
            return  # removed or replaced again meanwhile, or shutting down
        await self._nursery.start(self._run_runner, new)
        if was_running or new.config.activate is Activate.EAGER:
            new.start("reload")

    async def _restart(self, runner: ServiceRunner) -> None:
        runner.stop("reload")
        await runner.wait_stopped()
        runner.start("reload")

    async def _retire(
        self,
        removed: list[ServiceRunner],
        replaced: list[ServiceRunner],
        orphans: list[socket.socket],
    ) -> None:
        for runner in removed:
            await runner.wait_stopped()
            runner.cancel()
        for runner in [*removed, *replaced]:
            await runner.finished.wait()
        for sock in orphans:
            # A kept runner may still be waking from its wait on an old socket.
            trio.lowlevel.notify_closing(sock)
            release_socket(sock)

    async def _run_runner(
        self,
        runner: ServiceRunner,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one service's runner; a bug inside it must not end the daemon.

        An exception from a runner is a bug in lazyd.  It is logged with its
        traceback, the service's process (if any) has been killed with the
        runner's nursery, and a fresh runner takes over the same sockets after
        a second, so every other service and every socket stays up.
        """
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await runner.run(task_status=_Started(mark_started))
                return
            except BaseException as exc:
                # Cancellation goes on up; any other exception is a bug.
                bugs, rest = _split_bugs(exc)
                if rest is not None:
                    raise
                assert bugs is not None
                text = "".join(traceback.format_exception(bugs)).rstrip()
                log_at(self.options.log, Level.ERR,
                       f"lazyd: {runner.name}: internal error, the service is restarted in 1 s "
                       f"with its sockets held:\n{text}")
            mark_started()
            await trio.sleep(1.0)
            if self.runners.get(runner.name) is not runner or self.closing or runner.closing:
                return
            if any(sock.fileno() == -1 for sock in runner.sockets):
                return
            fresh = ServiceRunner(runner.config, runner.sockets, self.options,
                                  on_spawn=self._started)
            fresh.history = runner.history
            self.runners[runner.name] = fresh
            runner = fresh

    def status(self, *, history: bool = False) -> dict[str, Any]:
        """What `lazyd status --json` shows; `history` adds every recorded start."""
        return daemon_status(self.runners, trio.current_time(), _task_count(), history=history)

    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["command"]
        if command == "status":
            return self.status(history=bool(request.get("history")))
        if command == "reload":
            problems = await self.reload()
            if problems:
                return {"ok": False, "error": "reload failed", "problems": problems}
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {command!r}"}


async def serve(
    config: Config,
    *,
    options: Options | None = None,
    drop_privileges: bool = False,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind every socket, then run the daemon until SIGTERM/SIGINT or `Daemon.shutdown()`.

    `drop_privileges`: started as root, become the config's top-level user
    once everything is bound (see `lazyd.runtime.privileges`); that changes the whole
    process for good, so only `lazyd run` asks for it.
    """
    options = options or Options()
    # Connected now, while lazyd may still be root: see systemd.Supervisor.
    supervisor = systemd.Supervisor(options.log)
    try:
        await _serve(config, options, supervisor, drop_privileges, task_status)
    finally:
        supervisor.close()


async def _serve(
    config: Config,
    options: Options,
    supervisor: systemd.Supervisor,
    drop_privileges: bool,
    task_status: trio.TaskStatus[Daemon],
) -> None:
    soft, _hard = raise_fd_limit()
    options.nofile_soft = soft
    presize_fd_table(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    # Under systemd, sockets may come bound already: use them, bind the rest.
    inherited = systemd.adopt(config, systemd.take_listen_fds(), options.log)
    try:
        sockets = bind_all(config, inherited)
    except BaseException:
        for sock in inherited.values():
            sock.close()
        raise
    # Once, at start-up; for a socket a reload adds, `lazyd check` on the new
    # config says it.
    for warning in capped_backlogs(config, somaxconn(), skip=inherited):
        log_at(options.log, Level.WARNING, warning)
    control_sock: socket.socket | None = None
    metrics_sock: socket.socket | None = None
    metrics: lazyd.observe.metrics.Metrics | None = None
    daemon: Daemon | None = None
    kernel: KernelPath | None = None
    try:
        # As root, before the drop, and only if some service wants it (see
        # lazyd.datapath.kernel); the daemon keeps its fds to the end.
        kernel = open_kernel_path(config, options.log)
        kernel.announce(config.services.values())
        options = dataclasses.replace(options, kernel=kernel)
        if config.metrics is not None:
            # Imported only when asked for: prometheus-client is ~3 MB of an
            # idle daemon's memory.
            import lazyd.observe.metrics

            metrics_sock = lazyd.observe.metrics.bind_metrics(config.metrics)
            metrics = lazyd.observe.metrics.Metrics(
                lambda: daemon.runners if daemon is not None else {}
            )
            options = dataclasses.replace(
                options, on_activation=_both(options.on_activation, metrics.observe)
            )
        # Who the daemon becomes once everything is bound (see lazyd.runtime.privileges):
        # the control socket is created as that account's, never chown'ed later
        # by path. A uid of its own gets none: nobody else runs as it.
        user = privileges.daemon_user(config.user, options.log) if drop_privileges else None
        owner = (user.uid, user.gid) if user is not None and not user.dynamic else (-1, -1)
        try:
            control_sock = control.bind_control(control.control_path(config), *owner)
        except LazydError as exc:
            raise type(exc)(f"control socket: {exc}") from None
        if user is not None:
            privileges.preload(metrics=metrics is not None)
        # The spawner starts every service's process; it lives until the
        # services are stopped (see lazyd.privileged.spawnerd). It is told once which
        # services it may start, and how; afterwards only the config file can
        # change that, which it reads itself on a reload.
        async with open_spawner() as spawner, trio.open_nursery() as nursery:
            await spawner.define(
                launch.table(config, options.nofile_soft),
                config=os.path.abspath(config.path),
                path=os.environ.get("PATH", os.defpath),
                nofile_soft=options.nofile_soft,
                seal=True,
            )
            # A container service whose container is missing is a start-up error.
            await check_containers(spawner, config, options.log)
            if user is not None:
                privileges.drop(user)
                options.log(f"lazyd: dropped privileges: running as user {user.name}")
            daemon = Daemon(config, sockets, options, spawner=spawner, user=user,
                            supervisor=supervisor)
            await nursery.start(daemon.run)
            nursery.start_soon(
                partial(control.serve_control, log=options.log),
                control_sock,
                daemon.handle_control,
            )
            await nursery.start(_stop_on_signals, daemon)
            if metrics_sock is not None and metrics is not None:
                await nursery.start(lazyd.observe.metrics.serve_metrics, metrics_sock, metrics)
                options.log(f"lazyd: metrics at {lazyd.observe.metrics.url(metrics_sock)}")
            held = sum(len(s) for s in sockets.values())
            options.log(
                f"lazyd: holding {_plural(held, 'socket')} "
                f"for {_plural(len(config.services), 'service')}"
            )
            supervisor.notify(f"READY=1\nSTATUS=holding {_plural(held, 'socket')}")
            _trim_memory()
            task_status.started(daemon)
            await daemon.stopped.wait()
            nursery.cancel_scope.cancel()
    finally:
        if daemon is not None:
            # A reload may have replaced some: release what is held now.
            sockets = {name: r.sockets for name, r in daemon.runners.items()}
        release(config, sockets)
        if control_sock is not None:
            # Removes the file only while it is still the one bound here.
            release_socket(control_sock)
        if metrics_sock is not None:
            metrics_sock.close()
        if kernel is not None:
            # The services are stopped and their entries removed: detach the
            # program, so that nothing of lazyd's steering outlives it.
            kernel.close()
    options.log("lazyd: stopped")


async def _stop_on_signals(
    daemon: Daemon, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGTERM/SIGINT stop everything; SIGHUP reloads the config."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        # Started: from now on a SIGTERM stops lazyd cleanly (exit 0), and only
        # then does it say that it holds its sockets.
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                daemon.options.log("lazyd: SIGHUP: reloading the config")
                await daemon.reload()
                continue
            daemon.options.log(f"lazyd: {signal.Signals(signum).name}: stopping every service")
            await daemon.shutdown()
            return


def _split_bugs(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(the Exceptions in `exc`, the rest: Cancelled, KeyboardInterrupt...)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(Exception)
    if isinstance(exc, Exception):
        return exc, None
    return None, exc


class _Started:
    """A task_status that only calls back: see Daemon._run_runner."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback()


def _check_readable(path: str, user: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise LazydError(
            f"{path}: cannot read it as user {user}, which lazyd runs as since it dropped its "
            f"privileges: make the file (and its directories) readable by {user}"
        ) from None
    except OSError:
        pass  # config_mod.load says what is wrong


def _both(
    first: Callable[[str, StartRecord], None] | None, second: Callable[[str, StartRecord], None]
) -> Callable[[str, StartRecord], None]:
    """Both callbacks, in order (`first` may be absent)."""
    if first is None:
        return second

    def both(name: str, record: StartRecord) -> None:
        first(name, record)
        second(name, record)

    return both


def _task_count() -> int:
    """How many trio tasks run in this trio.run(), the root task included."""
    count, pending = 0, [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


__all__ = ["Daemon", "serve", "stderr_log"]


def _trim_memory() -> None:
    """Give the heap that parsing the config and binding left free back to the
    system: an idle daemon is mostly what it holds on to after start-up
    (about 1 MB of its 30 here).  glibc only; elsewhere this does nothing."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
