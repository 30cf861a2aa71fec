"""What `lazyd status --json` shows: one snapshot per service, built in one
place from the runner's lifecycle, its start history and its `Traffic`.

The metrics endpoint reads the same `Traffic` (lazyd.observe.metrics) and
`lazyd analyze` reads this JSON, so the three never disagree on a figure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lazyd.core.lifecycle import State

if TYPE_CHECKING:  # the runtime imports this module's callers, not this module
    from lazyd.runtime.service import ServiceRunner


def service_status(runner: ServiceRunner, now: float, *, history: bool = False) -> dict[str, Any]:
    """One service's entry of `status --json`; `history` adds every recorded start."""
    runner.refresh_first_byte()
    traffic = runner.traffic()
    records = runner.history
    last = records[-1] if records else None
    ready = [r for r in records if r.ready is not None]
    up = runner.state is State.RUNNING and ready
    total = last.total if last is not None else None
    if runner.proxied:
        # Held by lazyd: connections and datagrams alike.
        queued: int | None = (traffic.connections_waiting or 0) + (traffic.datagrams_waiting or 0)
    else:
        queued = traffic.connections_waiting  # the kernel's accept queues, TCP only
    entry: dict[str, Any] = {
        "state": runner.state.value,
        "pid": runner.main_pid,
        "activations": runner.machine.activations,
        "queued": queued,
        "active": traffic.active,  # pass mode: None, the service accepts itself
        "refused": traffic.refused,  # allow/deny, max_connections_per_source
        "last_start_ms": None if total is None else round(total * 1000, 3),
        "last_start_at": None if last is None else round(last.wall, 3),
        "last_outcome": None if last is None else last.outcome.value,
        "uptime_s": round(now - ready[-1].ready, 3) if up and ready[-1].ready else None,
        **records.summary(),
        "mode": runner.config.mode.value,
        "status": runner.status_text,
        "sockets": {sc.name: str(sc.listen) for sc in runner.config.sockets},
    }
    if history:
        entry["starts"] = [r.to_json() for r in records]
    return entry


def daemon_status(
    runners: Mapping[str, ServiceRunner], now: float, tasks: int, *, history: bool = False
) -> dict[str, Any]:
    """The whole reply to `status`; `tasks` counts the daemon's trio tasks (a
    count that only grows is a leak)."""
    services = {name: service_status(r, now, history=history) for name, r in runners.items()}
    return {"ok": True, "pid": os.getpid(), "tasks": tasks, "services": services}
