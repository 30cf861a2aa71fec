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
