"""What a reload changes, decided from the two configs alone.

`plan_reload(old, new)` is pure: it says, for every service of the new
config, whether its runner is kept as it is, takes new settings (at its next
start, or at once by a restart), or is replaced by a new runner; which
services are removed; and which of the old sockets each new socket is (a
socket whose kind and address did not change stays open throughout, so no
client is refused during a reload) or that it must be bound afresh.  The
daemon (`lazyd.runtime.daemon`) carries the plan out; tests check it without
a socket or a process.

It lives beside the model rather than in `lazyd.core`: it reads every field
of `ServiceConfig`, and the core imports nothing above itself.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from lazyd.config.model import Config, Mode, ServiceConfig, SocketConfig

# Sockets with the same key are the same socket across a reload.
SocketKey = tuple[str, str]

# What a running process was started with: a change needs a restart to apply.
STARTED_WITH = ("command", "user", "group", "environment", "workdir", "mode")
# What lazyd's own proxies serve with: a change needs a new runner.
SERVED_WITH = ("sockets", "queue_limit", "datagram_queue_limit", "max_connections",
               "flow_timeout", "idle_timeout", "max_connections_per_source",
               "connection_idle_timeout")


def socket_key(sc: SocketConfig) -> SocketKey:
    return (sc.listen.kind.value, str(sc.listen))


class Change(enum.Enum):
    ADD = "added"  # a new service: a new runner on its sockets
    KEEP = "kept"  # nothing changed
    RECONFIGURE = "changed"  # new settings, from its next start
    RESTART = "restarted"  # new settings its process must be restarted for
    REPLACE = "replaced"  # how lazyd serves it changed: a new runner takes over


@dataclass(frozen=True)
class ReloadPlan:
    changes: Mapping[str, Change]  # every service of the new config
    removed: tuple[str, ...]
    # For each service of the new config, per socket in config order: the key
    # of the old socket it is, or None for one to bind.
    sockets: Mapping[str, tuple[SocketKey | None, ...]]
    retired: tuple[SocketKey, ...]  # old sockets that no service keeps
    warnings: tuple[str, ...]  # what a reload cannot change (said, not done)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    held = {socket_key(sc) for svc in old.services.values() for sc in svc.sockets}
    kept: set[SocketKey] = set()
    sockets: dict[str, tuple[SocketKey | None, ...]] = {}
    for name, svc in new.services.items():
        reuse: list[SocketKey | None] = []
        for sc in svc.sockets:
            key = socket_key(sc)
            if key in held and key not in kept:
                kept.add(key)
                reuse.append(key)
            else:
                reuse.append(None)
        sockets[name] = tuple(reuse)
    changes = {name: _change(old.services.get(name), svc, sockets[name])
               for name, svc in new.services.items()}
    warnings = []
    if new.metrics != old.metrics:
        warnings.append("a new metrics: address takes effect when lazyd restarts; the "
                        "endpoint stays where it is")
    if new.user != old.user:
        warnings.append("a new top-level user: takes effect when lazyd restarts")
    return ReloadPlan(
        changes=changes,
        removed=tuple(name for name in old.services if name not in new.services),
        sockets=sockets,
        retired=tuple(sorted(held - kept)),
        warnings=tuple(warnings),
    )


def _change(old: ServiceConfig | None, new: ServiceConfig,
            reuse: tuple[SocketKey | None, ...]) -> Change:
    if old is None:
        return Change.ADD
    same_sockets = list(reuse) == [socket_key(sc) for sc in old.sockets]
    if new == old and same_sockets:
        return Change.KEEP
    if old.mode is not new.mode:
        return Change.REPLACE
    if old.mode is Mode.PROXY and (
        not same_sockets or any(getattr(old, k) != getattr(new, k) for k in SERVED_WITH)
    ):
        # The proxies own their sockets' accept loops.
        return Change.REPLACE
    if any(getattr(old, k) != getattr(new, k) for k in STARTED_WITH):
        return Change.RESTART
    names_changed = [sc.name for sc in old.sockets] != [sc.name for sc in new.sockets]
    return Change.RESTART if names_changed or not same_sockets else Change.RECONFIGURE
