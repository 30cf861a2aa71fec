"""The daemon: bind everything, run every service's runner, answer control
requests, and stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from lazyd import config as config_mod
from lazyd import control, systemd
from lazyd.config import Activate, Config, Mode, ServiceConfig, SocketConfig
from lazyd.errors import ConfigError, LazydError
from lazyd.lifecycle import State
from lazyd.logs import Level, log_at
from lazyd.service import Options, ServiceRunner, stderr_log
from lazyd.sockets import bind_all, bind_socket, raise_fd_limit, release, release_socket
from lazyd.spawner import open_spawner
from lazyd.starts import StartRecord


class Daemon:
    """Every service of one config, run together."""

    def __init__(
        self,
        config: Config,
        sockets: dict[str, list[socket.socket]],
        options: Options,
    ) -> None:
        self.config = config
        self.options = options
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
        bound, changes nothing.
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
            systemd.notify("READY=1")

    async def _reload(self) -> list[str]:
        log = self.options.log
        try:
            new = config_mod.load(self.config.path)
        except LazydError as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            for problem in problems:
                log_at(log, Level.ERR, f"lazyd: reload: {problem}")
            log_at(log, Level.ERR, "lazyd: reload failed; the running config stays in force")
            return problems
        held = {
            _socket_key(sc): sock
            for runner in self.runners.values()
            for sc, sock in zip(runner.config.sockets, runner.sockets, strict=True)
        }
        kept: set[int] = set()
        fresh: list[socket.socket] = []
        plan: dict[str, list[socket.socket]] = {}
        try:
            for name, svc in new.services.items():
                plan[name] = []
                for sc in svc.sockets:
                    sock = held.get(_socket_key(sc))
                    if sock is None or id(sock) in kept:
                        sock = bind_socket(sc, service=name)
                        fresh.append(sock)
                    kept.add(id(sock))
                    plan[name].append(sock)
        except LazydError as exc:
            for sock in fresh:
                release_socket(sock)
            log_at(log, Level.ERR, f"lazyd: reload: {exc}")
            log_at(log, Level.ERR, "lazyd: reload failed; the running config stays in force")
            return [str(exc)]

        old_runners = self.runners
        removed = [r for name, r in old_runners.items() if name not in new.services]
        if new.metrics != self.config.metrics:
            log_at(log, Level.WARNING, "lazyd: reload: a new metrics: address takes effect "
                   "when lazyd restarts; the endpoint stays where it is")
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
        return {"ok": True, "pid": os.getpid(), "services": services}

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
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind every socket, then run the daemon until SIGTERM/SIGINT or `Daemon.shutdown()`."""
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
        try:
            control_sock = control.bind_control(control.control_path(config))
        except LazydError as exc:
            raise type(exc)(f"control socket: {exc}") from None
        if config.metrics is not None:
            # Imported only when asked for: prometheus-client is ~3 MB of an
            # idle daemon's memory.
            import lazyd.metrics

            metrics_sock = lazyd.metrics.bind_metrics(config.metrics)
            metrics = lazyd.metrics.Metrics(lambda: daemon.runners if daemon is not None else {})
            options = dataclasses.replace(
                options, on_activation=_both(options.on_activation, metrics.observe)
            )
        daemon = Daemon(config, sockets, options)
        # The spawner starts every service's process; it lives until the
        # services are stopped (see lazyd.spawnerd).
        async with open_spawner(), trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            nursery.start_soon(control.serve_control, control_sock, daemon.handle_control)
            nursery.start_soon(_stop_on_signals, daemon)
            if metrics_sock is not None and metrics is not None:
                await nursery.start(lazyd.metrics.serve_metrics, metrics_sock, metrics)
                options.log(f"lazyd: metrics at {lazyd.metrics.url(metrics_sock)}")
            held = sum(len(s) for s in sockets.values())
            options.log(
                f"lazyd: holding {_plural(held, 'socket')} "
                f"for {_plural(len(config.services), 'service')}"
            )
            systemd.notify(f"READY=1\nSTATUS=holding {_plural(held, 'socket')}")
            task_status.started(daemon)
            await daemon.stopped.wait()
            nursery.cancel_scope.cancel()
    finally:
        if daemon is not None:
            # A reload may have replaced some: release what is held now.
            sockets = {name: r.sockets for name, r in daemon.runners.items()}
        release(config, sockets)
        if control_sock is not None:
            control_sock.close()
            _unlink_quietly(control.control_path(config))
        if metrics_sock is not None:
            metrics_sock.close()
    options.log("lazyd: stopped")


async def _stop_on_signals(daemon: Daemon) -> None:
    """SIGTERM/SIGINT stop everything; SIGHUP reloads the config."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                daemon.options.log("lazyd: SIGHUP: reloading the config")
                await daemon.reload()
                continue
            daemon.options.log(f"lazyd: {signal.Signals(signum).name}: stopping every service")
            await daemon.shutdown()
            return


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
                   "flow_timeout", "idle_timeout")
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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


__all__ = ["Daemon", "serve", "stderr_log"]
