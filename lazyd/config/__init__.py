"""The configuration: what a user writes, read into an immutable model.

Owns the model (`Config`, `ServiceConfig`, `SocketConfig` and their enums),
the YAML reader that keeps every node's mark so that each problem reads
`FILE:LINE:COL: path.to.key: what is wrong`, the converters, the checks
against the host (users, groups, programs, directories) and `plan()`, the
presentation `lazyd check` prints.  Imports only `lazyd.errors`,
`lazyd.net` (addresses and networks) and the standard library.
"""

from __future__ import annotations

from lazyd.config.loader import (
    DEFAULT_BACKLOG,
    DEFAULT_SOCKET_MODE,
    Activate,
    Config,
    Mode,
    ServiceConfig,
    SocketConfig,
    load,
    loads,
    parse_duration,
    parse_signal,
    plan,
)
from lazyd.core.policy import Ready, ReadyKind, Restart

__all__ = [
    "DEFAULT_BACKLOG", "DEFAULT_SOCKET_MODE", "Activate", "Config", "Mode", "Ready",
    "ReadyKind", "Restart", "ServiceConfig", "SocketConfig", "load", "loads",
    "parse_duration", "parse_signal", "plan",
]
