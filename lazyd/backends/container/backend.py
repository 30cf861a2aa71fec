"""A service that is a container, behind the runner's `Backend` protocol.

The daemon never talks to the engine (its socket is root-equivalent): it asks
the privileged helper, whose table names the one container each container
service may act on (`lazyd.privileged.containers`), through the same
connection it starts processes with (`lazyd.backends.process.spawner`).

How the runner's verbs map onto the engine:

- start: ``POST /containers/{name}/start``, answered once the engine has
  answered (that is the start record's *spawn*); then readiness as for any
  proxied service (the connect probe), or, with ``ready: health``, the
  container's own healthcheck, run through the engine until it passes;
- wait: the helper follows the container's events and says when it died
  (also when something outside lazyd stopped or killed it: lazyd then holds
  its sockets again, and the next client starts it);
- signal: lazyd's stop (idle, reload, shutdown) is the engine's
  ``stop?t=stop_timeout`` (the container's own stop signal, then SIGKILL),
  and SIGKILL is the engine's kill;
- output: the container's logs, demultiplexed by the helper, relayed to
  lazyd's log with the service's name in front, as a process's output is.
"""

from __future__ import annotations

import math
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

import trio

from lazyd.backends.process.spawner import ContainerRun, Spawner, SpawnError, current_spawner
from lazyd.config import Config, ServiceConfig
from lazyd.errors import ConfigError, LaunchError
from lazyd.logs import Level, log_at
from lazyd.privileged import entries
from lazyd.readiness.notify import NotifySocket

# How long a start's end is awaited once lazyd has sent SIGKILL (the engine
# answers within its own timeout, or the helper says it went away).
CLOSE_WAIT = 15.0
# The healthcheck of `ready: health` runs at once, then after 50 ms, and 50 %
# later each time, up to once a second: a healthcheck is a process the engine
# runs in the container, not free.
HEALTH_FIRST_WAIT = 0.05
HEALTH_MAX_WAIT = 1.0
# The exit status given to the lifecycle for a container lazyd lost track of
# (its engine went away while it ran): 255, as ssh does for its own errors.
LOST = 255


def engine_address(service: ServiceConfig) -> str:
    """The engine of a container service: its own, else the default."""
    if service.engine:
        return service.engine
    # Here, not at the top: the engine client (http.client, ssl) is megabytes
    # of a daemon that runs no container (only the helper talks to engines).
    from lazyd.backends.container.engine import default_address

    return default_address()


def table_entry(service: ServiceConfig) -> dict[str, Any]:
    """The helper's table entry for a container service (`lazyd.privileged.entries`)."""
    assert service.container is not None
    tls = service.engine_tls
    return entries.container_entry(
        container=service.container, engine=engine_address(service),
        tls=None if tls is None else dict(zip(entries.TLS_FIELDS, tls, strict=True)),
    )


class StartedContainer:
    """One start of a container; see `lazyd.backends.base.Started`."""

    def __init__(self, spawner: Spawner, run: ContainerRun, config: ServiceConfig,
                 log: Callable[[str], None]) -> None:
        self._spawner = spawner
        self.run = run
        self._config = config
        self._log = log

    @property
    def handle(self) -> str:
        # One start, not the container (whose id every start shares): a probe
        # left from an earlier start must not make this one ready.
        return f"{self._config.container}#{self.run.start_id}"

    @property
    def pid(self) -> None:
        return None  # its processes are the engine's, maybe on another host

    @property
    def output(self) -> trio.abc.ReceiveStream:
        return self.run.output

    async def wait(self) -> int:
        try:
            return await self.run.wait()
        except LaunchError as exc:
            self._log(f"{self._config.name}: lost track of container {self._config.container}: "
                      f"{exc}; holding its sockets again")
            return LOST

    def signal(self, sig: int, *, group: bool) -> None:
        if self.run.over:
            return
        name = self._config.name
        if sig == signal.SIGKILL:
            self._spawner.container_soon(name, "kill", sig=signal.SIGKILL)
        else:
            # The engine's stop: the container's own stop signal, then SIGKILL.
            timeout = math.ceil(self._config.stop_timeout)
            self._spawner.container_soon(name, "stop", timeout=timeout)

    async def wait_healthy(self) -> None:
        """Return once the container's healthcheck passes (`ready: health`)."""
        wait = HEALTH_FIRST_WAIT
        last = None
        while not self.run.over:
            try:
                info = await self._spawner.container(self._config.name, "health")
                health = info.health if info is not None else None
            except SpawnError as exc:
                health = str(exc)
            if info is not None:
                self.run.health = health  # for status
            if health == "healthy":
                return
            if health != last:
                self._log(f"{self._config.name}: healthcheck: {health}")
                last = health
            await trio.sleep(wait)
            wait = min(wait * 1.5, HEALTH_MAX_WAIT)
        await trio.sleep_forever()  # it died: the runner hears of that through wait()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            if not self.run.over:
                self._spawner.container_soon(self._config.name, "kill", sig=signal.SIGKILL)
                with trio.move_on_after(CLOSE_WAIT):
                    await self.run._over.wait()
            await self.run.output.aclose()


class ContainerBackend:
    """Starts `config`'s container through the privileged helper."""

    def __init__(self, config: ServiceConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.last: ContainerRun | None = None  # the latest start, for status

    async def start(
        self, sockets: Sequence[socket.socket], notify: NotifySocket | None
    ) -> StartedContainer:
        # A container is proxied: it gets none of lazyd's sockets, and no notify socket.
        spawner = current_spawner()
        try:
            run = await spawner.start_container(self.config.name)
        except SpawnError as exc:
            raise LaunchError(f"{self.config.name}: cannot start container "
                              f"{self.config.container}: {exc}") from None
        self.last = run
        return StartedContainer(spawner, run, self.config, self.log)

    def status(self) -> dict[str, Any]:
        """The container's part of `status`: its name, engine, id and state."""
        run = self.last
        return {
            "name": self.config.container,
            "engine": engine_address(self.config),
            "id": None if run is None else run.id,
            "state": None if run is None else run.state,
            "health": None if run is None else run.health,
        }


async def check_containers(
    spawner: Spawner, config: Config, log: Callable[[str], None]
) -> None:
    """At start-up: every container service's container must exist on its engine
    (asked of the helper, all at once). Raises ConfigError naming each missing
    one; an engine that cannot be reached is a warning (a remote one may be
    down for now: each start then says why it failed)."""
    problems: list[str] = []

    async def check(service: ServiceConfig) -> None:
        try:
            await spawner.container(service.name, "inspect")
        except SpawnError as exc:
            line = f"{config.path}: services.{service.name}.container: {exc}"
            if str(exc).startswith("no container named"):
                problems.append(line)
            else:
                log_at(log, Level.WARNING, f"lazyd: {line}")

    async with trio.open_nursery() as nursery:
        for service in config.services.values():
            if service.container is not None:
                nursery.start_soon(check, service)
    if problems:
        raise ConfigError(sorted(problems))
