"""`lazyd status --watch`: the status table, refreshed in place.

In a terminal the table is drawn on the alternate screen and redrawn over
itself (cursor home, each line cleared to its end, the rest of the screen
cleared), so nothing flickers and the shell's screen comes back untouched on
exit. Keys are read unbuffered (cbreak mode: Ctrl-C still interrupts); q quits.
A resize redraws at once. When stdout is not a terminal the table is printed
again every interval, separated by a blank line, for a log or a pipe.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from types import FrameType
from typing import TextIO

from lazyd.errors import ControlError
from lazyd.runtime import control

_ENTER = "\x1b[?1049h\x1b[?25l"  # alternate screen, cursor hidden
_LEAVE = "\x1b[?25h\x1b[?1049l"  # cursor shown, back to the normal screen
_HOME, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
_QUIT_KEYS = (b"q", b"Q")


def frame(path: str, interval: float) -> list[str]:
    """The lines of one refresh: a heading, then the table (or why there is none)."""
    from lazyd.cli import format_status

    heading = f"lazyd status at {path}, every {interval:g}s: {time.strftime('%H:%M:%S')}"
    try:
        reply = control.request(path, "status")
    except ControlError as exc:
        # Like watch(1): say so and keep trying; the daemon may be restarting.
        return [heading, str(exc)]
    return [heading, *format_status(reply["services"]).splitlines()]


def watch(path: str, interval: float, out: TextIO | None = None) -> int:
    """Show the status of the daemon at `path` every `interval` seconds until q,
    Ctrl-C or SIGTERM; 0 then."""
    out = out or sys.stdout
    try:
        if out.isatty():
            _watch_terminal(path, interval, out)
        else:
            _watch_plain(path, interval, out)
    except KeyboardInterrupt:
        pass
    return 0


def _watch_plain(path: str, interval: float, out: TextIO) -> None:
    first = True
    while True:
        if not first:
            out.write("\n")
        first = False
        out.write("\n".join(frame(path, interval)) + "\n")
        out.flush()
        time.sleep(interval)


def _watch_terminal(path: str, interval: float, out: TextIO) -> None:
    keys = sys.stdin.fileno() if sys.stdin.isatty() else None
    with _terminal(out, keys), _wakeups() as wake:
        while True:
            heading, *table = frame(path, interval)
            _draw(out, [heading, "", *table])
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([wake, *([keys] if keys is not None else [])],
                                               [], [], left)
                if keys in readable and any(k in os.read(keys, 64) for k in _QUIT_KEYS):
                    return
                if wake in readable:
                    os.read(wake, 64)  # a resize: draw again now
                    break


def _draw(out: TextIO, lines: list[str]) -> None:
    """Overwrite the screen with `lines`, cut to the terminal's size so none wraps."""
    size = shutil.get_terminal_size()
    shown = [line[: size.columns] for line in lines[: size.lines]]
    out.write(_HOME + "".join(line + _CLEAR_LINE + "\n" for line in shown[:-1])
              + shown[-1] + _CLEAR_LINE + _CLEAR_BELOW)
    out.flush()


@contextlib.contextmanager
def _terminal(out: TextIO, keys: int | None) -> Iterator[None]:
    """The alternate screen and unbuffered keys; the terminal as it was afterwards,
    whatever ends the view (q, Ctrl-C, SIGTERM, an error)."""
    saved = termios.tcgetattr(keys) if keys is not None else None

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        if keys is not None:
            tty.setcbreak(keys)
        out.write(_ENTER)
        out.flush()
        yield
    finally:
        out.write(_LEAVE)
        out.flush()
        if saved is not None and keys is not None:
            termios.tcsetattr(keys, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _wakeups() -> Iterator[int]:
    """A pipe that becomes readable on SIGWINCH, so a resize wakes the select()."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    os.set_blocking(read_end, False)
    old_fd = signal.set_wakeup_fd(write_end)
    old_handler = signal.signal(signal.SIGWINCH, lambda signum, frame: None)
    try:
        yield read_end
    finally:
        signal.signal(signal.SIGWINCH, old_handler)
        signal.set_wakeup_fd(old_fd)
        os.close(read_end)
        os.close(write_end)
