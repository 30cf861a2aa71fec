"""The soak benchmark in short form: mixed traffic through a real lazyd, nothing lost."""

from __future__ import annotations

import sys

import trio

from tests.conftest import ROOT


async def test_a_short_soak_is_clean() -> None:
    """Eight seconds of requests, datagrams, long-lived connections, idle stops and
    reloads: every request and datagram answered correctly, no fd or trio task more at
    the end than after warm-up, and a report that says so."""
    with trio.fail_after(90):
        done = await trio.run_process(
            [sys.executable, "-m", "benchmarks.soak", "--duration", "8"],
            cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False,
        )
    report = done.stdout.decode()
    assert done.returncode == 0, report + done.stderr.decode()
    assert "Result: **clean**" in report
    assert "| open fds |" in report and "| trio tasks |" in report
    requests = next(line for line in report.splitlines() if line.startswith("| requests"))
    sent, answered, wrong = (int(cell) for cell in requests.strip("| ").split(" | ")[1:])
    assert sent == answered > 100 and wrong == 0
