"""The daemon: bind everything, run every service's runner, answer control
requests, and stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from typing import Any

import trio

from lazyd import control
from lazyd.config import Activate, Config
from lazyd.errors import LazydError
from lazyd.service import Options, ServiceRunner, stderr_log
from lazyd.sockets import bind_all, raise_fd_limit, release


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

    def _started(self, runner: ServiceRunner) -> None:
        # requires: start the dependencies at the same moment, in no order;
        # their sockets are held already, so early messages wait there.
        for name in runner.config.requires:
            self.runners[name].start(f"required by {runner.name}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every service until shutdown() is called or the task is cancelled."""
        async with trio.open_nursery() as nursery:
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
        for runner in self.runners.values():
            runner.closing = True
            runner.stop("shutdown")
        async with trio.open_nursery() as nursery:
            for runner in self.runners.values():
                nursery.start_soon(runner.wait_stopped)
        self.stopped.set()

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        services: dict[str, Any] = {}
        for name, runner in self.runners.items():
            last = runner.machine.last
            total = last.total if last is not None else None
            services[name] = {
                "state": runner.state.value,
                "pid": runner.main_pid,
                "activations": runner.machine.activations,
                "queued": runner.queued(),
                "active": None,  # pass mode: the service accepts; lazyd cannot see them
                "last_start_ms": None if total is None else round(total * 1000, 3),
                "last_start_ago_s": None if last is None else round(now - last.trigger, 3),
                "mode": runner.config.mode.value,
                "status": runner.status_text,
                "sockets": {
                    sc.name: str(sc.listen) for sc in runner.config.sockets
                },
            }
        return {"ok": True, "pid": os.getpid(), "services": services}

    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["command"]
        if command == "status":
            return self.status()
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
    sockets = bind_all(config)
    control_sock: socket.socket | None = None
    try:
        try:
            control_sock = control.bind_control(control.control_path(config))
        except LazydError as exc:
            raise type(exc)(f"control socket: {exc}") from None
        daemon = Daemon(config, sockets, options)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            nursery.start_soon(control.serve_control, control_sock, daemon.handle_control)
            nursery.start_soon(_stop_on_signals, daemon)
            held = sum(len(s) for s in sockets.values())
            options.log(
                f"lazyd: holding {_plural(held, 'socket')} "
                f"for {_plural(len(config.services), 'service')}"
            )
            task_status.started(daemon)
            await daemon.stopped.wait()
            nursery.cancel_scope.cancel()
    finally:
        release(config, sockets)
        if control_sock is not None:
            control_sock.close()
            _unlink_quietly(control.control_path(config))
    options.log("lazyd: stopped")


async def _stop_on_signals(daemon: Daemon) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            daemon.options.log(f"lazyd: {signal.Signals(signum).name}: stopping every service")
            await daemon.shutdown()
            return


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


__all__ = ["Daemon", "serve", "stderr_log"]
