"""lazyd.observe.analyze: blame tables and SVG timelines from status, and through a real daemon."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import trio

from lazyd.core.lifecycle import Activation, Outcome
from lazyd.core.starts import HISTORY, StartHistory, StartRecord
from lazyd.observe.analyze import blame, format_blame, recent, render_svg
from lazyd.observe.status import format_status, format_uptime
from tests.conftest import PY, free_port, program, run_lazyd

SVG = "{http://www.w3.org/2000/svg}"
T = 1_717_000_000.0


def start(at: float, spawn: float | None, ready: float | None, *, held: int | None = None,
          first_byte: float | None = None, first_accept: float | None = None,
          outcome: str = "ready") -> dict[str, Any]:
    """One start record as `status` with history gives it (times in ms from the trigger)."""
    return {"at": at, "outcome": outcome, "reason": "traffic on http", "spawn_ms": spawn,
            "ready_ms": ready, "first_accept_ms": first_accept, "first_byte_ms": first_byte,
            "held": held}


SERVICES: dict[str, Any] = {
    "bus": {"starts": [start(T, 2.0, 40.0, held=1, first_accept=41.0)]},
    "wiki": {"starts": [
        start(T + 0.2, 5.0, 520.0, held=17, first_byte=523.0),
        start(T + 3600, 4.0, 500.0, held=3, first_byte=501.0),
        start(T + 7300, 3.0, None, outcome="failed"),
        start(T + 7301, 6.0, 510.0, held=1, first_byte=512.0),
    ]},
    "admin": {"starts": []},
}


def test_blame_puts_the_slowest_first_with_medians_of_each_phase() -> None:
    """Sorted by p50 descending, never-started last; phases are medians, first accept and
    first byte counted from ready; failed starts are counted, not timed."""
    rows = blame(SERVICES)
    assert [r.service for r in rows] == ["wiki", "bus", "admin"]
    wiki = rows[0]
    assert (wiki.starts, wiki.failed) == (3, 1)
    assert (wiki.p50, wiki.p90, wiki.max) == (510.0, 520.0, 520.0)
    assert (wiki.spawn, wiki.readiness, wiki.first_byte, wiki.first_accept) == (
        5.0, 504.0, 2.0, None)
    assert rows[1].first_accept == 1.0
    assert rows[2].p50 is None and rows[2].starts == 0
    table = format_blame(SERVICES).splitlines()
    assert re.split(r" {2,}", table[0]) == [
        "SERVICE", "STARTS", "FAILED", "P50", "P90", "MAX", "SPAWN", "READINESS",
        "FIRST ACCEPT", "FIRST BYTE"]
    assert re.split(r" {2,}", table[1]) == [
        "wiki", "3", "1", "510.0 ms", "520.0 ms", "520.0 ms", "5.0 ms", "504.0 ms", "-",
        "+2.0 ms"]
    assert table[3].split()[0] == "admin" and set(table[3].split()[1:]) <= {"0", "-"}


def test_blame_percentiles_match_what_status_computes() -> None:
    """Blame, reading the JSON, gives the p50/p90/max that status computes from the records."""
    history = StartHistory()
    for i, total in enumerate([0.212, 0.5, 0.1, 0.3333, 1.25, 0.0009, 0.7]):
        record = StartRecord.from_activation(
            Activation(Outcome.READY, "traffic", i * 10.0, i * 10.0 + 0.0005, i * 10.0 + total),
            i * 10.0 + total)
        history.append(record)
    summary = history.summary()
    row = blame({"web": {"starts": [r.to_json() for r in history]}})[0]
    assert (row.p50, row.p90, row.max) == (summary["p50_ms"], summary["p90_ms"],
                                            summary["max_ms"])


def test_start_history_keeps_the_last_hundred() -> None:
    """A service's start history is bounded: the newest HISTORY records, oldest first."""
    history = StartHistory()
    for i in range(HISTORY + 5):
        history.append(StartRecord.from_activation(
            Activation(Outcome.READY, "traffic", float(i), i + 0.001, i + 0.002), i + 0.002))
    assert len(history) == HISTORY
    assert [r.trigger for r in history] == [float(i) for i in range(5, HISTORY + 5)]


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if cls in (g.get("class") or "").split()]


def test_the_svg_has_a_row_per_service_and_a_bar_per_start() -> None:
    """The SVG parses as XML; one row per service (in order of first start), one start
    group per recorded start with the three phase colours, and a legend."""
    root = _parse(render_svg(SERVICES))
    rows = _groups(root, "row")
    assert [r.get("data-service") for r in rows] == ["bus", "wiki", "admin"]
    per_row = {r.get("data-service"): len(_groups(r, "start")) for r in rows}
    assert per_row == {"bus": 1, "wiki": 4, "admin": 0}
    failed = _groups(root, "failed")
    assert len(failed) == 1 and failed[0].find(f"{SVG}title") is not None
    wiki_first = _groups(rows[1], "start")[0]
    phases = [r.get("class") for r in wiki_first.iter(f"{SVG}rect")]
    assert phases[:3] == ["spawn", "readiness", "first"]
    title = wiki_first.find(f"{SVG}title")
    assert title is not None and title.text is not None
    assert title.text.startswith("wiki: ready in 520.0 ms (spawn 5.0 ms, readiness 515.0 ms")
    held = [t.text for g in _groups(root, "held") for t in g.iter(f"{SVG}text")]
    assert "17" in held and "3" in held
    legend = " ".join(t.text or "" for g in _groups(root, "legend") for t in g.iter(f"{SVG}text"))
    assert "spawn" in legend and "readiness" in legend and "first byte" in legend


def test_hours_between_starts_are_cut_out_of_the_axis() -> None:
    """Starts an hour apart stay readable: the silence is cut out (≈) and every bar still
    lies within a normal page width, with its 500 ms wide enough to see."""
    root = _parse(render_svg(SERVICES))
    assert int(root.get("width", "0")) < 1400
    axis = " ".join(t.text or "" for g in _groups(root, "axis") for t in g.iter(f"{SVG}text"))
    assert axis.count("≈") == 2  # three stretches: the boot, an hour later, two hours later
    wiki = next(r for r in _groups(root, "row") if r.get("data-service") == "wiki")
    readiness = [float(r.get("width", "0")) for r in wiki.iter(f"{SVG}rect")
                 if r.get("class") == "readiness"]
    assert len(readiness) == 3 and min(readiness) > 50


def test_an_empty_history_still_draws_every_service() -> None:
    """No starts yet: a valid SVG with one empty row per service, and `recent` filters."""
    root = _parse(render_svg({"a": {"starts": []}, "b": {}}))
    assert [r.get("data-service") for r in _groups(root, "row")] == ["a", "b"]
    assert not _groups(root, "start")
    kept = recent(SERVICES, T + 3600)
    assert [len(s["starts"]) for s in kept.values()] == [0, 3, 0]


def test_status_table_shows_uptime_and_percentiles() -> None:
    """`lazyd status` columns: state, pid, uptime, starts, queued, active, last, p50, p90;
    a last start that failed shows as such."""
    table = format_status({
        "web": {"state": "running", "pid": 42, "uptime_s": 3725.2, "activations": 3,
                "queued": 0, "active": 2, "last_start_ms": 212.44, "last_outcome": "ready",
                "p50_ms": 200.0, "p90_ms": 1523.0},
        "db": {"state": "idle", "pid": None, "uptime_s": None, "activations": 1,
               "queued": None, "active": None, "last_start_ms": None,
               "last_outcome": "timed out", "p50_ms": None, "p90_ms": None},
    }).splitlines()
    assert re.split(r" {2,}", table[0]) == [
        "SERVICE", "STATE", "PID", "UPTIME", "STARTS", "QUEUED", "ACTIVE", "LAST START", "P50",
        "P90"]
    assert re.split(r" {2,}", table[1]) == [
        "web", "running", "42", "1h02m", "3", "0", "2", "212.4 ms", "200.0 ms", "1.52 s"]
    assert re.split(r" {2,}", table[2]) == [
        "db", "idle", "-", "-", "1", "-", "-", "timed out", "-", "-"]
    assert [format_uptime(s) for s in (5, 65, 90061)] == ["5s", "1m05s", "1d01h"]


async def test_blame_and_plot_from_a_real_daemon(tmp_path: Path) -> None:
    """Through a real daemon: two starts of a `ready: {delay: 200ms}` service show in
    `analyze blame` (readiness 200 ms) and as two bars in `analyze plot`."""
    port, other = free_port(), free_port()
    config = f"""
services:
  slow:
    command: {program("serve_lines.py", 0, "exit-when-idle", 0.5)}
    user: root
    ready: {{delay: 200ms}}
    sockets:
      tcp: tcp://127.0.0.1:{port}
  unused:
    command: {program("serve_lines.py", 0)}
    user: root
    sockets:
      tcp: tcp://127.0.0.1:{other}
"""
    async with run_lazyd(tmp_path, config) as lz:
        await lz.activate_until_idle("slow", port, times=2)
        where = ["--control", lz.control_path]
        table = await trio.run_process([PY, "-m", "lazyd", "analyze", "blame", *where],
                                       capture_stdout=True)
        plot = await trio.run_process([PY, "-m", "lazyd", "analyze", "plot", *where],
                                      capture_stdout=True)
        status = await lz.status()
        bad = await trio.run_process(
            [PY, "-m", "lazyd", "analyze", "plot", "--since", "soon", *where],
            capture_stderr=True, check=False)
    lines = table.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["slow", "unused"]
    cells = re.split(r" {2,}", lines[1])
    assert cells[1:3] == ["2", "0"]
    # readiness: the delay timer never fires early; a busy machine may make it late
    assert 199.9 <= float(cells[7].removesuffix(" ms")) <= 300
    assert cells[3] == f"{status['slow']['p50_ms']:.1f} ms"
    root = _parse(plot.stdout.decode())
    rows = {r.get("data-service"): len(_groups(r, "start")) for r in _groups(root, "row")}
    assert rows == {"slow": 2, "unused": 0}
    assert bad.returncode == 2 and b"bad duration" in bad.stderr
