"""Listen backlogs the kernel cuts short: net.core.somaxconn.

listen() silently lowers a backlog above net.core.somaxconn (of lazyd's
network namespace) to it, for every stream socket, TCP and Unix alike.  A
socket whose config asks for a deeper accept queue then gets a shallower one,
and once that fills during a cold start (pass mode), or once `queue_limit` is
reached (proxy mode), further SYNs are dropped and their clients wait a
second or more before they try again.  `lazyd check` and `lazyd run` (once,
at start-up) say so for each such socket, with the command that lifts the cap.

The default backlog (65535, `DEFAULT_BACKLOG`) means "as deep as the kernel
allows": it is capped on nearly every machine by design, so only a backlog
the config sets is compared.  A socket lazyd was handed already bound (it was
socket-activated itself) keeps the backlog its service manager gave it, and
the caller leaves it out.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path

from lazyd.config import Config
from lazyd.config.model import DEFAULT_BACKLOG

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def somaxconn(path: Path = SOMAXCONN) -> int | None:
    """The kernel's cap on listen backlogs; None where it cannot be read."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def capped_backlogs(
    config: Config, cap: int | None, skip: Container[tuple[str, str]] = ()
) -> list[str]:
    """One warning per stream socket whose configured backlog is above `cap`
    (sockets in `skip`, as (service, socket), are left out)."""
    if cap is None:
        return []
    return [
        f"lazyd: services.{name}.sockets.{sc.name}: backlog {sc.backlog} is capped at "
        f"{cap} by net.core.somaxconn; raise the cap with "
        f"`sysctl -w net.core.somaxconn={sc.backlog}`"
        for name, service in config.services.items()
        for sc in service.sockets
        if sc.listen.is_stream and sc.backlog != DEFAULT_BACKLOG and sc.backlog > cap
        and (name, sc.name) not in skip
    ]
