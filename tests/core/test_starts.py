"""lazyd.core.starts: one start record, told the same in the log line, the JSON log
fields and status."""

from __future__ import annotations

from lazyd.core.lifecycle import Activation, Outcome
from lazyd.core.starts import HISTORY, StartHistory, StartRecord, describe_waiting, percentile
from lazyd.levels import Level


def _record(outcome: Outcome, spawned: float | None, ready: float | None) -> StartRecord:
    return StartRecord.from_activation(Activation(outcome, "traffic", 10.0, spawned, ready), 10.0)


def test_a_ready_start_reads_the_same_in_every_view() -> None:
    """Spawned 3.1 ms and ready 212.4 ms after its trigger: the log line, the JSON fields
    and status's JSON carry those figures, and it is logged as information."""
    record = _record(Outcome.READY, 10.0031, 10.2124)
    record.held = 17
    waiting = describe_waiting(17, None)
    assert record.line("blog", waiting) == (
        "blog: ready in 212.4 ms (spawn 3.1 ms, readiness 209.3 ms), 17 connections waiting")
    assert record.level is Level.INFO
    fields = record.fields()
    assert (fields["outcome"], fields["total_ms"], fields["spawn_ms"], fields["held"]) == (
        "ready", 212.4, 3.1, 17)
    assert round(fields["readiness_ms"], 1) == 209.3
    status = record.to_json()
    assert (status["spawn_ms"], status["ready_ms"], status["held"]) == (3.1, 212.4, 17)


def test_a_failed_start_is_an_error_with_its_reason() -> None:
    """A start that never got ready is logged as an error naming its outcome and reason,
    with no readiness or total figures."""
    record = _record(Outcome.FAILED, 10.002, None)
    assert record.line("blog", None) == "blog: start failed (traffic)"
    assert record.level is Level.ERR
    assert record.fields()["total_ms"] is None and record.to_json()["ready_ms"] is None


def test_history_keeps_the_last_starts_and_summarises_them() -> None:
    """A history keeps only the last HISTORY records; p50, p90 and max are over the
    ready ones (nearest rank), in milliseconds."""
    history = StartHistory()
    history.append(_record(Outcome.FAILED, 10.0, None))
    assert history.summary() == {"p50_ms": None, "p90_ms": None, "max_ms": None}
    for n in range(HISTORY):  # 1 to 10 ms, ten of each; the failed one falls out
        history.append(_record(Outcome.READY, 10.0, 10.0 + (n % 10 + 1) / 1000))
    assert len(history) == HISTORY and all(r.ready is not None for r in history)
    assert history.summary() == {"p50_ms": 5.0, "p90_ms": 9.0, "max_ms": 10.0}
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile([], 0.9) is None
