"""What the lifecycle needs to know of a service's config, and nothing more.

The lifecycle (`lazyd.core.lifecycle`) takes a `Policy`: readiness, restarts,
the start limit and the timeouts.  The YAML model (`lazyd.config`) builds one
for each service (`ServiceConfig.policy`) and uses these enums in its own
fields, so the pure logic imports nothing from the layers above it.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass


class Restart(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class ReadyKind(enum.Enum):
    STARTED = "started"
    NOTIFY = "notify"
    CONNECT = "connect"
    DELAY = "delay"
    HEALTH = "health"  # a container's own healthcheck passes


@dataclass(frozen=True)
class Ready:
    kind: ReadyKind
    delay: float = 0.0  # seconds, for ReadyKind.DELAY

    def __str__(self) -> str:
        if self.kind is ReadyKind.DELAY:
            return f"delay {self.delay * 1000:g} ms"
        return str(self.kind.value)


READY_STARTED = Ready(ReadyKind.STARTED)


@dataclass(frozen=True)
class Policy:
    """How one service is started, judged ready, stopped and restarted."""

    ready: Ready = READY_STARTED
    start_timeout: float = 30.0
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    restart: Restart = Restart.NO
    start_limit: int = 5
    start_limit_interval: float = 10.0
