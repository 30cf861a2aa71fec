"""Cold start of a container service: lazyd against the engine alone.

A real Podman (its Docker-compatible API from `podman system service` on a
unix socket) holds one container made from this host's own files: the
host's python3 answering b"!" to every connection on 127.0.0.1. Each round
measures, with the container stopped, connect → first byte:

- engine: what a client gets without lazyd at best: the engine's own
  ``POST /containers/NAME/start`` (lazyd's stdlib client, straight to the
  socket), then connecting to the container's port every millisecond until
  one connect succeeds, then its first byte;
- lazyd: a `lazyd run` holding the public port for the container (proxy
  mode, ready: connect): connect to lazyd at once, wait for the first byte.

Then once, a flood: 1,000 connections opened while the container is cold
(all of them within the first part of its start), each of which must get its
b"!" (none refused, none reset). Target: lazyd's cold start within 10 ms of
the engine's own (Sablier's blocking strategy adds ~0.7 s to a 1 s start).
Needs root and Podman (scripts/podman-setup); says why and exits 1 without.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from lazyd.backends.container.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TIMEOUT = 30.0
TARGET_MS = 10.0
FLOOD = 1000
SERVER = """
import signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(4096)
while True:
    c, _ = s.accept()
    c.sendall(b"!")
    c.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_engine(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`podman system service` on a unix socket in `tmp`, once it says READY=1."""
    path = tmp / "podman.sock"
    notify_path = tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(TIMEOUT)
        service = subprocess.Popen(
            ["podman", "system", "service", "--time", "0", f"unix://{path}"],
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    return service, f"unix:{path}"


def first_byte(port: int) -> float:
    """Connect to lazyd at once and wait for the first byte: ms from connect."""
    with socket.socket() as client:
        client.settimeout(TIMEOUT)
        began = time.monotonic()
        client.connect((HOST, port))
        if client.recv(1) != b"!":
            raise RuntimeError("the container answered something else than b'!'")
        return (time.monotonic() - began) * 1000


def engine_round(engine: Engine, name: str, port: int) -> float:
    """The engine's own start, then a connect every millisecond until one works."""
    began = time.monotonic()
    engine.start(name)
    while True:
        with socket.socket() as client:
            client.settimeout(TIMEOUT)
            try:
                client.connect((HOST, port))
            except ConnectionRefusedError:
                time.sleep(0.001)
                continue
            if client.recv(1) != b"!":
                raise RuntimeError("the container answered something else than b'!'")
            elapsed = (time.monotonic() - began) * 1000
        engine.stop(name, 5)
        return elapsed


class Lines:
    """lazyd's stderr, line by line with a deadline (no reader thread)."""

    def __init__(self, stream: IO[bytes]) -> None:
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


def flood(port: int, count: int) -> tuple[int, int, float]:
    """`count` connections opened at once to a cold service: (answered, failed, ms
    until the last answer)."""
    clients = []
    began = time.monotonic()
    for _ in range(count):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex((HOST, port))  # EINPROGRESS: the answer comes as POLLIN
        clients.append(client)
    answered = failed = 0
    poller = select.poll()
    by_fd = {c.fileno(): c for c in clients}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    deadline = began + TIMEOUT
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(1000):
            client = by_fd.pop(fd)
            poller.unregister(fd)
            try:
                answered += client.recv(1) == b"!"
            except OSError:
                failed += 1
            client.close()
    failed += len(by_fd)
    for client in by_fd.values():
        client.close()
    return answered, failed, (time.monotonic() - began) * 1000


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_container",
                                     description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rounds", type=int, default=20, help="rounds per row (%(default)s)")
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else args.rounds
    setup = subprocess.run([str(ROOT / "scripts" / "podman-setup")], capture_output=True,
                           text=True).stdout.strip().splitlines()
    if not setup or not setup[-1].startswith("podman-setup: ready"):
        print(setup[-1] if setup else "podman-setup said nothing", file=sys.stderr)
        return 1
    name = f"lazyd-bench-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="lazyd-bench-") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)  # lazyd reads its config as the user it drops to
        service, address = start_engine(tmp)
        up, port = free_port(), free_port()
        lazyd = None
        try:
            subprocess.run(["podman", "create", "--name", name, "--cgroups=disabled",
                            "--network", "host", "--rootfs", "/:O", "/usr/bin/python3", "-c",
                            SERVER, str(up)], check=True, capture_output=True, timeout=TIMEOUT)
            engine = Engine(address)
            config = tmp / "lazyd.yaml"
            config.write_text(
                f"control: unix:{tmp / 'control.sock'}\nservices:\n  bench:\n"
                f"    container: {name}\n    engine: {address}\n    idle_timeout: 50ms\n"
                "    start_limit: 1000000\n    queue_limit: 4096\n"
                f"    max_connections_per_source: 4096\n    sockets:\n"
                f"      http: {{listen: 'tcp://{HOST}:{port}', upstream: 'tcp://{HOST}:{up}', "
                "backlog: 4096}\n")
            lazyd = subprocess.Popen([sys.executable, "-m", "lazyd", "run", "-c", str(config)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=ROOT)
            assert lazyd.stderr is not None
            lines = Lines(lazyd.stderr)
            lines.wait(r"^lazyd: holding ")
            results: dict[str, list[float]] = {"engine": [], "lazyd": []}
            spawn: list[float] = []
            starts = 0

            def lazyd_round() -> float:
                nonlocal starts
                elapsed = first_byte(port)
                starts += 1
                line = lines.wait(r"^bench: ready in [\d.]+ ms \(spawn ([\d.]+) ms")
                spawn.append(float(line[1]))
                lines.wait(r"^bench: stopped \(idle\)")
                return elapsed

            engine_round(engine, name, up)  # one unrecorded round of each warms caches
            lazyd_round()
            spawn.clear()
            for i in range(rounds):
                order = ("engine", "lazyd") if i % 2 == 0 else ("lazyd", "engine")
                for key in order:
                    results[key].append(engine_round(engine, name, up) if key == "engine"
                                        else lazyd_round())
            answered, failed, flood_ms = flood(port, FLOOD)
            lines.wait(r"^bench: ready in")
        finally:
            if lazyd is not None:
                lazyd.send_signal(signal.SIGTERM)
                lazyd.wait(TIMEOUT)
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True,
                           timeout=TIMEOUT)
            service.terminate()
            service.wait(TIMEOUT)
    print(f"{rounds} rounds each, interleaved; Podman's Docker-compatible API on a unix socket; "
          f"Python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.2f}\n")
    print("| cold container, connect → first byte | median ms | p90 ms |")
    print("|---|---:|---:|")
    for key, label in (("engine", "engine alone: start + connect every 1 ms"),
                       ("lazyd", "through lazyd (held, ready: connect)")):
        values = results[key]
        p90 = statistics.quantiles(values, n=10, method="inclusive")[8]
        print(f"| {label} | {statistics.median(values):.1f} | {p90:.1f} |")
    difference = statistics.median(results["lazyd"]) - statistics.median(results["engine"])
    verdict = "met" if difference <= TARGET_MS else "NOT met"
    print(f"\nlazyd - engine alone: {difference:+.1f} ms; target (within {TARGET_MS:g} ms): "
          f"{verdict}")
    print(f"lazyd's logged `spawn` (first traffic → the engine's start answered), median: "
          f"{statistics.median(spawn):.1f} ms")
    print(f"flood: {FLOOD} connections during one cold start: {answered} answered, "
          f"{failed} refused or reset, the last answer after {flood_ms:.0f} ms")
    return 0 if failed == 0 and answered == FLOOD else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
