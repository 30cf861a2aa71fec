"""`lazyd demo`: a cold start with held connections, shown for real.

Runs a lazyd daemon in this process with one pass-mode web service that takes
half a second to start, fires a burst of HTTP clients at it before it exists,
and shows that every one is answered by a single start; then lets the service
go idle and exit, and shows the next client starting it again.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import trio

from lazyd import config as config_mod
from lazyd.demo import boot
from lazyd.runtime.daemon import Daemon, serve
from lazyd.runtime.service import Options

CLIENTS = 20
START_DELAY = 0.5
IDLE_EXIT = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _get(port: int) -> tuple[float, bytes]:
    """One HTTP request; returns (seconds until the answer, body)."""
    started = time.monotonic()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some(4096):
            response += chunk
    return time.monotonic() - started, response.partition(b"\r\n\r\n")[2]


async def _burst(port: int, count: int) -> list[tuple[float, bytes]]:
    results: list[tuple[float, bytes]] = []

    async def one() -> None:
        results.append(await _get(port))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return results


def _write_config(directory: Path, port: int) -> Path:
    user = "root" if os.geteuid() == 0 else None
    path = directory / "demo.yaml"
    path.write_text(
        f"control: unix:{directory / 'lazyd.sock'}\n"
        "services:\n"
        "  web:\n"
        f"    command: [{sys.executable}, -m, lazyd.demo.programs.web,"
        f" --delay, '{START_DELAY}', --idle, '{IDLE_EXIT}']\n"
        + (f"    user: {user}\n" if user else "")
        + "    ready: notify\n"
        "    sockets:\n"
        f"      http: tcp://127.0.0.1:{port}\n"
    )
    return path


async def _cold_start(directory: Path) -> None:
    port = _free_port()
    config = config_mod.load(str(_write_config(directory, port)))
    log_lines: list[str] = []

    def log(line: str) -> None:
        log_lines.append(line)
        _say(f"    | {line}")

    _say(f"1. Cold start with held connections (service start-up takes {START_DELAY:g} s)")
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(
            lambda task_status: serve(config, options=Options(log=log, output=log),
                                      task_status=task_status)
        )
        _say(f"   lazyd holds tcp://127.0.0.1:{port}; the service is not running.")
        _say(f"   {CLIENTS} clients connect at once...")
        with trio.fail_after(30):
            results = await _burst(port, CLIENTS)
        pids = {body for _, body in results}
        waits = sorted(t for t, _ in results)
        web = daemon.runners["web"]
        _say(
            f"   {len(results)}/{CLIENTS} answered, by {len(pids)} process "
            f"({web.machine.activations} start); waits {waits[0] * 1000:.0f}"
            f" to {waits[-1] * 1000:.0f} ms, none refused, none retried."
        )

        _say(f"\n2. Idle exit and re-activation (the service exits after {IDLE_EXIT:g} s idle)")
        with trio.fail_after(30):
            while web.machine.process:
                await web.changed.wait()
        _say("   the service exited; lazyd holds the socket again. One more client:")
        with trio.fail_after(30):
            wait, body = await _get(port)
        _say(
            f"   answered in {wait * 1000:.0f} ms by a new process "
            f"({body.decode().strip()}); activations: {web.machine.activations}."
        )
        await daemon.shutdown()
    starts = [line for line in log_lines if ": ready in " in line]
    _say("\n   Every start, as lazyd logged it:")
    for line in starts:
        _say(f"     {line}")


async def _boots() -> tuple[boot.Boot, boot.Boot]:
    delays = boot.DEFAULT_DELAYS
    user = "root" if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="lazyd-boot-seq-") as tmp:
        sequential = await boot.boot_sequential(Path(tmp), delays)
    with tempfile.TemporaryDirectory(prefix="lazyd-boot-par-") as tmp:
        parallel = await boot.boot_parallel(Path(tmp), delays, user)
    return sequential, parallel


def main() -> int:
    _say("lazyd demo: a service that does not exist until somebody needs it.\n")
    with tempfile.TemporaryDirectory(prefix="lazyd-demo-") as tmp:
        trio.run(_cold_start, Path(tmp))
    _say(
        "\n3. Parallel boot: logd <- bus <- device (syslog <- dbus <- bluetooth), which talk\n"
        "   to each other only through sockets."
    )
    sequential, parallel = trio.run(_boots)
    for line in boot.summary(sequential, parallel, boot.DEFAULT_DELAYS):
        _say(line)
    ok = not sequential.lost and not parallel.lost
    _say("\ndone." if ok else "\nmessages were lost!")
    return 0 if ok else 1
