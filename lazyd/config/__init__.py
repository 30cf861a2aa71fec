"""The configuration: what a user writes, read into an immutable model.

Owns the model (`model`: `Config`, `ServiceConfig`, `SocketConfig` and their
enums, every default), the YAML reader that keeps every node's mark so that
each problem reads `FILE:LINE:COL: path.to.key: what is wrong` (`reader`),
the pure converters (`convert`), the table of keys of each section (`keys`:
where a new key goes), the section walkers (`sections`, `sockets`), the
checks against the machine (`host`: users, groups, programs, directories,
with `ownership`), the entry points (`loader`), `plan()`, the presentation
`lazyd check` prints (`plan`), the reload plan (`reload`) and `lazyd
import` (`units`).  Imports only `lazyd.errors`, `lazyd.core.policy`,
`lazyd.net` (addresses and networks) and the standard library.
"""

from __future__ import annotations

from lazyd.config.convert import parse_duration, parse_signal
from lazyd.config.host import Host, Machine
from lazyd.config.loader import load, loads
from lazyd.config.model import (
    DEFAULT_BACKLOG,
    DEFAULT_SOCKET_MODE,
    DEFAULT_USER,
    Activate,
    Config,
    Mode,
    ServiceConfig,
    SocketConfig,
)
from lazyd.config.plan import plan
from lazyd.core.policy import Ready, ReadyKind, Restart

__all__ = [
    "DEFAULT_BACKLOG", "DEFAULT_SOCKET_MODE", "DEFAULT_USER", "Activate", "Config", "Host",
    "Machine", "Mode", "Ready", "ReadyKind", "Restart", "ServiceConfig", "SocketConfig", "load",
    "loads", "parse_duration", "parse_signal", "plan",
]
