"""Idle footprint: what lazyd costs while it holds sockets nobody uses.

One `python -m lazyd run` holds 100 pass-mode services, each with one TCP
socket on 127.0.0.1 and a command that never runs (nothing connects). Once
lazyd has logged `lazyd: holding` and had a second to settle, the benchmark
reads /proc for a window of 10 s (3 s with `--quick`) without touching lazyd:

- resident memory (VmRSS) of lazyd and of its spawner (lazyd's child, the
  small privileged process that starts services), at the end of the window;
- wake-ups per second: voluntary + involuntary context switches summed over
  every thread (/proc/PID/task/*/status), their growth over the window (a
  thread that ends meanwhile counts as one wake-up). A
  process that only waits for events does not wake up at all; a timer that
  polls shows up here at its own rate;
- CPU time (user + system) used during the window.

Targets: at most 30 MB resident for lazyd; at most 30 MB for lazyd and its
spawner together counted as PSS (their shared pages once); and no
periodic wake-ups (under 1 per second: a once-a-second timer would show 1).
At the end lazyd gets SIGTERM and must exit with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVICES = 100
WINDOW, QUICK_WINDOW = 10.0, 3.0
SETTLE = 1.0
TIMEOUT = 30.0  # for lazyd to start and to stop; a hang is a failure, not a figure
TARGET_RSS_MB = 30.0
# Below this no timer fires even once a second; a few one-off wake-ups in the
# window (a worker thread retiring, say) stay under it.
TARGET_WAKEUPS = 1.0
HOLDING = "lazyd: holding"


@dataclass(frozen=True)
class Sample:
    """One reading of a process from /proc."""

    rss_kb: int
    pss_kb: int  # the process's share of its pages: shared pages are counted once in a sum
    switches: dict[int, int]  # thread id: voluntary + involuntary context switches
    cpu_ticks: int  # user + system, every thread


def _status_fields(path: str, names: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in names:
                found[key] = int(value.split()[0])
    return found


def sample(pid: int) -> Sample:
    """Read one process's memory, context switches and CPU time."""
    rss = _status_fields(f"/proc/{pid}/status", ("VmRSS",))["VmRSS"]
    pss = _status_fields(f"/proc/{pid}/smaps_rollup", ("Pss",))["Pss"]
    # /proc/PID/status counts the main thread's switches only: every
    # thread's are needed, or a worker thread's timer would go unseen.
    switches = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = _status_fields(
                f"/proc/{pid}/task/{task}/status",
                ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"),
            )
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        switches[int(task)] = sum(fields.values())
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    return Sample(rss, pss, switches, int(stat[11]) + int(stat[12]))


def switches_between(first: Sample, last: Sample) -> int:
    """Context switches between two readings, thread by thread. A thread that
    ended in between takes its count with it: it is counted as one wake-up
    (at least its last one, to exit)."""
    grown = sum(n - first.switches.get(tid, 0) for tid, n in last.switches.items())
    return grown + len(first.switches.keys() - last.switches.keys())


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that nobody listens on right now."""
    ports: set[int] = set()
    while len(ports) < count:
        with socket.socket() as s:
            s.bind((HOST, 0))
            ports.add(int(s.getsockname()[1]))
    return sorted(ports)


def config_text(directory: Path, ports: Sequence[int]) -> str:
    """100 pass-mode services, one TCP socket each, a command that never runs."""
    # JSON strings are YAML strings: any path is quoted right.
    control = json.dumps(f"unix:{directory / 'lazyd.sock'}")
    lines = [f"control: {control}", "services:"]
    for i, port in enumerate(ports):
        lines += [f"  idle{i}:", "    command: [/bin/true]",
                  f"    sockets: {{main: 'tcp://{HOST}:{port}'}}"]
        if os.geteuid() == 0:
            lines.append("    user: root")
    return "\n".join(lines) + "\n"


class Lazyd:
    """`python -m lazyd run` with its stderr drained by a thread, so that lazyd
    never blocks on a full pipe and the holding line can be waited for."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lazyd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=ROOT, text=True,
        )
        self.pid = self.process.pid
        self.lines: list[str] = []
        self.holding = threading.Event()
        assert self.process.stderr is not None
        self.reader = threading.Thread(target=self._read, args=(self.process.stderr,))
        self.reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(HOLDING):
                self.holding.set()
        stream.close()
        self.holding.set()  # lazyd is gone: nobody should wait any longer

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    def wait_holding(self) -> None:
        if not self.holding.wait(TIMEOUT) or self.process.poll() is not None:
            raise RuntimeError(f"lazyd did not log {HOLDING!r} (exit status "
                               f"{self.process.poll()}); its output:\n{self.output()}")

    def stop(self) -> int:
        """SIGTERM, then wait; SIGKILL if it does not stop. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join()
        return self.process.returncode


def measure(window: float) -> tuple[dict[str, tuple[Sample, Sample]], int, str]:
    """Start lazyd, let it settle, read it over `window` seconds, stop it.
    Returns the first and last reading per process, lazyd's exit status, and
    the holding line."""
    with tempfile.TemporaryDirectory(prefix="lazyd-bench-idle-") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)  # the daemon may run as an unprivileged user
        config = tmp / "lazyd.yaml"
        config.write_text(config_text(tmp, free_ports(SERVICES)))
        lazyd = Lazyd(config)
        try:
            lazyd.wait_holding()
            time.sleep(SETTLE)
            spawners = children(lazyd.pid)
            if len(spawners) != 1:
                raise RuntimeError(f"expected one child of lazyd (its spawner), found {spawners}")
            pids = {"lazyd": lazyd.pid, "spawner": spawners[0]}
            first = {name: sample(pid) for name, pid in pids.items()}
            time.sleep(window)
            last = {name: sample(pid) for name, pid in pids.items()}
        finally:
            status = lazyd.stop()
        holding = next(line for line in lazyd.lines if line.startswith(HOLDING))
        if status != 0:
            raise RuntimeError(f"lazyd exited with status {status} on SIGTERM; its output:\n"
                               + lazyd.output())
    return {name: (first[name], last[name]) for name in pids}, status, holding


def report(readings: dict[str, tuple[Sample, Sample]], window: float, holding: str) -> bool:
    """Print the table; return whether both targets were met."""
    tick = os.sysconf("SC_CLK_TCK")
    rows: list[tuple[str, float, float, float, float]] = []
    for name, (first, last) in readings.items():
        rows.append((name, last.rss_kb / 1024, last.pss_kb / 1024,
                     switches_between(first, last) / window,
                     (last.cpu_ticks - first.cpu_ticks) * 1000 / tick))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows),
                 sum(r[3] for r in rows), sum(r[4] for r in rows)))
    _, _, pss, wakeups, _ = rows[-1]
    lazyd_rss = rows[0][1]
    # lazyd's own resident set is what `ps` and `top` show for it.  Its
    # spawner is a second small interpreter; the two share most of their
    # pages (libpython, libc), which a sum of RSS would count twice, so what
    # the pair costs the machine is the sum of their PSS.
    rss_ok, pss_ok = lazyd_rss <= TARGET_RSS_MB, pss <= TARGET_RSS_MB
    wakeups_ok = wakeups < TARGET_WAKEUPS
    print(f"**Idle footprint: {SERVICES} pass-mode services held, nothing connecting**\n")
    print(f"`{holding}`; read over {window:g} s after {SETTLE:g} s to settle; "
          f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}.\n")
    print("| process | RSS MB | PSS MB | wake-ups/s | CPU ms in the window |")
    print("|---|---:|---:|---:|---:|")
    for name, mb, pss_mb, per_s, cpu_ms in rows:
        print(f"| {name} | {mb:.1f} | {pss_mb:.1f} | {per_s:.2f} | {cpu_ms:.0f} |")
    print(f"\nTargets: lazyd's RSS ≤ {TARGET_RSS_MB:g} MB: "
          f"{'met' if rss_ok else 'NOT met'} ({lazyd_rss:.1f} MB); lazyd and its spawner "
          f"together ≤ {TARGET_RSS_MB:g} MB counted as PSS (pages they share counted once; "
          f"the RSS total above counts them twice): {'met' if pss_ok else 'NOT met'} "
          f"({pss:.1f} MB); no periodic wake-ups (< {TARGET_WAKEUPS:g}/s in total): "
          f"{'met' if wakeups_ok else 'NOT met'} ({wakeups:.2f}/s). lazyd exited 0 on SIGTERM.")
    return rss_ok and pss_ok and wakeups_ok


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_idle", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"length of the window ({WINDOW:g}; {QUICK_WINDOW:g} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_WINDOW:g} s window")
    args = parser.parse_args(argv)
    window = args.seconds or (QUICK_WINDOW if args.quick else WINDOW)
    if window <= 0:
        parser.error("need --seconds > 0")
    readings, _, holding = measure(window)
    # A missed target is a figure, not a failure of the benchmark: exit 0.
    report(readings, window, holding)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
