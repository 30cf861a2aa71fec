"""`python -m benchmarks [--quick]`: run every benchmark and write benchmarks/RESULTS.md.

Each benchmark's stdout (its Markdown tables) is shown as it comes and kept;
its progress lines go to stderr as usual. RESULTS.md gets the machine, the
command behind each section and the tables, also when a benchmark failed;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import TextIO

from benchmarks import (
    bench_activation,
    bench_boot,
    bench_container,
    bench_flood,
    bench_idle,
    bench_proxy,
)
from benchmarks.results import Section, render

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# name, module, main, the arguments --quick stands for. bench_activation has
# no --quick of its own: fewer rounds is what makes it quick.
BENCHMARKS: list[tuple[str, str, Callable[[Sequence[str]], int], list[str]]] = [
    ("activation", "bench_activation", bench_activation.main, ["--rounds", "10"]),
    ("proxy", "bench_proxy", bench_proxy.main, ["--quick"]),
    ("flood", "bench_flood", bench_flood.main, ["--quick"]),
    ("boot", "bench_boot", bench_boot.main, ["--quick"]),
    ("idle", "bench_idle", bench_idle.main, ["--quick"]),
    ("container", "bench_container", bench_container.main, ["--quick"]),
]


class Tee(io.StringIO):
    """Keeps what is written and passes it on to `through` at once."""

    def __init__(self, through: TextIO) -> None:
        super().__init__()
        self.through = through

    def write(self, text: str) -> int:
        self.through.write(text)
        return super().write(text)

    def flush(self) -> None:
        self.through.flush()


def run_one(name: str, module: str, main: Callable[[Sequence[str]], int],
            argv: list[str]) -> Section:
    """Run one benchmark in this process, keeping its stdout."""
    command = " ".join(["python -m", f"benchmarks.{module}", *argv])
    print(f"\n## {name}: {command}\n", file=sys.stderr, flush=True)
    # Some benchmarks pin this process to one CPU for their client side; the
    # next benchmark must start from the CPUs this one started with.
    cpus = os.sched_getaffinity(0)
    tee = Tee(sys.stdout)
    failure = None
    start = time.monotonic()
    try:
        with redirect_stdout(tee):
            status = main(argv)
        if status:
            failure = f"exit status {status}"
    except SystemExit as exc:  # argparse's parser.error, or sys.exit inside
        if exc.code:
            failure = f"exit status {exc.code}"
    except Exception:
        failure = traceback.format_exc()
        print(failure, file=sys.stderr, flush=True)
    finally:
        os.sched_setaffinity(0, cpus)
    return Section(name, command, tee.getvalue(), failure, time.monotonic() - start)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true",
                        help="the quick form of each benchmark (a few minutes in all)")
    args = parser.parse_args(argv)
    sections: list[Section] = []
    try:
        for name, module, bench_main, quick in BENCHMARKS:
            sections.append(run_one(name, module, bench_main, quick if args.quick else []))
    finally:
        # Written also when interrupted: what has been measured is kept.
        command = "python -m benchmarks" + (" --quick" if args.quick else "")
        RESULTS.write_text(render(sections, command))
        print(f"\nwrote {RESULTS}", file=sys.stderr, flush=True)
    failed = [s.name for s in sections if s.failure]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
