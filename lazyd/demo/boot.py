"""The parallel-boot demonstration: syslog ← dbus ← bluetooth, for real.

Three bundled programs (lazyd.demo.programs.logd, .bus, .device) depend on each
other only through sockets.  Booted one after another, each waiting for the
previous one to be ready (a classic init), the boot takes the sum of their
start-up times.  Booted through lazyd, whose sockets exist before the
services do, all three start at once and early messages wait in the sockets:
the boot takes about the longest start-up time.  Both boots must deliver every
message.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from lazyd import config as config_mod
from lazyd.core.lifecycle import Outcome
from lazyd.readiness.notify import open_notify_socket
from lazyd.runtime.daemon import serve
from lazyd.runtime.service import Options

SERVICES = ("logd", "bus", "device")
DEFAULT_DELAYS = {"logd": 0.3, "bus": 0.2, "device": 0.1}
EXPECTED_MESSAGES = (
    "bus: starting",
    "device: starting",
    "bus: message 'hello from device'",
    "device: bus answered 'ok hello from device'",
)


@dataclass
class Boot:
    """One boot: when each service was started and ready, relative to the boot's start."""

    total: float
    started: dict[str, float]
    ready: dict[str, float]
    messages: list[str]

    @property
    def lost(self) -> list[str]:
        return [m for m in EXPECTED_MESSAGES if m not in self.messages]


def _paths(directory: Path) -> dict[str, str]:
    return {
        "log": str(directory / "log.sock"),
        "bus": str(directory / "bus.sock"),
        "device": str(directory / "device.sock"),
        "out": str(directory / "messages.txt"),
    }


def commands(directory: Path, delays: dict[str, float]) -> dict[str, list[str]]:
    p = _paths(directory)
    py = [sys.executable, "-m"]
    return {
        "logd": [*py, "lazyd.demo.programs.logd", "--socket", p["log"], "--out", p["out"],
                 "--delay", str(delays["logd"])],
        "bus": [*py, "lazyd.demo.programs.bus", "--socket", p["bus"], "--log", p["log"],
                "--delay", str(delays["bus"])],
        "device": [*py, "lazyd.demo.programs.device", "--socket", p["device"], "--bus", p["bus"],
                   "--log", p["log"], "--delay", str(delays["device"])],
    }


def config_text(directory: Path, delays: dict[str, float], user: str | None) -> str:
    """conf/boot.yaml's shape, with this run's paths and delays."""
    p = _paths(directory)
    cmds = commands(directory, delays)
    sockets = {
        "logd": f"log: unix-dgram:{p['log']}",
        "bus": f"bus: unix:{p['bus']}",
        "device": f"device: unix:{p['device']}",
    }
    requires = {"logd": "[]", "bus": "[logd]", "device": "[bus]"}
    lines = [f"control: unix:{directory / 'lazyd.sock'}", "services:"]
    for name in SERVICES:
        lines += [
            f"  {name}:",
            f"    command: [{', '.join(repr(c) for c in cmds[name])}]",
            "    ready: notify",
            f"    requires: {requires[name]}",
            f"    sockets: {{{sockets[name]}}}",
        ]
        if user:
            lines.append(f"    user: {user}")
        if name == "device":
            lines.append("    activate: eager")
    return "\n".join(lines) + "\n"


async def _read_messages(path: str, timeout: float = 5.0) -> list[str]:
    """The log daemon's output, once every expected message is in (or time is up)."""
    with trio.move_on_after(timeout):
        while True:
            try:
                lines = Path(path).read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if all(m in lines for m in EXPECTED_MESSAGES):
                return lines
            await trio.sleep(0.01)  # a file has no event to wait for
    return lines


async def boot_sequential(directory: Path, delays: dict[str, float]) -> Boot:
    """A classic init: start each service, wait for its READY=1, then the next.
    The services bind their own sockets, as they would without lazyd."""
    cmds = commands(directory, delays)
    started: dict[str, float] = {}
    ready: dict[str, float] = {}
    processes: list[trio.Process] = []
    t0 = trio.current_time()
    try:
        for name in SERVICES:
            with open_notify_socket(name) as notify:
                started[name] = trio.current_time() - t0
                process = await trio.lowlevel.open_process(
                    cmds[name],
                    env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": notify.address},
                    stdin=subprocess.DEVNULL,
                )
                processes.append(process)
                with trio.fail_after(30):
                    while not (await notify.receive()).ready:
                        pass
                ready[name] = trio.current_time() - t0
        total = trio.current_time() - t0
        messages = await _read_messages(_paths(directory)["out"])
    finally:
        for process in processes:
            process.kill()
            await process.wait()
    return Boot(total, started, ready, messages)


async def boot_parallel(directory: Path, delays: dict[str, float], user: str | None) -> Boot:
    """Boot through lazyd: `device` is eager and requires `bus`, which requires
    `logd`; all three start at the same moment."""
    path = directory / "boot.yaml"
    path.write_text(config_text(directory, delays, user))
    config = config_mod.load(str(path))
    lines: list[str] = []
    options = Options(log=lines.append, output=lines.append)
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(
            lambda task_status: serve(config, options=options, task_status=task_status)
        )
        runners = daemon.runners
        with trio.fail_after(30):
            while not all(
                any(a.outcome is Outcome.READY for a in runners[n].history) for n in SERVICES
            ):
                await trio.sleep(0.005)
        # Measured, like the sequential boot, from the first start lazyd made:
        # lazyd's own start-up (binding, the spawner) is not part of it, as an
        # init's own is not part of (a).
        t0 = min(runners[n].history[0].trigger for n in SERVICES)
        total = trio.current_time() - t0
        started = {n: runners[n].history[0].trigger - t0 for n in SERVICES}
        ready = {n: (runners[n].history[0].ready or 0.0) - t0 for n in SERVICES}
        messages = await _read_messages(_paths(directory)["out"])
        await daemon.shutdown()
    return Boot(total, started, ready, messages)


def timeline(boot: Boot, delays: dict[str, float], width: int = 50) -> list[str]:
    """One text row per service: start '|', start-up work '=', ready '>'."""
    scale = width / max(boot.total, 1e-9)
    rows = []
    for name in SERVICES:
        start = int(boot.started[name] * scale)
        end = max(start + 1, int(boot.ready[name] * scale))
        bar = " " * start + "|" + "=" * (end - start - 1) + ">"
        rows.append(
            f"    {name:<7}{bar:<{width + 1}}  started {boot.started[name] * 1000:5.0f} ms, "
            f"ready {boot.ready[name] * 1000:5.0f} ms (start-up work {delays[name] * 1000:.0f} ms)"
        )
    return rows


def summary(seq: Boot, par: Boot, delays: dict[str, float]) -> Sequence[str]:
    out = ["  (a) one after another, each waiting for the previous to be ready:"]
    out += timeline(seq, delays)
    out.append(f"      boot took {seq.total * 1000:.0f} ms; messages lost: {len(seq.lost)}")
    out.append("  (b) all at once through lazyd's held sockets:")
    out += timeline(par, delays)
    out.append(f"      boot took {par.total * 1000:.0f} ms; messages lost: {len(par.lost)}")
    out.append(
        f"  parallel / sequential = {par.total / seq.total:.2f} "
        f"(sum of start-up work {sum(delays.values()) * 1000:.0f} ms, "
        f"longest {max(delays.values()) * 1000:.0f} ms)"
    )
    return out

