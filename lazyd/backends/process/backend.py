"""A service that is a process, behind the runner's `Backend` protocol: the
privileged helper forks and execs it (see `launch` and `spawner`)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Sequence

import trio

from lazyd.backends.process import launch
from lazyd.backends.process.spawner import ServiceProcess
from lazyd.config import ServiceConfig
from lazyd.readiness.notify import NotifySocket


class StartedProcess:
    """A running service process; see `lazyd.backends.base.Started`."""

    def __init__(self, process: ServiceProcess) -> None:
        self._process = process

    @property
    def handle(self) -> int:
        return self._process.pid

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def output(self) -> trio.abc.ReceiveStream:
        return self._process.stdout

    async def wait(self) -> int:
        return await self._process.wait()

    def signal(self, sig: int, *, group: bool) -> None:
        if group:
            self._process.signal_group(sig)
        else:
            self._process.send_signal(sig)

    async def aclose(self) -> None:
        # Whatever the service left behind in its process group goes with it
        # (the spawner kills the group as it reaps the process), so that a
        # stopped service is really gone.
        with trio.CancelScope(shield=True):
            if self._process.returncode is None:
                self._process.signal_group(signal.SIGKILL)
                await self._process.wait()


class ProcessBackend:
    """Starts `config`'s command through the privileged helper."""

    def __init__(self, config: ServiceConfig, nofile_soft: int | None) -> None:
        self.config = config
        self.nofile_soft = nofile_soft

    async def start(
        self, sockets: Sequence[socket.socket], notify: NotifySocket | None
    ) -> StartedProcess:
        # What the service is handed (its sockets in pass mode only, its notify
        # socket for ready: notify only) is decided in one place, with the table.
        spec = launch.service_spec(
            self.config, self.nofile_soft, sockets=sockets, notify_socket=notify
        )
        return StartedProcess(await launch.open_service_process(spec))
