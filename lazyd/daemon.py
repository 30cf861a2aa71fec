"""The daemon: bind everything, run every service's runner, answer control
requests, and stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from lazyd import config as config_mod
from lazyd import control, launch, privileges, systemd
from lazyd.config import Activate, Config, Mode, ServiceConfig, SocketConfig
from lazyd.errors import ConfigError, LazydError
from lazyd.lifecycle import State
from lazyd.logs import Level, log_at
from lazyd.service import Options, ServiceRunner, stderr_log
from lazyd.sockets import (
    bind_all,
    bind_socket,
    needs_privilege,
    raise_fd_limit,
    release,
    release_socket,
)
from lazyd.spawner import Spawner, SpawnError, open_spawner
from lazyd.starts import StartRecord

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
    ) -> None:
        self.config = config
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
                await nursery.start(runner.run)
            for runner in self.runners.values():
                if runner.config.activate is Activate.EAGER:
                    runner.start("eager")
            task_status.started()

    async def shutdown(self) -> None:
        """Stop every service (stop signal, then SIGKILL), then end run()."""
        if self.closing:
            return
        self.closing = True
        systemd.notify("STOPPING=1")
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
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            return await self._reload()
        finally:
            self._reloading = False
            _trim_memory()
            systemd.notify("READY=1")

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
                as_root=self.user is not None or None,
                find_programs=self.user is None,
            )
            if names is not None and set(names) != set(new.services):
                raise LazydError(f"{new.path} changed while it was read; reload again")
            held = {
                _socket_key(sc): sock
                for runner in self.runners.values()
                for sc, sock in zip(runner.config.sockets, runner.sockets, strict=True)
            }
            kept: set[int] = set()
            plan: dict[str, list[socket.socket]] = {}
            for name, svc in new.services.items():
                plan[name] = []
                for sc in svc.sockets:
                    sock = held.get(_socket_key(sc))
                    if sock is None or id(sock) in kept:
                        if self.user is not None and needs_privilege(sc.listen):
                            raise LazydError(
                                f"services.{name}.sockets.{sc.name}: cannot bind {sc.listen} as "
                                f"user {self.user.name} after dropping privileges; restart lazyd "
                                "to add it"
                            )
                        sock = bind_socket(sc, service=name)
                        fresh.append(sock)
                    kept.add(id(sock))
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
        removed = [r for name, r in old_runners.items() if name not in new.services]
        if new.metrics != self.config.metrics:
            log_at(log, Level.WARNING, "lazyd: reload: a new metrics: address takes effect "
                   "when lazyd restarts; the endpoint stays where it is")
        if new.user != self.config.user:
            log_at(log, Level.WARNING, "lazyd: reload: a new top-level user: takes effect "
                   "when lazyd restarts")
        self.config = new
        self.runners = {}
        for name, svc in new.services.items():
            runner = old_runners.get(name)
            if runner is None:
                runner = ServiceRunner(svc, plan[name], self.options, on_spawn=self._started)
                self.runners[name] = runner
                assert self._nursery is not None
                await self._nursery.start(runner.run)
                log(f"lazyd: reload: added {name}")
                if svc.activate is Activate.EAGER:
                    runner.start("eager")
                continue
            if svc == runner.config and plan[name] == runner.sockets:
                self.runners[name] = runner
                continue
            if _needs_new_runner(runner.config, svc, runner.sockets, plan[name]):
                # The proxies own their sockets' accept loops: a new runner takes
                # over once the old one is gone; meanwhile the kernel holds traffic.
                fresh_runner = ServiceRunner(svc, plan[name], self.options, on_spawn=self._started)
                self.runners[name] = fresh_runner
                log(f"lazyd: reload: changed {name}")
                self._nursery_start(self._replace, runner, fresh_runner)
                continue
            self.runners[name] = runner
            restart = _needs_restart(runner.config, svc, runner.sockets, plan[name])
            runner.reconfigure(svc, plan[name])
            log(f"lazyd: reload: changed {name}")
            if restart and runner.machine.process:
                self._nursery_start(self._restart, runner)
        for runner in removed:
            log(f"lazyd: reload: removed {runner.name}")
            runner.closing = True
            runner.stop("removed by reload")
        # Sockets nobody holds any more: close them once their service is gone
        # or has let go of them (a running process keeps its own copy).
        orphans = [s for s in held.values() if id(s) not in kept]
        self._nursery_start(self._retire, removed, orphans)
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

    async def _replace(self, old: ServiceRunner, new: ServiceRunner) -> None:
        was_running = old.machine.process
        old.closing = True
        old.stop("reload")
        await old.wait_stopped()
        old.cancel()
        await old.finished.wait()
        assert self._nursery is not None
        await self._nursery.start(new.run)
        if was_running or new.config.activate is Activate.EAGER:
            new.start("reload")

    async def _restart(self, runner: ServiceRunner) -> None:
        runner.stop("reload")
        await runner.wait_stopped()
        runner.start("reload")

    async def _retire(self, removed: list[ServiceRunner], orphans: list[socket.socket]) -> None:
        for sock in orphans:
            # Wake any task still waiting on it before the fd goes away.
            trio.lowlevel.notify_closing(sock)
            release_socket(sock)
        for runner in removed:
            await runner.wait_stopped()
            runner.cancel()

    def status(self, *, history: bool = False) -> dict[str, Any]:
        """What `lazyd status --json` shows; `history` adds every recorded start."""
        now = trio.current_time()
        services: dict[str, Any] = {}
        for name, runner in self.runners.items():
            runner.refresh_first_byte()
            last = runner.history[-1] if runner.history else None
            ready = [r for r in runner.history if r.ready is not None]
            up = runner.state is State.RUNNING and ready
            total = last.total if last is not None else None
            services[name] = {
                "state": runner.state.value,
                "pid": runner.main_pid,
                "activations": runner.machine.activations,
                "queued": runner.queued(),
                "active": runner.active(),  # pass mode: None, the service accepts itself
                "refused": runner.refused(),  # allow/deny, max_connections_per_source
                "last_start_ms": None if total is None else round(total * 1000, 3),
                "last_start_at": None if last is None else round(last.wall, 3),
                "last_outcome": None if last is None else last.outcome.value,
                "uptime_s": round(now - ready[-1].ready, 3) if up and ready[-1].ready else None,
                **runner.history.summary(),
                "mode": runner.config.mode.value,
                "status": runner.status_text,
                "sockets": {sc.name: str(sc.listen) for sc in runner.config.sockets},
            }
            if history:
                services[name]["starts"] = [r.to_json() for r in runner.history]
        # `tasks`: trio tasks alive in the daemon; a count that only grows is a leak.
        return {"ok": True, "pid": os.getpid(), "tasks": _task_count(), "services": services}

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
    once everything is bound (see `lazyd.privileges`); that changes the whole
    process for good, so only `lazyd run` asks for it.
    """
    options = options or Options()
    soft, _hard = raise_fd_limit()
    options.nofile_soft = soft
    # Under systemd, sockets may come bound already: use them, bind the rest.
    inherited = systemd.adopt(config, systemd.take_listen_fds(), options.log)
    try:
        sockets = bind_all(config, inherited)
    except BaseException:
        for sock in inherited.values():
            sock.close()
        raise
    control_sock: socket.socket | None = None
    metrics_sock: socket.socket | None = None
    metrics: lazyd.metrics.Metrics | None = None
    daemon: Daemon | None = None
    try:
        if config.metrics is not None:
            # Imported only when asked for: prometheus-client is ~3 MB of an
            # idle daemon's memory.
            import lazyd.metrics

            metrics_sock = lazyd.metrics.bind_metrics(config.metrics)
            metrics = lazyd.metrics.Metrics(lambda: daemon.runners if daemon is not None else {})
            options = dataclasses.replace(
                options, on_activation=_both(options.on_activation, metrics.observe)
            )
        # Who the daemon becomes once everything is bound (see lazyd.privileges):
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
        # services are stopped (see lazyd.spawnerd). It is told once which
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
            if user is not None:
                privileges.drop(user)
                options.log(f"lazyd: dropped privileges: running as user {user.name}")
            daemon = Daemon(config, sockets, options, spawner=spawner, user=user)
            await nursery.start(daemon.run)
            nursery.start_soon(
                partial(control.serve_control, log=options.log),
                control_sock,
                daemon.handle_control,
            )
            await nursery.start(_stop_on_signals, daemon)
            if metrics_sock is not None and metrics is not None:
                await nursery.start(lazyd.metrics.serve_metrics, metrics_sock, metrics)
                options.log(f"lazyd: metrics at {lazyd.metrics.url(metrics_sock)}")
            held = sum(len(s) for s in sockets.values())
            options.log(
                f"lazyd: holding {_plural(held, 'socket')} "
                f"for {_plural(len(config.services), 'service')}"
            )
            systemd.notify(f"READY=1\nSTATUS=holding {_plural(held, 'socket')}")
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


def _socket_key(sc: SocketConfig) -> tuple[str, str]:
    """Sockets with the same key are the same socket across a reload."""
    return (sc.listen.kind.value, str(sc.listen))


def _needs_restart(
    old: ServiceConfig,
    new: ServiceConfig,
    old_sockets: list[socket.socket],
    new_sockets: list[socket.socket],
) -> bool:
    """Whether a running service must restart to pick up a change."""
    started_with = ("command", "user", "group", "environment", "workdir", "mode")
    if any(getattr(old, key) != getattr(new, key) for key in started_with):
        return True
    names = [sc.name for sc in old.sockets] != [sc.name for sc in new.sockets]
    return names or old_sockets != new_sockets


def _needs_new_runner(
    old: ServiceConfig,
    new: ServiceConfig,
    old_sockets: list[socket.socket],
    new_sockets: list[socket.socket],
) -> bool:
    """Whether a change reaches into how lazyd itself serves the sockets."""
    if old.mode is not new.mode:
        return True
    if old.mode is not Mode.PROXY:
        return False
    served_with = ("sockets", "queue_limit", "datagram_queue_limit", "max_connections",
                   "flow_timeout", "idle_timeout", "max_connections_per_source")
    return old_sockets != new_sockets or any(
        getattr(old, key) != getattr(new, key) for key in served_with
    )


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
