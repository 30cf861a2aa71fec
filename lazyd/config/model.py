"""The model: what lazyd holds and what it starts, as immutable values.

Every default lives in the dataclass fields below and nowhere else (the
loader reads them from here; `plan()` compares against them).  No I/O: the
checks against the machine are `lazyd.config.host`'s.  The lifecycle's own
enums (`Ready`, `ReadyKind`, `Restart`) come from `lazyd.core.policy`.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from lazyd.config.datapath import Datapath
from lazyd.core.policy import READY_STARTED, Policy, Ready, Restart
from lazyd.net.addresses import Address, Network

# Defaults for the values that are not plain field defaults.
DEFAULT_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
DEFAULT_SOCKET_MODE = 0o666
# The account the daemon drops to when the config names no top-level user (if
# it exists; else a uid of its own, see lazyd.runtime.privileges).
DEFAULT_USER = "lazyd"


class Mode(enum.Enum):
    PASS = "pass"
    PROXY = "proxy"

    @property
    def hands_over_sockets(self) -> bool:
        """Whether the service inherits lazyd's listening sockets (pass), or binds
        its own upstream and is reached only through lazyd (proxy)."""
        return self is Mode.PASS


class Activate(enum.Enum):
    LAZY = "lazy"
    EAGER = "eager"


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
    allow: tuple[Network, ...] | None = None  # proxy, TCP/UDP: None admits every source
    deny: tuple[Network, ...] = ()  # proxy, TCP/UDP: refused even if allowed


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    command: tuple[str, ...]
    sockets: tuple[SocketConfig, ...]
    mode: Mode = Mode.PASS
    user: str | None = None
    group: str | None = None  # None: the user's primary group
    ready: Ready = READY_STARTED  # proxy mode: Ready(CONNECT) unless given
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
    # A held connection costs one fd and no task; past this many the kernel's
    # backlog (somaxconn, often 4096) holds the rest, and past that SYNs are
    # dropped and retried a second later.
    queue_limit: int = 16384
    datagram_queue_limit: int = 1024
    idle_timeout: float | None = None  # proxy mode only
    max_connections: int | None = None  # proxy: open forwarded connections at most
    flow_timeout: float = 60.0  # proxy, datagrams: a client's flow ends after this silence
    # Proxy: connections (held and forwarded) and datagram flows open at once
    # per client IP address.  256 is a few dozen busy browsers behind one NAT
    # (six connections each to a host), yet one address can no longer take
    # every fd and every flow for itself; README's key table says more.
    max_connections_per_source: int | None = 256
    # Proxy, streams: a forwarded connection with no byte either way for this
    # long is closed.  Off unless asked for: a quiet websocket or ssh session
    # is not a broken one.
    connection_idle_timeout: float | None = None
    # Proxy, TCP: which path the bytes take once warm (lazyd.config.datapath).
    datapath: Datapath = Datapath.USERSPACE
    # A service that is an existing container (instead of `command`): its
    # name, the engine that has it (None: the default, see
    # lazyd.backends.container.engine.default_address) and client TLS to a
    # tcp:// engine (ca, cert, key: PEM files).
    container: str | None = None
    engine: str | None = None
    engine_tls: tuple[str, str, str] | None = None

    @property
    def policy(self) -> Policy:
        """What the lifecycle is driven by (see lazyd.core.policy)."""
        return Policy(
            ready=self.ready, start_timeout=self.start_timeout, stop_signal=self.stop_signal,
            stop_timeout=self.stop_timeout, restart=self.restart, start_limit=self.start_limit,
            start_limit_interval=self.start_limit_interval,
        )


@dataclass(frozen=True)
class Config:
    path: str
    services: Mapping[str, ServiceConfig]
    control: str | None = None  # control socket path (from `control: unix:PATH`)
    metrics: Address | None = None
    user: str | None = None  # the unprivileged user lazyd drops to after binding
    allow_shared_user: bool = False  # may a service run as the user the daemon drops to?
