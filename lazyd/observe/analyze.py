"""`lazyd analyze blame | plot`: where start time goes, as a table and as a picture.

Pure functions from the daemon's status (`{"command": "status", "history":
true}`: every service with its recorded `starts`) to text and SVG, so that
they are tested without a daemon.  Each start record carries milliseconds
counted from its trigger (the first traffic): `spawn_ms` (exec done),
`ready_ms`, and where lazyd can see them `first_accept_ms` (pass mode) and
`first_byte_ms` (proxy mode); `at` is the trigger's wall-clock time.

The phases shown are: spawn (trigger to exec done), readiness (exec done to
ready), and first accept / first byte (ready to the service's first accept,
or to the first byte reaching it).  Percentiles are nearest-rank, the same
as `lazyd status` uses, so the two agree to the digit.
"""

from __future__ import annotations

import datetime
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lazyd.core.starts import percentile


def recent(services: Mapping[str, Any], since: float) -> dict[str, Any]:
    """The same services with only the starts triggered at `since` (wall clock) or later."""
    return {
        name: {**svc, "starts": [s for s in svc.get("starts") or [] if s["at"] >= since]}
        for name, svc in services.items()
    }


# --- blame -------------------------------------------------------------------------


@dataclass(frozen=True)
class Blame:
    """One service's start latency, in milliseconds (None: nothing recorded)."""

    service: str
    starts: int  # starts that became ready
    failed: int  # starts that failed or timed out
    p50: float | None
    p90: float | None
    max: float | None
    spawn: float | None  # medians from here on
    readiness: float | None
    first_accept: float | None  # after ready
    first_byte: float | None  # after ready


def _after(record: Mapping[str, Any], key: str, base: str) -> float | None:
    """record[key] - record[base], if both are known."""
    value, origin = record.get(key), record.get(base)
    return None if value is None or origin is None else float(value) - float(origin)


def _median(values: Iterable[float | None]) -> float | None:
    return percentile([v for v in values if v is not None], 0.5)


def blame(services: Mapping[str, Any]) -> list[Blame]:
    """Every service's start figures, the slowest (by p50) first; services that
    never started last, by name."""
    rows: list[Blame] = []
    for name, svc in services.items():
        starts: list[Mapping[str, Any]] = svc.get("starts") or []
        ready = [s for s in starts if s.get("ready_ms") is not None]
        totals = [float(s["ready_ms"]) for s in ready]
        rows.append(
            Blame(
                service=name,
                starts=len(ready),
                failed=len(starts) - len(ready),
                p50=percentile(totals, 0.5),
                p90=percentile(totals, 0.9),
                max=max(totals) if totals else None,
                spawn=_median(s.get("spawn_ms") for s in ready),
                readiness=_median(_after(s, "ready_ms", "spawn_ms") for s in ready),
                first_accept=_median(_after(s, "first_accept_ms", "ready_ms") for s in ready),
                first_byte=_median(_after(s, "first_byte_ms", "ready_ms") for s in ready),
            )
        )
    rows.sort(key=lambda r: (r.p50 is None, -(r.p50 or 0.0), r.service))
    return rows


def format_ms(value: float | None, sign: str = "") -> str:
    """1.2 ms, 212.4 ms, 2.35 s; '-' for unknown."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{sign}{value / 1000:.2f} s"
    return f"{sign}{value:.1f} ms"


def format_blame(services: Mapping[str, Any]) -> str:
    """The table `lazyd analyze blame` prints."""
    header = ("SERVICE", "STARTS", "FAILED", "P50", "P90", "MAX",
              "SPAWN", "READINESS", "FIRST ACCEPT", "FIRST BYTE")
    table = [header]
    for r in blame(services):
        table.append((
            r.service, str(r.starts), str(r.failed),
            format_ms(r.p50), format_ms(r.p90), format_ms(r.max),
            format_ms(r.spawn), format_ms(r.readiness),
            format_ms(r.first_accept, "+"), format_ms(r.first_byte, "+"),
        ))
    lines = _columns(table)
    lines += [
        "",
        "P50/P90/MAX: first traffic to ready, over the recorded starts (the last 100 each).",
        "SPAWN (first traffic to exec done), READINESS (exec done to ready), FIRST ACCEPT",
        "(pass) and FIRST BYTE (proxy), counted from ready: medians.",
    ]
    lines += datapath_lines(services)
    return "\n".join(lines)


def datapath_lines(services: Mapping[str, Any]) -> list[str]:
    """Which services run on the kernel data path, and the connections steered
    into them (which lazyd does not carry, so FIRST BYTE covers only those it held)."""
    kernel = [(name, svc) for name, svc in services.items() if svc.get("datapath") == "kernel"]
    if not kernel:
        return []
    lines = ["", "Kernel data path (new connections go straight to the warm service):"]
    for name, svc in kernel:
        count = svc.get("steered")
        lines.append(f"  {name}: {count} connection{'' if count == 1 else 's'} steered")
    return lines


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


# --- plot --------------------------------------------------------------------------

SVG_NS = "http://www.w3.org/2000/svg"
COLOURS = {
    "spawn": "#f28e2b",  # orange
    "readiness": "#4e79a7",  # blue
    "first": "#59a14f",  # green: first accept / first byte
    "failed": "#e15759",  # red
    "held": "#3b3b3b",
}
LABEL_WIDTH = 170  # the service names, left of the plot
PLOT_WIDTH = 800  # what the time axis aims for
ROW_HEIGHT = 34
BAR_HEIGHT = 12
SEGMENT_PAD = 10  # px of empty axis either side of a stretch of starts
BREAK_WIDTH = 44  # px for a gap that was cut out
MIN_SEGMENT = 60  # px, however short the stretch
TICK_SPACING = 90  # px between ticks, at least


@dataclass(frozen=True)
class _Start:
    service: str
    at: float  # trigger, wall clock
    spawned: float | None  # wall clock from here on
    ready: float | None
    first: float | None  # first accept or first byte
    held: int | None
    record: Mapping[str, Any]

    @property
    def end(self) -> float:
        return max(t for t in (self.at, self.spawned, self.ready, self.first) if t is not None)


@dataclass
class _Segment:
    """A stretch of the time axis with starts in it; the gaps between are cut out."""

    start: float
    end: float
    x: float = 0.0  # left edge, px
    width: float = 0.0


def _starts(services: Mapping[str, Any]) -> list[_Start]:
    found = []
    for name, svc in services.items():
        for s in svc.get("starts") or []:
            at = float(s["at"])

            def wall(ms: Any, at: float = at) -> float | None:
                return None if ms is None else at + float(ms) / 1000

            first = s.get("first_byte_ms")
            if first is None:
                first = s.get("first_accept_ms")
            found.append(_Start(name, at, wall(s.get("spawn_ms")), wall(s.get("ready_ms")),
                                wall(first), s.get("held"), s))
    found.sort(key=lambda s: s.at)
    return found


def _segments(starts: Sequence[_Start]) -> list[_Segment]:
    """Group the starts into stretches of time; a silence longer than a second
    (or than a quarter of the longest start) between them is cut out of the
    axis, so starts hours apart stay wide enough to read."""
    longest = max(s.end - s.at for s in starts)
    threshold = max(1.0, longest / 4)
    segments: list[_Segment] = []
    for s in starts:
        if segments and s.at - segments[-1].end <= threshold:
            segments[-1].end = max(segments[-1].end, s.end)
        else:
            segments.append(_Segment(s.at, s.end))
    return segments


def _layout(segments: list[_Segment]) -> float:
    """Place the segments left to right on one common scale; return px per second."""
    fixed = len(segments) * 2 * SEGMENT_PAD + (len(segments) - 1) * BREAK_WIDTH
    spans = sum(seg.end - seg.start for seg in segments)
    room = max(PLOT_WIDTH - fixed, 120 * len(segments))
    scale = room / spans if spans > 0 else 1000.0
    x = float(LABEL_WIDTH)
    for seg in segments:
        seg.x = x
        seg.width = max((seg.end - seg.start) * scale + 2 * SEGMENT_PAD, MIN_SEGMENT)
        x += seg.width + BREAK_WIDTH
    return scale


def _nice_step(seconds: float) -> float:
    """The smallest of 1, 2, 5 x 10^k seconds that is at least `seconds`."""
    exponent = math.floor(math.log10(seconds))
    for mantissa in (1, 2, 5, 10):
        step = mantissa * 10.0**exponent
        if step >= seconds * (1 - 1e-9):
            return step
    return 10.0 ** (exponent + 1)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.4g} ms"
    if seconds < 120:
        return f"{seconds:.4g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    if seconds < 172800:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} d"


def _clock(at: float, *, date: bool = False) -> str:
    moment = datetime.datetime.fromtimestamp(at).astimezone()
    text = moment.strftime("%H:%M:%S.%f")[:-3]
    return f"{moment:%Y-%m-%d} {text}" if date else text


def _zone(at: float | None) -> str:
    """The local time zone's name and offset, as it was at `at` (default: now)."""
    moment = (datetime.datetime.now() if at is None
              else datetime.datetime.fromtimestamp(at)).astimezone()
    name, offset = moment.strftime("%Z"), moment.strftime("%z")
    return name if offset == "+0000" else f"{name}, UTC{offset[:3]}:{offset[3:]}"


def _tooltip(s: _Start) -> str:
    r = s.record
    outcome = r.get("outcome", "ready")
    when = _clock(s.at, date=True)
    if s.ready is None:
        return f"{s.service}: start {outcome} ({r.get('reason')}) at {when}"
    parts = [f"spawn {format_ms(r.get('spawn_ms'))}",
             f"readiness {format_ms(_after(r, 'ready_ms', 'spawn_ms'))}"]
    if r.get("first_accept_ms") is not None:
        parts.append(f"first accept {format_ms(_after(r, 'first_accept_ms', 'ready_ms'), '+')}")
    if r.get("first_byte_ms") is not None:
        parts.append(f"first byte {format_ms(_after(r, 'first_byte_ms', 'ready_ms'), '+')}")
    text = f"{s.service}: ready in {format_ms(r.get('ready_ms'))} ({', '.join(parts)})"
    if s.held is not None:
        text += f", {s.held} held"
    return f"{text}; {r.get('reason')} at {when}"


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs: Any) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_").replace("_", "-"): _attr(v)
                                          for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def _attr(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


def render_svg(services: Mapping[str, Any]) -> str:
    """An SVG timeline of the recorded starts: one row per service, wall-clock
    time across, one bar per start (spawn, readiness, first accept/byte in
    their colours; failed starts as red diamonds), the connections held at
    ready as a number above each bar (`recent()` leaves older starts out).
    Every row is a ``<g class="row">`` and every start a
    ``<g class="start">`` inside it, with its figures as a tooltip."""
    starts = _starts(services)
    segments = _segments(starts) if starts else []
    scale = _layout(segments) if segments else 1.0
    order = _row_order(services, starts)

    top = 78  # title and legend above the rows
    plot_right = (segments[-1].x + segments[-1].width) if segments else LABEL_WIDTH + PLOT_WIDTH
    # Room on the right for the last stretch's clock label, which runs rightwards.
    last_label = segments[-1].x + SEGMENT_PAD + 100 if segments else 0
    width = math.ceil(max(plot_right + 20, last_label))
    rows_bottom = top + ROW_HEIGHT * max(len(order), 1)
    height = rows_bottom + 62

    svg = ET.Element("svg", {"xmlns": SVG_NS, "width": str(width), "height": str(height),
                             "viewBox": f"0 0 {width} {height}",
                             "font-family": "DejaVu Sans, Helvetica, Arial, sans-serif",
                             "font-size": "12"})
    _el(svg, "title", "lazyd: service starts")
    _el(svg, "rect", x=0, y=0, width=width, height=height, fill="white")
    span = (f"{len(starts)} start{'s' if len(starts) != 1 else ''}, "
            f"{_clock(starts[0].at, date=True)} to {_clock(starts[-1].end)}"
            if starts else "no starts recorded")
    _el(svg, "text", f"lazyd: service starts ({span})", x=12, y=22,
        font_size=15, font_weight="bold", fill="#222")
    _legend(svg, 12, 46)

    def x_of(t: float) -> float:
        for seg in segments:
            if seg.start <= t <= seg.end:
                return seg.x + SEGMENT_PAD + (t - seg.start) * scale
        raise ValueError(f"{t} lies in no segment")  # cannot happen: segments cover starts

    rows = _el(svg, "g", class_="rows")
    for index, name in enumerate(order):
        y = top + index * ROW_HEIGHT
        row = _el(rows, "g", class_="row", data_service=name)
        if index % 2 == 0:
            _el(row, "rect", x=0, y=y, width=width, height=ROW_HEIGHT, fill="#f4f5f7")
        _el(row, "text", name, x=12, y=y + 21, fill="#222", font_weight="bold")
        for s in (s for s in starts if s.service == name):
            _bar(row, s, x_of, y)
    if not order:
        _el(rows, "text", "no services", x=12, y=top + 21, fill="#666")

    axis = _el(svg, "g", class_="axis", font_size=10, fill="#444")
    _axis(axis, segments, scale, top, rows_bottom)
    caption = (f"wall clock ({_zone(starts[0].at if starts else None)}) at each start; "
               "a bar runs from the first traffic on")
    if len(segments) > 1:
        caption += "; stretches without starts are cut out (≈)"
    _el(svg, "text", caption, x=LABEL_WIDTH, y=rows_bottom + 50, font_size=11, fill="#444")
    return ET.tostring(svg, encoding="unicode", xml_declaration=False) + "\n"


def _row_order(services: Mapping[str, Any], starts: Sequence[_Start]) -> list[str]:
    """Services in the order they first started (a boot reads top to bottom);
    the ones that never started after them, by name."""
    first: dict[str, float] = {}
    for s in starts:
        first.setdefault(s.service, s.at)
    return sorted(services, key=lambda n: (n not in first, first.get(n, 0.0), n))


def _legend(svg: ET.Element, x: float, y: float) -> None:
    legend = _el(svg, "g", class_="legend", font_size=11, fill="#333")
    items = [("spawn", "spawn (first traffic → exec)"),
             ("readiness", "readiness (exec → ready)"),
             ("first", "first accept / first byte")]
    for key, label in items:
        _el(legend, "rect", x=x, y=y - 9, width=14, height=10, fill=COLOURS[key])
        _el(legend, "text", label, x=x + 19, y=y)
        x += 26 + 6.2 * len(label)
    _el(legend, "path", d=_diamond(x + 6, y - 4, 6), fill=COLOURS["failed"])
    _el(legend, "text", "start failed / timed out", x=x + 17, y=y)
    x += 36 + 6.2 * 23
    _badge(legend, x + 10, y - 4, "17")
    _el(legend, "text", "connections held at ready", x=x + 24, y=y)


def _bar(row: ET.Element, s: _Start, x_of: Callable[[float], float], y: float) -> None:
    bar_y = y + ROW_HEIGHT - BAR_HEIGHT - 5
    g = _el(row, "g", class_="start" if s.ready is not None else "start failed")
    _el(g, "title", _tooltip(s))
    x0 = x_of(s.at)
    if s.ready is None:
        end = x_of(s.spawned) if s.spawned is not None else x0
        if end - x0 >= 2:
            _el(g, "rect", x=x0, y=bar_y, width=end - x0, height=BAR_HEIGHT,
                fill=COLOURS["spawn"], opacity=0.6)
        _el(g, "path", d=_diamond(x0, bar_y + BAR_HEIGHT / 2, 7), fill=COLOURS["failed"],
            stroke="white", stroke_width=1)
        return
    assert s.spawned is not None
    xs, xr = x_of(s.spawned), x_of(s.ready)
    xr = max(xr, x0 + 2)  # too quick to see at this scale: still a sliver
    xs = min(max(xs, x0), xr)
    _el(g, "rect", class_="spawn", x=x0, y=bar_y, width=xs - x0, height=BAR_HEIGHT,
        fill=COLOURS["spawn"])
    _el(g, "rect", class_="readiness", x=xs, y=bar_y, width=xr - xs, height=BAR_HEIGHT,
        fill=COLOURS["readiness"])
    if s.first is not None and s.first > s.ready:
        xf = x_of(s.first)
        _el(g, "rect", class_="first", x=xr, y=bar_y, width=max(xf - xr, 1.0),
            height=BAR_HEIGHT, fill=COLOURS["first"])
    if s.held is not None:
        _badge(g, xr, bar_y - 8, str(s.held))


def _badge(parent: ET.Element, cx: float, cy: float, text: str) -> None:
    """A dark rounded label, centred on (cx, cy)."""
    w = 8 + 6.5 * len(text)
    badge = _el(parent, "g", class_="held")
    _el(badge, "rect", x=cx - w / 2, y=cy - 7, width=w, height=14, rx=7, fill=COLOURS["held"])
    _el(badge, "text", text, x=cx, y=cy + 3.5, fill="white", font_size=10,
        text_anchor="middle", font_weight="bold")


def _diamond(cx: float, cy: float, r: float) -> str:
    return (f"M{_attr(cx)},{_attr(cy - r)} L{_attr(cx + r)},{_attr(cy)} "
            f"L{_attr(cx)},{_attr(cy + r)} L{_attr(cx - r)},{_attr(cy)} Z")


def _axis(axis: ET.Element, segments: Sequence[_Segment], scale: float, top: float,
          bottom: float) -> None:
    """Per stretch: a baseline, ticks with light grid lines, its start as a
    clock time and the ticks as offsets from it; a ≈ and the length of each
    silence that was cut out between stretches."""
    step = _nice_step(TICK_SPACING / scale)
    for i, seg in enumerate(segments):
        left, right = seg.x, seg.x + seg.width
        _el(axis, "line", x1=left, y1=bottom, x2=right, y2=bottom, stroke="#888")
        origin = seg.x + SEGMENT_PAD
        _el(axis, "line", x1=origin, y1=top, x2=origin, y2=bottom + 5, stroke="#ccc")
        # Left-aligned, so that it never runs into the gap's label before it.
        _el(axis, "text", _clock(seg.start), x=origin - 2, y=bottom + 18, font_weight="bold")
        k = 1
        while (x := origin + k * step * scale) <= right - 4:
            _el(axis, "line", x1=x, y1=top, x2=x, y2=bottom + 5, stroke="#e3e3e3")
            _el(axis, "text", f"+{_duration(k * step)}", x=x, y=bottom + 32,
                text_anchor="middle")
            k += 1
        if i + 1 < len(segments):
            gap = segments[i + 1].start - seg.end
            mid = right + BREAK_WIDTH / 2
            _el(axis, "text", "≈", x=mid, y=bottom + 5, text_anchor="middle", font_size=14)
            _el(axis, "text", _duration(gap), x=mid, y=bottom - 5, text_anchor="middle",
                fill="#888")
