"""The record of every start: what `status`, `analyze` and the metrics show.

Each start attempt becomes a `StartRecord` with the daemon's clock times of
its phases: trigger (the first connection or datagram), spawned (exec done),
ready, and where lazyd can see them the first byte forwarded (proxy) and the
first accept (pass mode: the listener's accept queue shrinking).  A service
keeps its last `HISTORY` records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lazyd.core.lifecycle import Activation, Outcome
from lazyd.levels import Level

HISTORY = 100


@dataclass
class StartRecord:
    outcome: Outcome
    reason: str
    trigger: float
    spawned: float | None
    ready: float | None
    wall: float  # time.time() of the trigger
    held: int | None = None  # connections/datagrams waiting when it became ready
    first_byte: float | None = None
    first_accept: float | None = None

    @classmethod
    def from_activation(cls, activation: Activation, now: float) -> StartRecord:
        """`now` is the daemon clock's current time, to place the trigger in wall time."""
        return cls(
            outcome=activation.outcome,
            reason=activation.reason,
            trigger=activation.trigger,
            spawned=activation.spawned,
            ready=activation.ready,
            wall=time.time() - (now - activation.trigger),
        )

    @property
    def total(self) -> float | None:
        """Trigger to ready, in seconds."""
        return None if self.ready is None else self.ready - self.trigger

    def _ms(self, t: float | None) -> float | None:
        return None if t is None else round((t - self.trigger) * 1000, 3)

    # -- the three views of one record: the log line, its JSON log fields,
    # -- and status/analyze's JSON (to_json) --------------------------------

    @property
    def level(self) -> Level:
        """A start that failed or timed out is an error; a ready one is information."""
        return Level.INFO if self.ready is not None else Level.ERR

    def line(self, name: str, waiting: str | None) -> str:
        """The one log line written for each start attempt, e.g. ``blog: ready in
        212.4 ms (spawn 3.1 ms, readiness 209.3 ms), 17 connections waiting``;
        `waiting` as from `describe_waiting`."""
        if self.ready is not None and self.spawned is not None:
            text = (
                f"{name}: ready in {_text_ms(self.ready - self.trigger)} "
                f"(spawn {_text_ms(self.spawned - self.trigger)}, "
                f"readiness {_text_ms(self.ready - self.spawned)})"
            )
            return f"{text}, {waiting}" if waiting is not None else text
        return f"{name}: start {self.outcome.value} ({self.reason})"

    def fields(self) -> dict[str, Any]:
        """What a JSON log line carries for this start: its outcome and its phases
        in milliseconds (spawn: trigger to exec done; readiness: exec done to
        ready; total: trigger to ready), and the connections held when it was ready."""
        spawn = None if self.spawned is None else self.spawned - self.trigger
        readiness = (
            None if self.spawned is None or self.ready is None else self.ready - self.spawned
        )
        return {
            "event": "activation",
            "outcome": self.outcome.value,
            "reason": self.reason,
            "total_ms": _round_ms(self.total),
            "spawn_ms": _round_ms(spawn),
            "readiness_ms": _round_ms(readiness),
            "held": self.held,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.wall, 6),
            "outcome": self.outcome.value,
            "reason": self.reason,
            "spawn_ms": self._ms(self.spawned),
            "ready_ms": self._ms(self.ready),
            "first_accept_ms": self._ms(self.first_accept),
            "first_byte_ms": self._ms(self.first_byte),
            "held": self.held,
        }


def percentile(values: Iterable[float], fraction: float) -> float | None:
    """The nearest-rank percentile (p50 of 1, 2, 3, 4 is 2); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class StartHistory(list[StartRecord]):
    """The last HISTORY start records of one service, oldest first.  A list
    rather than a bounded deque: most services of an idle daemon have no
    record at all, and an empty deque costs 600 bytes, an empty list 56."""

    def append(self, record: StartRecord) -> None:
        super().append(record)
        if len(self) > HISTORY:
            del self[0]

    def totals_ms(self) -> list[float]:
        return [r.total * 1000 for r in self if r.total is not None]

    def summary(self) -> dict[str, float | None]:
        totals = self.totals_ms()
        return {
            "p50_ms": _round(percentile(totals, 0.5)),
            "p90_ms": _round(percentile(totals, 0.9)),
            "max_ms": _round(max(totals)) if totals else None,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _text_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _round_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def describe_waiting(connections: int | None, datagrams: int | None) -> str | None:
    """`17 connections waiting`, `3 datagrams waiting`, or both; None when
    neither could be counted (a pass-mode datagram socket)."""
    parts = []
    if connections is not None and (connections or not datagrams):
        parts.append(_count(connections, "connection"))
    if datagrams is not None and (datagrams or connections is None):
        parts.append(_count(datagrams, "datagram"))
    return f"{' and '.join(parts)} waiting" if parts else None
