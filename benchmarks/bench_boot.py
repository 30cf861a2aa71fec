"""Boot N services in a dependency chain: one after another, and all at once through lazyd.

The chain is link0 ← link1 ← … ← link(N-1): each link talks to the next one
over that one's Unix stream socket and is not ready until the next one has
answered (programs/chain.py). Each link's start-up work is a delay drawn
from 50-300 ms with a fixed seed, so every run of one N boots the same chain.

- sequential: a classic init. The links bind their own sockets, so each is
  started only once the one it talks to has said READY=1 (sd_notify): the
  last link first, link0 last. Measured from the first start to link0's
  READY=1. The boot takes about the sum of the delays plus N interpreter
  start-ups.
- parallel: lazyd, in this process (`lazyd.runtime.daemon.serve`), holds every
  link's socket; link0 is `activate: eager` and each link `requires` the
  next, so starting link0 starts them all at once. A hello sent early waits
  in the held socket until its link is up. Measured from the first start
  lazyd made (lazyd's own start-up, like an init's, is not part of either
  figure) to the last READY=1 lazyd saw. The boot takes about the longest
  delay plus the time the machine needs to start N interpreters at once.

"messages lost" counts hellos that got no right answer, over every run of
that row. Each boot gets a fresh temporary directory; after each boot no
process started for it may be left, or the benchmark stops.

The links run under `python -I -S` and import only cheap standard modules,
because on a small machine N interpreters starting at once are a real part of
the parallel figure: the start-up cost of one is measured first and printed
with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from lazyd import config as config_mod
from lazyd.core.lifecycle import Outcome
from lazyd.readiness.notify import NotifySocket, open_notify_socket
from lazyd.runtime.daemon import Daemon, serve
from lazyd.runtime.service import Options

PROGRAM = Path(__file__).resolve().parent / "programs" / "chain.py"
# -S: no site, which is most of a bare interpreter's start-up; -I: nothing
# from the environment or the current directory.
INTERPRETER = (sys.executable, "-I", "-S")
SIZES = (3, 10, 50)
RUNS, QUICK_RUNS = 5, 3
SEED = 20240917
DELAY_MIN, DELAY_MAX = 0.050, 0.300
# Any one boot taking longer than this is a failure, not a figure.
BOOT_TIMEOUT = 60.0
CALIBRATION_RUNS = 10
AT_ONCE_RUNS = 3
LINK = "one link alone, exec to READY=1"


@dataclass(frozen=True)
class Chain:
    """One boot's links: their delays and where their files live."""

    directory: Path
    delays: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.delays)

    @property
    def out(self) -> Path:
        return self.directory / "messages.txt"

    def name(self, i: int) -> str:
        return f"link{i}"

    def socket_path(self, i: int) -> Path:
        return self.directory / f"{i}.sock"

    def command(self, i: int) -> list[str]:
        following = str(self.socket_path(i + 1)) if i + 1 < self.size else "-"
        return [*INTERPRETER, str(PROGRAM), self.name(i), f"{self.delays[i]:.3f}",
                str(self.socket_path(i)), following, str(self.out)]

    def config_text(self, user: str | None) -> str:
        """link0 eager, each link requiring the next; pass mode, ready by notify."""
        # JSON strings are YAML strings: any path is quoted right.
        control = json.dumps(f"unix:{self.directory / 'lazyd.sock'}")
        lines = [f"control: {control}", "services:"]
        for i in range(self.size):
            lines += [
                f"  {self.name(i)}:",
                f"    command: [{', '.join(json.dumps(part) for part in self.command(i))}]",
                "    ready: notify",
                f"    sockets: {{link: {json.dumps(f'unix:{self.socket_path(i)}')}}}",
            ]
            if i + 1 < self.size:
                lines.append(f"    requires: [{self.name(i + 1)}]")
            if user is not None:
                lines.append(f"    user: {user}")
            if i == 0:
                lines.append("    activate: eager")
        return "\n".join(lines) + "\n"

    def lost(self) -> int:
        """Hellos that got no right answer (every link but the last sends one)."""
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        answered = {line.split(" ", 1)[0] for line in lines if " answered: " in line}
        return len({self.name(i) for i in range(self.size - 1)} - answered)


@dataclass(frozen=True)
class Boot:
    """One boot's figures, in seconds."""

    total: float
    lost: int
    last_spawn: float | None = None  # parallel: when lazyd had started the last link


def chain_delays(size: int, seed: int) -> tuple[float, ...]:
    """The first `size` delays of the seed's sequence, whole milliseconds."""
    rng = random.Random(seed)
    return tuple(round(rng.uniform(DELAY_MIN, DELAY_MAX), 3) for _ in range(size))


async def _until_ready(notify: NotifySocket, process: trio.Process, name: str) -> None:
    """Wait for READY=1 on `notify`; fail at once if `process` exits first."""
    async with trio.open_nursery() as nursery:

        async def exited() -> None:
            status = await process.wait()
            raise RuntimeError(f"{name} exited with status {status} before READY=1")

        nursery.start_soon(exited)
        while not (await notify.receive()).ready:
            pass
        nursery.cancel_scope.cancel()


async def boot_sequential(chain: Chain) -> Boot:
    """Start each link once the one it talks to is ready, the last link first."""
    processes: list[trio.Process] = []
    t0 = trio.current_time()
    try:
        with trio.fail_after(BOOT_TIMEOUT):
            for i in reversed(range(chain.size)):
                with open_notify_socket(chain.name(i)) as notify:
                    process = await trio.lowlevel.open_process(
                        chain.command(i),
                        env={"PATH": os.defpath, "NOTIFY_SOCKET": notify.address},
                        stdin=subprocess.DEVNULL,
                    )
                    processes.append(process)
                    await _until_ready(notify, process, chain.name(i))
        total = trio.current_time() - t0
    finally:
        for process in processes:
            process.kill()  # a no-op for one that has exited
            await process.wait()
    return Boot(total, chain.lost())


async def _until_all_ready(daemon: Daemon, log: list[str]) -> None:
    """Wait until every service's first start has ended; fail unless all became ready."""
    for runner in daemon.runners.values():
        while True:
            changed = runner.changed  # taken first: a change in between is not missed
            if runner.history:
                if runner.history[0].outcome is not Outcome.READY:
                    raise RuntimeError(f"{runner.name} did not become ready:\n" + "\n".join(log))
                break
            await changed.wait()


async def boot_parallel(chain: Chain, user: str | None) -> Boot:
    """Boot through lazyd: link0 is eager and requires link1, which requires link2, …"""
    path = chain.directory / "lazyd.yaml"
    path.write_text(chain.config_text(user))
    config = config_mod.load(str(path))
    log: list[str] = []
    options = Options(log=log.append, output=log.append)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(
            lambda task_status: serve(config, options=options, task_status=task_status)
        )
        try:
            with trio.fail_after(BOOT_TIMEOUT):
                await _until_all_ready(daemon, log)
        finally:
            await daemon.shutdown()
    records = [runner.history[0] for runner in daemon.runners.values()]
    t0 = min(r.trigger for r in records)
    total = max(r.ready or 0.0 for r in records) - t0
    last_spawn = max(r.spawned or 0.0 for r in records) - t0
    return Boot(total, chain.lost(), last_spawn)


def leftovers(directory: Path) -> list[int]:
    """Pids of processes still running for this boot: any whose command line
    names its directory (every link's does), and any child of ours."""
    found = []
    marker = str(directory).encode()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        parent = int(stat[stat.rfind(b")") + 1 :].split()[1])
        if marker in cmdline or parent == me:
            found.append(int(entry))
    return found


async def one_boot(kind: str, delays: tuple[float, ...], user: str | None) -> Boot:
    """One boot in a fresh directory; afterwards no process of it may be left."""
    with tempfile.TemporaryDirectory(prefix="lazyd-boot-") as tmp:
        chain = Chain(Path(tmp), delays)
        boot = await (boot_sequential(chain) if kind == "sequential"
                      else boot_parallel(chain, user))
        left = leftovers(chain.directory)
    if left:
        for pid in left:  # ours: started for this boot
            os.kill(pid, signal.SIGKILL)
        raise RuntimeError(f"{kind} boot of {len(delays)} left processes running: {left}")
    return boot


def _wall_ms(command: Sequence[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1000


def _at_once_ms(size: int) -> float:
    """Start `size` link interpreters at once (imports only, no work) and wait
    for all of them: what this machine needs for their start-up alone."""
    start = time.perf_counter()
    processes = [
        subprocess.Popen([*INTERPRETER, str(PROGRAM), "--imports-only"], stdin=subprocess.DEVNULL)
        for _ in range(size)
    ]
    statuses = [process.wait() for process in processes]
    if any(statuses):
        raise RuntimeError(f"{PROGRAM} --imports-only failed: {statuses}")
    return (time.perf_counter() - start) * 1000


def _at_once_label(size: int) -> str:
    return f"{size} link interpreters started at once, imports only, until all exited"


async def calibrate(sizes: Sequence[int]) -> dict[str, float]:
    """Median start-up costs, in ms: bare interpreters, one link (0 ms delay,
    nothing to talk to) from exec to READY=1, and N links' interpreters at once."""
    costs = {
        "python -c pass": [_wall_ms([sys.executable, "-c", "pass"])
                           for _ in range(CALIBRATION_RUNS)],
        "python -I -S -c pass": [_wall_ms([*INTERPRETER, "-c", "pass"])
                                 for _ in range(CALIBRATION_RUNS)],
        LINK: [
            (await one_boot("sequential", (0.0,), None)).total * 1000
            for _ in range(CALIBRATION_RUNS)
        ],
    }
    for size in sizes:
        costs[_at_once_label(size)] = [
            _at_once_ms(size) for _ in range(AT_ONCE_RUNS)
        ]
    return {label: statistics.median(values) for label, values in costs.items()}


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def measure(
    sizes: Sequence[int], runs: int, seed: int
) -> tuple[dict[str, float], list[tuple[int, list[Boot], list[Boot]]]]:
    user = "root" if os.geteuid() == 0 else None
    costs = await calibrate(sizes)
    results = []
    for size in sizes:
        delays = chain_delays(size, seed)
        sequential: list[Boot] = []
        parallel: list[Boot] = []
        for run in range(runs):
            # Alternate which goes first, so neither always follows the other.
            order = ("sequential", "parallel") if run % 2 == 0 else ("parallel", "sequential")
            for kind in order:
                boot = await one_boot(kind, delays, user)
                (sequential if kind == "sequential" else parallel).append(boot)
                progress(f"N={size} run {run + 1}/{runs} {kind}: {boot.total * 1000:.0f} ms, "
                         f"lost {boot.lost}")
        results.append((size, sequential, parallel))
    return costs, results


def report(
    costs: dict[str, float], results: list[tuple[int, list[Boot], list[Boot]]],
    runs: int, seed: int,
) -> None:
    print(f"Boot of N services in a dependency chain, sequential vs parallel through lazyd; "
          f"delays {DELAY_MIN * 1000:.0f}-{DELAY_MAX * 1000:.0f} ms (seed {seed}), "
          f"medians of {runs} runs each; {os.cpu_count()} CPUs; "
          f"Python {sys.version.split()[0]}\n")
    print("| N | sum of delays ms | longest delay ms | sequential median ms "
          "| parallel median ms | parallel / sequential | messages lost (seq / par) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size, sequential, parallel in results:
        delays = chain_delays(size, seed)
        seq = statistics.median(b.total for b in sequential) * 1000
        par = statistics.median(b.total for b in parallel) * 1000
        lost_seq = sum(b.lost for b in sequential)
        lost_par = sum(b.lost for b in parallel)
        print(f"| {size} | {sum(delays) * 1000:.0f} | {max(delays) * 1000:.0f} | {seq:.0f} "
              f"| {par:.0f} | {par / seq:.2f} | {lost_seq} / {lost_par} |")
    print(f"\nStart-up costs, measured before the boots (medians of {CALIBRATION_RUNS}, "
          f"the last of {AT_ONCE_RUNS}):")
    for label, ms in costs.items():
        print(f"- {label}: {ms:.1f} ms")
    link = costs[LINK]
    print("\nWhat to expect (sequential: sum of delays + N x one link alone; parallel: "
          "longest delay + N link interpreters at once), and when lazyd had spawned "
          "the last link, counted from its first start (median):")
    for size, _, parallel in results:
        delays = chain_delays(size, seed)
        at_once = costs[_at_once_label(size)]
        spawned = statistics.median(b.last_spawn or 0.0 for b in parallel) * 1000
        print(f"- N={size}: sequential ≈ {sum(delays) * 1000 + size * link:.0f} ms, "
              f"parallel ≈ {max(delays) * 1000 + at_once:.0f} ms; "
              f"last link spawned after {spawned:.0f} ms")


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_boot", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--runs", type=int, default=None,
                        help=f"boots of each kind per N ({RUNS}; {QUICK_RUNS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_RUNS} runs, and no N={SIZES[-1]}")
    parser.add_argument("--seed", type=int, default=SEED, help="delay seed (%(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help=f"chain lengths ({' '.join(map(str, SIZES))})")
    args = parser.parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else RUNS)
    sizes = args.sizes or (SIZES[:-1] if args.quick else SIZES)
    if runs < 1 or min(sizes) < 1:
        parser.error("need --runs >= 1 and every size >= 1")
    costs, results = trio.run(measure, sizes, runs, args.seed)
    report(costs, results, runs, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
