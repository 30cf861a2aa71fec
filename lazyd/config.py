"""The configuration: what lazyd holds and what it starts.

Every default lives in the dataclass fields below and nowhere else.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from lazyd.addresses import Address

# Defaults for the values that are not plain field defaults.
DEFAULT_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
DEFAULT_SOCKET_MODE = 0o666


class Mode(enum.Enum):
    PASS = "pass"
    PROXY = "proxy"


class Restart(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class Activate(enum.Enum):
    LAZY = "lazy"
    EAGER = "eager"


class ReadyKind(enum.Enum):
    STARTED = "started"
    NOTIFY = "notify"
    CONNECT = "connect"
    DELAY = "delay"


@dataclass(frozen=True)
class Ready:
    kind: ReadyKind
    delay: float = 0.0  # seconds, for ReadyKind.DELAY

    def __str__(self) -> str:
        if self.kind is ReadyKind.DELAY:
            return f"delay {self.delay * 1000:g} ms"
        return self.kind.value


@dataclass(frozen=True)
class SocketConfig:
    name: str
    listen: Address
    upstream: Address | None = None
    backlog: int = DEFAULT_BACKLOG
    reuse_port: bool = False
    mode: int = DEFAULT_SOCKET_MODE  # Unix socket file mode
    owner: str | None = None  # Unix socket file owner (user name)
    group: str | None = None  # Unix socket file group (group name)
    proxy_protocol: str | None = None  # "v1" | "v2"


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    command: tuple[str, ...]
    sockets: tuple[SocketConfig, ...]
    mode: Mode = Mode.PASS
    user: str | None = None
    group: str | None = None  # None: the user's primary group
    ready: Ready = Ready(ReadyKind.STARTED)  # proxy mode: Ready(CONNECT) unless given
    environment: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    start_timeout: float = 30.0
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    restart: Restart = Restart.NO
    start_limit: int = 5
    start_limit_interval: float = 10.0
    requires: tuple[str, ...] = ()
    activate: Activate = Activate.LAZY
    queue_limit: int = 1024
    datagram_queue_limit: int = 1024
    idle_timeout: float | None = None  # proxy mode only


@dataclass(frozen=True)
class Config:
    path: str
    services: Mapping[str, ServiceConfig]
    control: str | None = None  # control socket path (from `control: unix:PATH`)
    metrics: Address | None = None
    user: str | None = None  # the unprivileged user lazyd drops to after binding
