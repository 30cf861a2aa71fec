"""lazyd's own log: one line per event, as text or JSON, with a level.

Everything lazyd says goes through a plain `Callable[[str], None]` (the
`log` of `lazyd.runtime.service.Options`), which tests replace with `list.append`.
`Logger` is such a callable and also takes a level and structured fields;
`log_at()` passes them when the callable is a Logger and just the line when it
is not, so the places where a level matters say so and nothing else changes.

Formats:

- text: the line as it is, ``NAME: what happened``.  When stderr is the
  journal's stream (systemd sets JOURNAL_STREAM to its device and inode), each
  line starts with an sd-daemon(3) priority, ``<3>`` to ``<6>``, which journald
  turns into the entry's priority.
- json: one object per line, ``{"ts", "level", "service", "message"}`` plus
  the fields given (an activation's phase figures).  ``service`` is null for
  lazyd's own lines.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, TextIO

from lazyd.levels import Level as Level  # the log speaks in these (re-exported)

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")



# "NAME: text": service names are letters, digits, '-', '_' and '.' (see config),
# so the first ": " ends the name.
_PREFIX = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*): ")
# A line a service itself wrote with an sd-daemon priority prefix.
_PRIORITY = re.compile(r"<([0-7])>")


def journal_stream(stream: TextIO) -> bool:
    """Whether `stream` is the journal's stream, as systemd.exec(5) says to tell:
    JOURNAL_STREAM holds ``DEVICE:INODE`` of the stream systemd connected, and
    it still counts only if `stream` is that very file (a `2>file` in between
    means it is not)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def split_service(line: str) -> tuple[str | None, str]:
    """``"NAME: text"`` -> (NAME, text); lazyd's own lines and others -> (None, text)."""
    match = _PREFIX.match(line)
    if match is None:
        return None, line
    name = match.group(1)
    return (None if name == "lazyd" else name), line[match.end():]


class Logger:
    """Writes log lines to a stream (stderr) in one of FORMATS.

    Call it like any log function: ``logger("web: ready")``, or with a level
    and fields: ``logger("web: start failed", Level.ERR, outcome="failed")``.
    `journal` adds sd-daemon priority prefixes; by default it is on when the
    stream is the journal's (see `journal_stream`).
    """

    def __init__(
        self,
        log_format: LogFormat = "text",
        stream: TextIO | None = None,
        *,
        journal: bool | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if log_format not in FORMATS:
            raise ValueError(f"unknown log format {log_format!r}")
        self.format = log_format
        self.stream = stream if stream is not None else sys.stderr
        self.journal = journal_stream(self.stream) if journal is None else journal
        self._clock = clock

    def __call__(self, line: str, level: Level = Level.INFO, **fields: Any) -> None:
        self._write(line, level, fields)

    def output(self, line: str) -> None:
        """A line a service wrote, as ``NAME: line``.  A service that prefixes its
        own lines with a priority (``<3>disk full``) keeps it: the priority moves
        to the front, where journald looks, or becomes the JSON level."""
        level = Level.INFO
        service, text = split_service(line)
        match = _PRIORITY.match(text)
        if service is not None and match is not None and (self.journal or self.format == "json"):
            # 0-2 (emerg, alert, crit) are err to us; 5 (notice) and 7 (debug) info.
            level = min((lvl for lvl in Level if lvl >= int(match.group(1))), default=Level.INFO)
            text = text[match.end():]
            line = f"{service}: {text}"
        self._write(line, level, {"output": True})

    def _write(self, line: str, level: Level, fields: dict[str, Any]) -> None:
        if self.format == "json":
            service, message = split_service(line)
            now = self._clock() if self._clock is not None else None
            record = {
                "ts": _timestamp(now),
                "level": level.word,
                "service": service,
                "message": message,
                **fields,
            }
            line = json.dumps(record, ensure_ascii=False)
        prefix = f"<{int(level)}>" if self.journal else ""
        # One write per line: lines from lazyd and its services stay whole.  A
        # reader that went away (EPIPE) costs the line, never the daemon.
        with contextlib.suppress(OSError):
            self.stream.write(f"{prefix}{line}\n")
            self.stream.flush()


def _timestamp(now: float | None) -> str:
    """RFC 3339 in UTC with microseconds: sortable, and unambiguous across zones."""
    if now is None:
        moment = datetime.datetime.now(datetime.UTC)
    else:
        moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def log_at(log: Callable[[str], None], level: Level, line: str, **fields: Any) -> None:
    """Log through `log` with a level and fields if it is a Logger; a plain
    function (a test's ``list.append``) gets the line alone."""
    if isinstance(log, Logger):
        log(line, level, **fields)
    else:
        log(line)


class ThrottledLog:
    """Lines about something anyone may cause over and over (a scan refused,
    junk sent to a notify socket): the first is logged, then at most one every
    `interval` seconds, saying how many were not.  Counting is cheap and the
    log stays readable whatever the rate."""

    def __init__(
        self, log: Callable[[str], None], interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._quiet_until = -float("inf")
        self._unreported = 0

    def say(self, line: str, what: str = "more") -> None:
        """Log `line`, or count it if a line went out less than `interval` ago;
        a logged line ends with how many were counted since (`N more ...`)."""
        now = self._clock()
        if now < self._quiet_until:
            self._unreported += 1
            return
        if self._unreported:
            line += f"; {self._unreported} {what} since the last report"
        self._log(line)
        self._quiet_until = now + self._interval
        self._unreported = 0
