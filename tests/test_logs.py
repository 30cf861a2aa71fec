"""lazyd.logs: text and JSON lines, journald priorities, and the levels of real events."""

from __future__ import annotations

import datetime
import io
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyd.config import Ready as ReadyConfig
from lazyd.config import ReadyKind, Restart, ServiceConfig
from lazyd.core.lifecycle import (
    Activation,
    Exited,
    Lifecycle,
    Log,
    Outcome,
    Spawned,
    SpawnFailed,
    Start,
    Stop,
    Tick,
)
from lazyd.core.starts import StartRecord
from lazyd.logs import (
    Level,
    Logger,
    ThrottledLog,
    journal_stream,
    log_at,
    split_service,
)
from lazyd.runtime.service import describe_waiting
from tests.conftest import PY, free_port, program

T0 = datetime.datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=datetime.UTC).timestamp()


def _logger(log_format: str = "text", *, journal: bool = False) -> tuple[Logger, io.StringIO]:
    out = io.StringIO()
    return Logger(log_format, out, journal=journal, clock=lambda: T0), out  # type: ignore[arg-type]


def test_text_lines_are_written_as_given_without_the_journal() -> None:
    """Plain text, no journal: each line exactly as given, one per call."""
    logger, out = _logger()
    logger("web: ready in 212.4 ms")
    logger("web: start failed (traffic)", Level.ERR, outcome="failed")
    assert out.getvalue() == "web: ready in 212.4 ms\nweb: start failed (traffic)\n"


def test_journal_lines_carry_sd_daemon_priorities() -> None:
    """Under journald each line starts with <6> info, <4> warning or <3> err."""
    logger, out = _logger(journal=True)
    logger("web: ready in 212.4 ms")
    logger("web: killed by SIGKILL", Level.WARNING)
    logger("web: start failed (traffic)", Level.ERR)
    assert out.getvalue().splitlines() == [
        "<6>web: ready in 212.4 ms",
        "<4>web: killed by SIGKILL",
        "<3>web: start failed (traffic)",
    ]


def test_json_lines_have_ts_level_service_message_and_fields() -> None:
    """--log-format json: one object per line; lazyd's own lines have service null."""
    logger, out = _logger("json")
    logger("web: ready in 212.4 ms", Level.INFO, readiness_ms=209.3)
    logger("lazyd: holding 2 sockets for 1 service")
    logger("web: start timed out (traffic)", Level.ERR)
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first == {"ts": "2024-05-01T12:00:00.250000Z", "level": "info", "service": "web",
                     "message": "ready in 212.4 ms", "readiness_ms": 209.3}
    assert second["service"] is None and second["message"] == "holding 2 sockets for 1 service"
    assert third["level"] == "error"


def test_json_under_the_journal_is_prefixed_too() -> None:
    """JSON and journald together: the priority prefix comes first, the object after."""
    logger, out = _logger("json", journal=True)
    logger("web: gone", Level.WARNING)
    line = out.getvalue().rstrip("\n")
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["level"] == "warning"


def test_service_output_keeps_its_own_priority() -> None:
    """A service's `<3>disk full` becomes `<3>web: disk full` under journald, level error
    in JSON, and stays as written in plain text."""
    logger, out = _logger(journal=True)
    logger.output("web: <3>disk full")
    logger.output("web: <7>debugging")
    logger.output("web: plain")
    assert out.getvalue().splitlines() == ["<3>web: disk full", "<6>web: debugging",
                                           "<6>web: plain"]
    logger, out = _logger("json")
    logger.output("web: <4>slow disk")
    record = json.loads(out.getvalue())
    assert (record["level"], record["service"], record["message"], record["output"]) == (
        "warning", "web", "slow disk", True)
    logger, out = _logger()
    logger.output("web: <3>disk full")
    assert out.getvalue() == "web: <3>disk full\n"


def test_split_service_reads_the_name_prefix() -> None:
    """`NAME: text` names the service; `lazyd: ...` and unprefixed lines name none."""
    assert split_service("blog.v2: ready") == ("blog.v2", "ready")
    assert split_service("lazyd: stopped") == (None, "stopped")
    assert split_service("no prefix here") == (None, "no prefix here")


def test_log_at_gives_a_plain_function_the_line_only() -> None:
    """Options.log may stay a plain function: log_at() passes it the line, nothing else."""
    lines: list[str] = []
    log_at(lines.append, Level.ERR, "web: failed", outcome="failed")
    assert lines == ["web: failed"]
    logger, out = _logger(journal=True)
    log_at(logger, Level.ERR, "web: failed")
    assert out.getvalue() == "<3>web: failed\n"


def test_journal_stream_matches_the_device_and_inode_of_stderr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """JOURNAL_STREAM counts only when it names the very stream written to."""
    read, write = os.pipe()
    with os.fdopen(read, "rb"), os.fdopen(write, "w") as stream:
        st = os.fstat(write)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_stream(stream)
        assert Logger(stream=stream).journal
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not journal_stream(stream)  # stderr redirected elsewhere: no prefixes
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not journal_stream(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journal_stream(stream)


# --- the levels of what really happens --------------------------------------------------


def _config(**changes: Any) -> ServiceConfig:
    base = ServiceConfig(name="svc", command=("x",), sockets=(),
                         ready=ReadyConfig(ReadyKind.STARTED))
    return replace(base, **changes)


def _levels(machine: Lifecycle, events: list[tuple[Any, float]]) -> dict[str, Level]:
    found: dict[str, Level] = {}
    for event, now in events:
        for action in machine.handle(event, now):
            if isinstance(action, Log):
                found[action.text] = action.level
    return found


def test_lifecycle_lines_get_their_levels() -> None:
    """Real lifecycle lines: a failed start, a timeout and the start limit are errors; a
    crash and a SIGKILL warnings; a stop asked for and a restart information."""
    m = Lifecycle(_config(restart=Restart.ON_FAILURE).policy, 0.0)
    m.begin(0.0)
    found = _levels(m, [(Start(), 0.0), (Spawned(10), 0.0), (Exited(3), 1.0), (Tick(), 1.1)])
    assert found == {"exited with status 3": Level.WARNING,
                     "restarting in 100 ms (on-failure)": Level.INFO}

    m = Lifecycle(_config(ready=ReadyConfig(ReadyKind.NOTIFY), start_timeout=1.0).policy, 0.0)
    m.begin(0.0)
    found = _levels(m, [(Start(), 0.0), (Spawned(10), 0.0), (Tick(), 1.0), (Exited(-15), 1.1)])
    assert found == {"start timed out: not ready within 1 s": Level.ERR,
                     "stopped (start timeout): killed by SIGTERM": Level.INFO}

    m = Lifecycle(_config(ready=ReadyConfig(ReadyKind.NOTIFY), start_limit=1).policy, 0.0)
    m.begin(0.0)
    found = _levels(m, [(Start(), 0.0), (Spawned(10), 0.0), (Exited(1), 0.1), (Start(), 0.2)])
    assert found == {"exited with status 1 before it was ready": Level.ERR,
                     "failed: 1 starts within 10 s; not starting again for 10 s": Level.ERR}

    m = Lifecycle(_config(stop_timeout=1.0).policy, 0.0)
    m.begin(0.0)
    found = _levels(m, [(Start(), 0.0), (Spawned(10), 0.0), (Stop("idle"), 1.0), (Tick(), 2.0),
                        (Exited(-9), 2.1)])
    assert found == {"still running 1 s after SIGTERM; sending SIGKILL": Level.WARNING,
                     "stopped (idle): killed by SIGKILL": Level.INFO}

    m = Lifecycle(_config().policy, 0.0)
    m.begin(0.0)
    found = _levels(m, [(Start(), 0.0), (Spawned(10), 0.0), (Exited(0), 1.0), (Start(), 2.0),
                        (SpawnFailed("svc: cannot start x: No such file"), 2.0)])
    assert found == {"exited with status 0": Level.INFO,
                     "svc: cannot start x: No such file": Level.ERR}


def test_an_activation_is_info_when_ready_and_an_error_otherwise() -> None:
    """Start records: ready is info with its phases in ms; failed and timed out are errors."""
    ready = StartRecord.from_activation(
        Activation(Outcome.READY, "traffic on http", 10.0, 10.003, 10.212), 10.212)
    ready.held = 17
    assert ready.level is Level.INFO
    assert ready.fields() == {
        "event": "activation", "outcome": "ready", "reason": "traffic on http",
        "total_ms": 212.0, "spawn_ms": 3.0, "readiness_ms": 209.0, "held": 17,
    }
    for outcome in (Outcome.FAILED, Outcome.TIMED_OUT):
        failed = StartRecord.from_activation(Activation(outcome, "traffic", 1.0, 1.1, None), 2.0)
        assert failed.level is Level.ERR
        assert failed.fields()["readiness_ms"] is None


# --- a real daemon -----------------------------------------------------------------------


class _Lines:
    """A lazyd subprocess's stderr, line by line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines += [raw.decode() for raw in complete]
            self.changed.set()
            self.changed = trio.Event()
        self.changed.set()

    async def wait_for(self, text: str, count: int = 1) -> list[str]:
        with trio.fail_after(10):
            while sum(text in line for line in self.lines) < count:
                await self.changed.wait()
        return self.lines


@asynccontextmanager
async def _lazyd(
    tmp_path: Path, config: str, *args: str, journal: bool = False
) -> AsyncIterator[_Lines]:
    """`lazyd run ARGS` with stderr on a pipe; with `journal`, JOURNAL_STREAM names it."""
    path = tmp_path / "lazyd.yaml"
    path.write_text(f"control: unix:{tmp_path / 'control.sock'}\n{config}")
    read, write = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        st = os.fstat(write)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    try:
        process = await trio.lowlevel.open_process(
            [PY, "-m", "lazyd", "run", "-c", str(path), *args],
            stdin=subprocess.DEVNULL, stderr=write, env=env, start_new_session=True,
        )
    finally:
        os.close(write)
    lines = _Lines()
    async with trio.lowlevel.FdStream(read) as stream, trio.open_nursery() as nursery:
        nursery.start_soon(lines.collect, stream)
        try:
            yield lines
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await process.wait() == 0, "\n".join(lines.lines)
            await lines.wait_for("stopped")
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            nursery.cancel_scope.cancel()


def _services(port: int, broken_port: int) -> str:
    return f"""
services:
  lines:
    command: {program("serve_lines.py", 0)}
    user: root
    ready: {{delay: 100ms}}
    sockets:
      tcp: tcp://127.0.0.1:{port}
  broken:
    command: [{PY}, -c, "raise SystemExit(3)"]
    user: root
    ready: notify
    start_limit: 1
    sockets:
      tcp: tcp://127.0.0.1:{broken_port}
"""


async def _poke(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"x\n")
        with trio.fail_after(10):
            await stream.receive_some(100)


async def _poke_broken(port: int) -> None:
    """Connect to a service that will fail; lazyd never answers, so just connect."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.aclose()


async def test_json_log_format_writes_only_json_with_the_phases(tmp_path: Path) -> None:
    """`lazyd run --log-format json`: every line of stderr (lazyd's and the services')
    is a JSON object; the activation carries its phases; a failed start is an error."""
    port, broken = free_port(), free_port()
    async with _lazyd(tmp_path, _services(port, broken), "--log-format", "json") as lz:
        await lz.wait_for("holding 2 sockets")
        await _poke(port)
        await _poke_broken(broken)
        await lz.wait_for('"outcome": "failed"')
        await lz.wait_for("ready in")
    records = [json.loads(line) for line in lz.lines if line]
    assert all({"ts", "level", "service", "message"} <= set(r) for r in records)
    ready = next(r for r in records if r.get("event") == "activation" and r["service"] == "lines")
    assert ready["level"] == "info" and ready["outcome"] == "ready"
    assert 95 <= ready["readiness_ms"] <= 400
    assert ready["total_ms"] == pytest.approx(ready["spawn_ms"] + ready["readiness_ms"], abs=0.01)
    failed = next(r for r in records if r.get("event") == "activation"
                  and r["service"] == "broken")
    assert failed["level"] == "error" and failed["readiness_ms"] is None
    assert any(r.get("output") and r["service"] == "lines" for r in records)  # its own output
    assert records[-1]["message"] == "stopped" and records[-1]["service"] is None


async def test_under_journald_every_line_has_a_priority(tmp_path: Path) -> None:
    """With JOURNAL_STREAM naming stderr, every line starts with <N>: <6> for a start,
    <3> for a start that failed."""
    port, broken = free_port(), free_port()
    async with _lazyd(tmp_path, _services(port, broken), journal=True) as lz:
        await lz.wait_for("holding 2 sockets")
        await _poke(port)
        await _poke_broken(broken)
        await lz.wait_for("broken: start failed")
        await lz.wait_for("lines: ready in")
    lines = [line for line in lz.lines if line]
    assert all(line[:3] in ("<6>", "<4>", "<3>") for line in lines), lines
    assert any(line.startswith("<6>lines: ready in") for line in lines)
    assert "<3>broken: exited with status 3 before it was ready" in lines
    assert any(line.startswith("<3>broken: start failed") for line in lines)


def test_throttled_log_says_the_first_then_one_per_interval_with_the_count() -> None:
    """ThrottledLog: the first line goes out, the rest of a burst is counted and reported
    with the next line once the interval has passed."""
    lines: list[str] = []
    now = [0.0]
    log = ThrottledLog(lines.append, 10.0, clock=lambda: now[0])
    for i in range(5):
        now[0] = i
        log.say(f"junk {i}", "more ignored")
    assert lines == ["junk 0"]
    now[0] = 10.0
    log.say("junk 10", "more ignored")
    now[0] = 20.0
    log.say("junk 20")
    assert lines == ["junk 0", "junk 10; 4 more ignored since the last report", "junk 20"]


@pytest.mark.parametrize(("connections", "datagrams", "text"), [
    (17, None, "17 connections waiting"),
    (1, None, "1 connection waiting"),
    (0, None, "0 connections waiting"),
    (None, 3, "3 datagrams waiting"),
    (2, 5, "2 connections and 5 datagrams waiting"),
    (0, 1, "1 datagram waiting"),
    (None, None, None),
])
def test_the_ready_line_names_what_waited(
    connections: int | None, datagrams: int | None, text: str | None
) -> None:
    """The ready line counts connections and datagrams each by its own name."""
    assert describe_waiting(connections, datagrams) == text
