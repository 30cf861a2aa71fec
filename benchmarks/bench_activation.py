"""Cold start, connect → first byte: lazyd (pass and proxy mode) against
systemd-socket-activate (alone, and chained to systemd-socket-proxyd).

A client connects to a socket nobody has accepted on yet and times how long it
takes until the first byte arrives: the activator notices the connection and
starts the service with the listener at fd 3 (LISTEN_FDS, LISTEN_PID,
LISTEN_FDNAMES); the service accepts and writes one byte. Three rows,
interleaved in one run (lazyd and systemd-socket-activate take turns at going
first), after one unrecorded warm-up round of each:

- direct: the service's own start-up, exec → first byte. A child forked in
  advance (the fork, and waking an idle CPU for it, are the activator's work)
  waits on the daemon's CPU with the listener at fd 3; once the client has
  connected it notes the time (CLOCK_MONOTONIC, as the client) and execs the
  service. This row is subtracted from the others ("minus service start-up"),
  leaving what each activator adds. The launcher is a fork of this Python
  process, so its exec discards more memory than systemd-socket-activate's
  does: that remainder can come out just below zero.
- systemd-socket-activate: binds, waits, and on the first connection execs
  the service in place of itself; so it is started afresh every round, before
  the client connects (its own start-up is not counted).
- lazyd: one `lazyd run` for the whole run. The service serves one connection
  and exits, and lazyd holds the socket again, so every round is a cold start
  without restarting lazyd. The `spawn` figure of its log line (`bench: ready
  in X ms (spawn Y ms, readiness Z ms)`) is reported too.
- lazyd (proxy): another `lazyd run`, in proxy mode. The service binds its
  own port (`--bind`), lazyd's `ready: connect` probe finds it and the held
  client is forwarded; `idle_timeout: 20ms` stops the service after each
  round, so that every round is a cold start.
- systemd-socket-activate + systemd-socket-proxyd: the activator execs a
  shell that starts the service (`--bind --fork`: it forks once it listens
  and the parent exits, as a Type=forking unit is ready) and then execs
  systemd-socket-proxyd, which connects to it: the chain systemd needs for a
  service that binds its own port. Started afresh every round, as above.

Both proxy rows subtract the same service start-up as the others; binding
its own port costs the service a few microseconds more than taking fd 3.

The service is programs/first_byte.c, compiled here with `cc`, so that its own
start-up is small and the activators' overhead is not lost in its noise
(`--service python`, or no compiler: first_byte.py under `python -S`). The
daemon side (lazyd, systemd-socket-activate, the service) runs on CPU 0, the
client on CPU 1.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = Path(__file__).resolve().parent / "programs"
ACTIVATE = "/usr/bin/systemd-socket-activate"
PROXYD = "/lib/systemd/systemd-socket-proxyd"
HOST = "127.0.0.1"
TIMEOUT = 10.0  # seconds for any one step; a hang is a failure, not a figure
# A quiet moment before each measurement, so that the previous round's exit
# (lazyd reaping and re-arming, the kernel tearing down a process) is over.
SETTLE = 0.01
DAEMON_CPU, CLIENT_CPU = 0, 1
PINNED = {DAEMON_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
TARGET_MS = 2.0
TARGET_PROXY_MS = 3.0  # lazyd (proxy) within this of lazyd (pass)
LABELS = {
    "direct": "direct service start-up (exec → first byte)",
    "systemd": "systemd-socket-activate",
    "lazyd": "lazyd (pass)",
    "proxyd": "systemd-socket-activate + systemd-socket-proxyd",
    "lazyd-proxy": "lazyd (proxy)",
}


def pin_daemon_side() -> None:
    """Move the calling process to the daemon's CPU (children inherit it)."""
    if PINNED:
        os.sched_setaffinity(0, {DAEMON_CPU})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def first_byte(port: int, after_connect: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Connect, wait for the first byte; return both moments (time.monotonic())."""
    with socket.socket() as client:
        client.settimeout(TIMEOUT)
        connected = time.monotonic()
        client.connect((HOST, port))
        after_connect()
        data = client.recv(1)
        arrived = time.monotonic()
    if data != b"!":
        raise RuntimeError(f"the service answered {data!r} instead of b'!'")
    return connected, arrived


class Lines:
    """A child's stderr, read line by line with a deadline. No reader thread:
    nothing may compete with the client for the GIL while it waits."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.fd = stream.fileno()
        self.buffer = b""
        self.seen: list[str] = []

    def wait(self, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                self.seen.append(raw.decode(errors="replace"))
                if match := regex.search(self.seen[-1]):
                    return match
            left = deadline - time.monotonic()
            chunk = os.read(self.fd, 65536) if select.select([self.fd], [], [], left)[0] else b""
            if not chunk:
                raise RuntimeError(f"no line matched {pattern!r} in:\n" + "\n".join(self.seen))
            self.buffer += chunk


def run_direct(service: Sequence[str]) -> float:
    """The service's own start-up: exec → first byte, the listener already at fd 3."""
    ours, theirs = socket.socketpair()
    with socket.socket() as listener, ours, theirs:
        listener.bind((HOST, 0))
        listener.listen()
        pid = os.fork()
        if pid == 0:  # the child: only exec, or leave at once
            try:
                pin_daemon_side()
                os.dup2(listener.fileno(), 3)
                os.set_inheritable(3, True)  # dup2 onto itself would keep CLOEXEC
                env = {"PATH": os.defpath, "LISTEN_FDS": "1",
                       "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "bench"}
                theirs.sendall(b"r")
                theirs.recv(1)
                theirs.sendall(repr(time.monotonic()).encode())
                os.execve(service[0], list(service), env)
            finally:
                os._exit(127)
        theirs.close()
        ours.settimeout(TIMEOUT)
        try:
            if ours.recv(1) != b"r":
                raise RuntimeError("the direct launcher died before it was ready")
            time.sleep(SETTLE)
            _, arrived = first_byte(listener.getsockname()[1], lambda: ours.sendall(b"g"))
            execed = float(ours.recv(64))
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            raise
        finally:
            status = os.waitpid(pid, 0)[1]
    if status != 0:
        raise RuntimeError("the service failed when started directly")
    return (arrived - execed) * 1000


def run_systemd(service: Sequence[str]) -> float:
    """One cold start through a fresh systemd-socket-activate."""
    port = free_port()
    process = subprocess.Popen(
        [ACTIVATE, "-l", f"{HOST}:{port}", "--fdname=bench", "--", *service],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={"PATH": os.defpath}, preexec_fn=pin_daemon_side,
    )
    assert process.stderr is not None
    try:
        Lines(process.stderr).wait(r"^Listening on ")
        time.sleep(SETTLE)
        connected, arrived = first_byte(port)
        if process.wait(TIMEOUT) != 0:
            raise RuntimeError(f"the service failed under {ACTIVATE}")
    finally:
        process.kill()  # a no-op once it has exited
        process.wait()
        process.stderr.close()
    return (arrived - connected) * 1000


def run_proxyd(service: Sequence[str]) -> float:
    """One cold start through a fresh systemd-socket-activate execing a shell
    that starts the service and then systemd-socket-proxyd."""
    port, upstream = free_port(), free_port()
    address = f"{HOST}:{upstream}"
    script = (f"{' '.join(service)} --bind {address} --fork && "
              f"exec {PROXYD} {address}")
    process = subprocess.Popen(
        [ACTIVATE, "-l", f"{HOST}:{port}", "--", "/bin/sh", "-c", script],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={"PATH": os.defpath}, preexec_fn=pin_daemon_side, start_new_session=True,
    )
    assert process.stderr is not None
    try:
        Lines(process.stderr).wait(r"^Listening on ")
        time.sleep(SETTLE)
        connected, arrived = first_byte(port)
    finally:
        # The proxy, and the service it left running in the background.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
    return (arrived - connected) * 1000


class Lazyd:
    """One `lazyd run` holding one service (pass or proxy mode) for the whole
    benchmark."""

    def __init__(self, tmp: Path, service: Sequence[str], mode: str = "pass") -> None:
        self.port = free_port()
        self.mode = mode
        user = "    user: root\n" if os.geteuid() == 0 else ""
        if mode == "proxy":
            upstream = f"{HOST}:{free_port()}"
            service = [*service, "--bind", upstream]
            sockets = (f"    mode: proxy\n    idle_timeout: 20ms\n    sockets:\n"
                       f"      bench: {{listen: 'tcp://{HOST}:{self.port}', "
                       f"upstream: 'tcp://{upstream}'}}\n")
        else:
            sockets = f"    sockets:\n      bench: tcp://{HOST}:{self.port}\n"
        command = ", ".join(f'"{part}"' for part in service)
        config = tmp / f"lazyd-{mode}.yaml"
        config.write_text(
            f"control: unix:{tmp / f'control-{mode}.sock'}\n"
            f"services:\n  bench:\n    command: [{command}]\n{user}{sockets}"
            # Every round is a start: lift the crash-loop guard far above the rounds.
            "    start_limit: 1000000\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lazyd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=ROOT, preexec_fn=pin_daemon_side,
        )
        assert self.process.stderr is not None
        self.lines = Lines(self.process.stderr)
        self.spawn_ms: list[float] = []
        self.readiness_ms: list[float] = []
        self.lines.wait(r"^lazyd: holding ")

    def round(self) -> float:
        time.sleep(SETTLE)
        connected, arrived = first_byte(self.port)
        line = self.lines.wait(r"^bench: ready in [\d.]+ ms \(spawn ([\d.]+) ms, "
                               r"readiness ([\d.]+) ms")
        self.spawn_ms.append(float(line[1]))
        self.readiness_ms.append(float(line[2]))
        # Only once the service is gone does lazyd hold the socket again: in
        # pass mode it exits after one connection, in proxy mode lazyd stops
        # it after idle_timeout.
        self.lines.wait(r"^bench: exited with status 0$" if self.mode == "pass"
                        else r"^bench: stopped \(idle\)")
        return (arrived - connected) * 1000

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(TIMEOUT)
        finally:
            self.process.kill()  # a no-op once it has exited
            self.process.wait()
            self.lines.stream.close()


def build_service(kind: str, tmp: Path) -> tuple[list[str], str]:
    """The service's command line, and a description of it for the output."""
    cc = shutil.which("cc")
    if kind == "c" and cc is not None:
        binary = tmp / "first_byte"
        subprocess.run([cc, "-O2", "-o", str(binary), str(PROGRAMS / "first_byte.c")], check=True)
        return [str(binary)], "first_byte.c (C)"
    return [sys.executable, "-S", str(PROGRAMS / "first_byte.py")], "first_byte.py (python -S)"


def report(results: dict[str, list[float]], spawn_ms: list[float], header: str,
           proxy_readiness_ms: Sequence[float] = ()) -> None:
    base = statistics.median(results["direct"])
    print(header, end="\n\n")
    print("| cold start, connect → first byte | median ms | p90 ms | minus service start-up ms |")
    print("|---|---:|---:|---:|")
    for key, label in LABELS.items():
        if key not in results:
            continue
        med = statistics.median(results[key])
        minus = "—" if key == "direct" else f"{med - base:.3f}"
        p90 = statistics.quantiles(results[key], n=10, method="inclusive")[8]
        print(f"| {label} | {med:.3f} | {p90:.3f} | {minus} |")
    lazyd, systemd = statistics.median(results["lazyd"]), statistics.median(results["systemd"])
    pairs = statistics.median(a - b for a, b in zip(results["lazyd"], results["systemd"],
                                                    strict=True))
    verdict = "met" if lazyd - systemd <= TARGET_MS else "NOT met"
    print(f"\nlazyd - systemd-socket-activate: {lazyd - systemd:+.3f} ms "
          f"(median of per-round differences {pairs:+.3f} ms); "
          f"ratio lazyd / systemd-socket-activate: {lazyd / systemd:.2f}x")
    print(f"target (lazyd within {TARGET_MS:g} ms of systemd-socket-activate): {verdict}")
    print(f"lazyd's own logged `spawn` (traffic seen → exec done), median: "
          f"{statistics.median(spawn_ms):.3f} ms")
    if "lazyd-proxy" not in results:
        return
    proxy, proxyd = statistics.median(results["lazyd-proxy"]), statistics.median(results["proxyd"])
    pairs = statistics.median(a - b for a, b in zip(results["lazyd-proxy"], results["lazyd"],
                                                    strict=True))
    verdict = "met" if proxy - lazyd <= TARGET_PROXY_MS else "NOT met"
    print(f"lazyd (proxy) - lazyd (pass): {proxy - lazyd:+.3f} ms (median of per-round "
          f"differences {pairs:+.3f} ms); target (proxy within {TARGET_PROXY_MS:g} ms of pass): "
          f"{verdict}")
    print(f"lazyd (proxy) - systemd-socket-activate + systemd-socket-proxyd: "
          f"{proxy - proxyd:+.3f} ms; ratio {proxy / proxyd:.2f}x")
    if proxy_readiness_ms:
        print(f"lazyd (proxy)'s logged `readiness` (exec done → its connect probe answered), "
              f"median: {statistics.median(proxy_readiness_ms):.3f} ms")


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rounds", type=int, default=30, help="rounds per row (%(default)s)")
    parser.add_argument("--service", choices=("c", "python"), default="c")
    args = parser.parse_args(argv)
    if args.rounds < 2 or not all(os.access(tool, os.X_OK) for tool in (ACTIVATE, PROXYD)):
        parser.error(f"need --rounds >= 2, an executable {ACTIVATE} and {PROXYD}")
    if PINNED:
        os.sched_setaffinity(0, {CLIENT_CPU})
    activators = ("systemd", "lazyd", "proxyd", "lazyd-proxy")
    results: dict[str, list[float]] = {key: [] for key in ("direct", *activators)}
    with tempfile.TemporaryDirectory(prefix="lazyd-bench-") as tmpdir:
        service, described = build_service(args.service, Path(tmpdir))
        lazyd = Lazyd(Path(tmpdir), service)
        proxied = Lazyd(Path(tmpdir), service, mode="proxy")
        try:
            runs: dict[str, Callable[[], float]] = {
                "lazyd": lazyd.round, "lazyd-proxy": proxied.round,
                "direct": partial(run_direct, service), "systemd": partial(run_systemd, service),
                "proxyd": partial(run_proxyd, service)}
            # One unrecorded round of each warms caches and lazyd's code paths.
            for run in runs.values():
                run()
            for each in (lazyd, proxied):
                each.spawn_ms.clear()
                each.readiness_ms.clear()
            for i in range(args.rounds):
                # Rotate which activator goes first, so none always follows another.
                k = i % len(activators)
                for key in ("direct", *activators[k:], *activators[:k]):
                    results[key].append(runs[key]())
        finally:
            lazyd.close()
            proxied.close()
    pinning = (f"daemon side on CPU {DAEMON_CPU}, client on CPU {CLIENT_CPU}" if PINNED
               else "not pinned (fewer than 2 CPUs)")
    report(results, lazyd.spawn_ms,
           f"{args.rounds} rounds each, interleaved; service {described}; {pinning}; "
           f"Python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.2f}",
           proxied.readiness_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
