"""Cold start, connect → first byte: lazyd (pass mode, proxy mode, and proxy
mode on the kernel data path) against systemd-socket-activate (alone, and
chained to systemd-socket-proxyd).

A client connects to a socket nobody has accepted on yet and times how long it
takes until the first byte arrives: the activator notices the connection and
starts the service with the listener at fd 3 (LISTEN_FDS, LISTEN_PID,
LISTEN_FDNAMES); the service accepts and writes one byte. The rows are
interleaved in one run (the activators take turns at going first, direct
always opens the round), after one unrecorded warm-up round of each:

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
  client is forwarded; `idle_timeout: 100ms` stops the service after each
  round, so that every round is a cold start.
- lazyd (kernel): a third `lazyd run`, the same proxy-mode service with
  `datapath: kernel`. The first connection is still held and forwarded by
  lazyd; what the kernel path adds to the cold start is taking the service's
  listener (through the privileged helper) and steering new connections into
  it once it is ready. It is measured right beside lazyd (proxy) in every
  round (the two take turns at going first), and the figure that matters is
  the per-round difference kernel - proxy. On the kernel path the idle stop
  comes between one and two `idle_timeout`s after the last connection. Needs
  root and a kernel with BPF sk_lookup (otherwise the row is left out, saying
  why); while that lazyd runs, its sk_lookup program sees every new TCP
  connection in the network namespace, the other rows' too (a map lookup).
- systemd-socket-activate + systemd-socket-proxyd: the activator execs a
  shell that starts the service (`--bind --fork`: it forks once it listens
  and the parent exits, as a Type=forking unit is ready) and then execs
  systemd-socket-proxyd, which connects to it: the chain systemd needs for a
  service that binds its own port. Started afresh every round, as above.

The proxy rows subtract the same service start-up as the others; binding
its own port costs the service a few microseconds more than taking fd 3.

Two services, each measured in a run of its own with its own table (both by
default; `--service c` or `--service python` for one): programs/first_byte.c,
compiled here with `cc`, so that its own start-up is small and the
activators' overhead is not lost in its noise; and first_byte.py under
`python -S`, closer to what most services are (the C one is left out, saying
why, when there is no compiler). The daemon side (lazyd,
systemd-socket-activate, the service) runs on CPU 0, the client on CPU 1.

Every difference and ratio is taken per round (a row against another row of
the same round) and shown as the median over the rounds with its spread
(min to max); the targets are judged on the medians.
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
TARGET_MS = 1.0
TARGET_PROXY_MS = 1.0  # lazyd (proxy) within this of lazyd (pass)
TARGET_KERNEL_MS = 0.5  # lazyd (kernel) within this of lazyd (proxy)
LABELS = {
    "direct": "direct service start-up (exec → first byte)",
    "systemd": "systemd-socket-activate",
    "lazyd": "lazyd (pass)",
    "proxyd": "systemd-socket-activate + systemd-socket-proxyd",
    "lazyd-proxy": "lazyd (proxy)",
    "lazyd-kernel": "lazyd (kernel)",
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
    """One `lazyd run` holding one service (pass, proxy, or proxy on the kernel
    data path) for the whole benchmark."""

    def __init__(self, tmp: Path, service: Sequence[str], mode: str = "pass") -> None:
        self.port = free_port()
        self.mode = mode
        user = "    user: root\n" if os.geteuid() == 0 else ""
        if mode in ("proxy", "kernel"):
            upstream = f"{HOST}:{free_port()}"
            service = [*service, "--bind", upstream]
            datapath = "    datapath: kernel\n" if mode == "kernel" else ""
            sockets = (f"    mode: proxy\n    idle_timeout: 100ms\n{datapath}    sockets:\n"
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
        seen = len(self.lines.seen)
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
        # A kernel round that never steered would be a proxy round under
        # another name.
        if self.mode == "kernel" and not any(
                re.search(r"^bench: kernel data path: new connections to", text)
                for text in self.lines.seen[seen:]):
            raise RuntimeError("lazyd (kernel) did not steer the service:\n"
                               + "\n".join(self.lines.seen[seen:]))
        return (arrived - connected) * 1000

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(TIMEOUT)
        finally:
            self.process.kill()  # a no-op once it has exited
            self.process.wait()
            self.lines.stream.close()


def kernel_unavailable() -> str | None:
    """Why lazyd (kernel) cannot be measured here (None: it can)."""
    if os.geteuid() != 0:
        return "the kernel data path needs lazyd started as root"
    from lazyd.datapath.bpf import supported

    return supported()


def build_service(kind: str, tmp: Path) -> tuple[list[str], str] | str:
    """The service's command line and a description of it for the output, or
    why it cannot be built."""
    if kind == "python":
        return [sys.executable, "-S", str(PROGRAMS / "first_byte.py")], "first_byte.py (python -S)"
    cc = shutil.which("cc")
    if cc is None:
        return "no C compiler (cc) here"
    binary = tmp / "first_byte"
    subprocess.run([cc, "-O2", "-o", str(binary), str(PROGRAMS / "first_byte.c")], check=True)
    return [str(binary)], "first_byte.c (C)"


def spread(values: Sequence[float], unit: str = " ms", sign: str = "+") -> str:
    """The median of per-round values, and their min to max."""
    f = f"{{:{sign}.3f}}" if unit == " ms" else "{:.2f}"
    return (f"{f.format(statistics.median(values))}{unit} "
            f"(min-max {f.format(min(values))} to {f.format(max(values))}{unit})")


def per_round(results: dict[str, list[float]], a: str, b: str) -> tuple[list[float], list[float]]:
    """Round by round: a - b (ms) and a / b."""
    pairs = list(zip(results[a], results[b], strict=True))
    return [x - y for x, y in pairs], [x / y for x, y in pairs]


def compare(results: dict[str, list[float]], a: str, b: str,
            target: float | None = None) -> str:
    """One line: a - b and a / b per round, median and spread, and the target."""
    diff, ratio = per_round(results, a, b)
    line = f"{LABELS[a]} - {LABELS[b]}: {spread(diff)}; ratio: {spread(ratio, 'x')}"
    if target is not None:
        verdict = "met" if statistics.median(diff) <= target else "NOT met"
        line += f"; target (median within +{target:g} ms): {verdict}"
    return line


def report(results: dict[str, list[float]], runs: dict[str, Lazyd], header: str) -> None:
    print(header, end="\n\n")
    print("| cold start, connect → first byte | median ms | p90 ms | min-max ms "
          "| minus service start-up ms, median (min-max) |")
    print("|---|---:|---:|---:|---:|")
    for key, label in LABELS.items():
        if key not in results:
            continue
        values = results[key]
        med = statistics.median(values)
        if key == "direct":
            minus = "—"
        else:
            diff, _ = per_round(results, key, "direct")
            minus = (f"{statistics.median(diff):.3f} "
                     f"({min(diff):.3f} to {max(diff):.3f})")
        p90 = statistics.quantiles(values, n=10, method="inclusive")[8]
        print(f"| {label} | {med:.3f} | {p90:.3f} | {min(values):.3f}-{max(values):.3f} "
              f"| {minus} |")
    print("\nPer round, median (min-max over the rounds):\n")
    lines = [compare(results, "lazyd", "systemd", TARGET_MS),
             compare(results, "lazyd-proxy", "lazyd", TARGET_PROXY_MS),
             compare(results, "lazyd-proxy", "proxyd")]
    if "lazyd-kernel" in results:
        lines += [compare(results, "lazyd-kernel", "lazyd-proxy", TARGET_KERNEL_MS),
                  compare(results, "lazyd-kernel", "proxyd")]
    lines.append(f"lazyd (pass)'s own logged `spawn` (traffic seen → exec done): "
                 f"{spread(runs['lazyd'].spawn_ms, sign='')}")
    for key in ("lazyd-proxy", "lazyd-kernel"):
        if key in runs:
            lines.append(f"{LABELS[key]}'s logged `spawn`: {spread(runs[key].spawn_ms, sign='')}"
                         f", `readiness` (exec done → its connect probe answered): "
                         f"{spread(runs[key].readiness_ms, sign='')}")
    for line in lines:
        print(f"- {line}")


def measure(kind: str, rounds: int, tmp: Path) -> bool:
    """Measure and report one service; False when it cannot be built here."""
    built = build_service(kind, tmp)
    if isinstance(built, str):
        print(f"### Service first_byte.c (C): not measured: {built}\n")
        return False
    service, described = built
    no_kernel = kernel_unavailable()
    # Units of the rotation: the proxy pair stays side by side, its order
    # alternating, so that kernel - proxy compares neighbours.
    units: list[tuple[str, ...]] = [("systemd",), ("lazyd",), ("proxyd",),
                                    ("lazyd-proxy",) if no_kernel else
                                    ("lazyd-proxy", "lazyd-kernel")]
    keys = ["direct", *(key for unit in units for key in unit)]
    results: dict[str, list[float]] = {key: [] for key in keys}
    runs: dict[str, Lazyd] = {}
    try:
        for key, mode in (("lazyd", "pass"), ("lazyd-proxy", "proxy"),
                          ("lazyd-kernel", "kernel")):
            if key in results:
                runs[key] = Lazyd(tmp, service, mode)
        rows: dict[str, Callable[[], float]] = {
            **{key: lz.round for key, lz in runs.items()},
            "direct": partial(run_direct, service), "systemd": partial(run_systemd, service),
            "proxyd": partial(run_proxyd, service)}
        # One unrecorded round of each warms caches and lazyd's code paths.
        for row in rows.values():
            row()
        for lz in runs.values():
            lz.spawn_ms.clear()
            lz.readiness_ms.clear()
        for i in range(rounds):
            # Rotate which activator goes first, so none always follows another.
            k = i % len(units)
            order = units[k:] + units[:k]
            for unit in [("direct",), *order]:
                for key in (unit if i % 2 == 0 else unit[::-1]):
                    results[key].append(rows[key]())
            progress(f"{described}: round {i + 1}/{rounds}")
    finally:
        for lz in runs.values():
            lz.close()
    pinning = (f"daemon side on CPU {DAEMON_CPU}, client on CPU {CLIENT_CPU}" if PINNED
               else "not pinned (fewer than 2 CPUs)")
    print(f"### Service {described}\n")
    report(results, runs,
           f"{rounds} rounds each, interleaved; {pinning}; "
           f"Python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.2f}"
           + (f"; lazyd (kernel) not measured: {no_kernel}" if no_kernel else ""))
    print()
    return True


def progress(text: str) -> None:
    """Progress goes to stderr; stdout is the report."""
    print(text, file=sys.stderr, flush=True)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_activation",
                                     description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rounds", type=int, default=30, help="rounds per row (%(default)s)")
    parser.add_argument("--service", choices=("both", "c", "python"), default="both",
                        help="which service(s) to measure, each with its own table "
                             "(%(default)s)")
    args = parser.parse_args(argv)
    if args.rounds < 2 or not all(os.access(tool, os.X_OK) for tool in (ACTIVATE, PROXYD)):
        parser.error(f"need --rounds >= 2, an executable {ACTIVATE} and {PROXYD}")
    if PINNED:
        os.sched_setaffinity(0, {CLIENT_CPU})
    kinds = ("c", "python") if args.service == "both" else (args.service,)
    measured = 0
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="lazyd-bench-") as tmpdir:
            measured += measure(kind, args.rounds, Path(tmpdir))
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
