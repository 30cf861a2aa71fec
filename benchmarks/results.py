"""RESULTS.md: the machine the benchmarks ran on and each benchmark's tables."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """One benchmark's run: the command that reproduces it, what it printed
    on stdout, and why it failed (None when it did not)."""

    name: str
    command: str
    output: str
    failure: str | None
    seconds: float


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" when absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return "unknown"


def machine() -> list[tuple[str, str]]:
    """What the figures depend on, as (label, value) pairs."""
    return [
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", cpu_model()),
        ("kernel", platform.release()),
        ("Python", sys.version.split()[0]),
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def render(sections: Sequence[Section], command: str) -> str:
    """The whole of RESULTS.md."""
    lines = ["# Benchmark results", "",
             f"Written by `{command}` from the project's root; each section names the "
             "command that reproduces it alone (see README.md).", ""]
    lines += ["| machine | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in machine()]
    for section in sections:
        status = "failed" if section.failure else "ok"
        lines += ["", f"## {section.name}", "",
                  f"`{section.command}` ({status}, {section.seconds:.0f} s)", ""]
        if section.output.strip():
            lines += [section.output.rstrip(), ""]
        if section.failure:
            lines += ["It failed:", "", "```", section.failure.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"
