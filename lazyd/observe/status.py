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
        **datapath_status(runner),
        # Null where lazyd does not carry the bytes: pass mode, the kernel path.
        "bytes_in": traffic.bytes_in,
        "bytes_out": traffic.bytes_out,
    }
    container = runner.container_status()
    if container is not None:
        entry["container"] = container  # name, engine, id, state, health
    if history:
        entry["starts"] = [r.to_json() for r in records]
    return entry


def datapath_status(runner: ServiceRunner) -> dict[str, Any]:
    """The data path a service's bytes take once warm ("kernel" or "userspace"),
    whether new connections are steered into it now, and how many were steered
    since lazyd started (null off the kernel path)."""
    kernel = runner.kernel_path
    return {
        "datapath": "kernel" if kernel else "userspace",
        "steering": runner.steering.steering,
        "steered": runner.steering.steered() if kernel else None,
    }


def daemon_status(
    runners: Mapping[str, ServiceRunner], now: float, tasks: int, *, history: bool = False
) -> dict[str, Any]:
    """The whole reply to `status`; `tasks` counts the daemon's trio tasks (a
    count that only grows is a leak)."""
    services = {name: service_status(r, now, history=history) for name, r in runners.items()}
    return {"ok": True, "pid": os.getpid(), "tasks": tasks, "services": services}


# --- the table `lazyd status` prints (and `status --watch` redraws) ----------


def _cell(value: Any, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def format_uptime(seconds: float | None) -> str:
    """45s, 12m05s, 3h07m, 2d04h; '-' when not running."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _last_start(svc: dict[str, Any]) -> str:
    from lazyd.observe.analyze import format_ms

    outcome = svc.get("last_outcome")
    if outcome not in (None, "ready"):
        return str(outcome)  # failed, timed out: there is no time to show
    return format_ms(svc.get("last_start_ms"))


def _container_id(svc: dict[str, Any]) -> str | None:
    """A container service's short id (as `docker ps` shows it), in the PID column."""
    container = svc.get("container") or {}
    running = svc.get("state") in ("starting", "running", "stopping")
    return str(container["id"])[:12] if running and container.get("id") else None


def format_status(services: dict[str, Any]) -> str:
    """The table `lazyd status` prints."""
    from lazyd.observe.analyze import format_ms

    header = ("SERVICE", "STATE", "PID", "UPTIME", "STARTS", "QUEUED", "ACTIVE",
              "LAST START", "P50", "P90")
    rows = [header]
    for name, svc in services.items():
        rows.append(
            (
                name,
                str(svc.get("state")),
                _cell(svc.get("pid") or _container_id(svc)),
                format_uptime(svc.get("uptime_s")),
                _cell(svc.get("activations")),
                _cell(svc.get("queued")),
                _cell(svc.get("active")),
                _last_start(svc),
                format_ms(svc.get("p50_ms")),
                format_ms(svc.get("p90_ms")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    for name, svc in services.items():
        if svc.get("datapath") == "kernel":
            now = "steering new connections" if svc.get("steering") else "not steering now"
            count = svc.get("steered")
            lines.append(f"{name}: kernel data path, {now}, {count} "
                         f"connection{'' if count == 1 else 's'} steered")
        if svc.get("status"):
            lines.append(f"{name}: {svc['status']}")
    return "\n".join(lines)
