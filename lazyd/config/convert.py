"""The converters: a scalar's value in, a typed value out, ValueError saying what is wrong.

Pure functions of the value: nothing here looks at the machine (users,
groups, files are `lazyd.config.host`'s), so each can be fed any value YAML
can produce.  The reader turns the ValueError into a problem located at the
scalar's node.
"""

from __future__ import annotations

import enum
import math
import re
import signal
from collections.abc import Callable
from typing import TypeVar

from lazyd.core.policy import Restart
from lazyd.net.addresses import Address, Kind, parse_address

MAX_INT = 2**31 - 1  # what a C int (listen()'s backlog, ...) holds
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+) *(ms|s|m|h)?", re.ASCII)
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

E = TypeVar("E", bound=enum.Enum)


def parse_duration(value: object) -> float:
    """Seconds from `250ms`, `1.5s`, `10m`, `1h` or a plain non-negative number of seconds.

    Raise ValueError saying what is wrong.
    """
    seconds = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e300 else math.inf
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match[1]) * _UNIT[match[2]]
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"bad duration {show(value)}: "
                         "expected seconds or a number with ms, s, m or h")
    return seconds


def parse_signal(value: object) -> signal.Signals:
    """A signal from `SIGTERM`, `TERM`, `sigterm` or its number; ValueError if unknown."""
    try:
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            return signal.Signals(int(value))
        if isinstance(value, int) and not isinstance(value, bool):
            return signal.Signals(value)
        if isinstance(value, str):
            name = value.strip().upper()
            return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        pass
    raise ValueError(f"unknown signal {show(value)}")


def show(value: object) -> str:
    """A value as messages show it: strings quoted, others as YAML writes them."""
    if value is None or isinstance(value, bool):
        return str(value).lower().replace("none", "null")
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:76] + "..."


def string(value: object) -> str:
    if not isinstance(value, str) or value == "":
        raise ValueError(f"expected a non-empty string, got {show(value)}")
    return value


def whole(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INT:
        raise ValueError(f"expected a whole number from 1 to {MAX_INT}, got {show(value)}")
    return value


def flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def one_of(*words: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if isinstance(value, str) and value in words:
            return value
        raise ValueError(f"expected {', '.join(words[:-1])} or {words[-1]}, got {show(value)}")

    return convert


def choice(kind: type[E], *words: str) -> Callable[[object], E]:
    """A converter to a member of `kind` (only those whose values are `words`, if given)."""
    word = one_of(*(words or [str(member.value) for member in kind]))
    return lambda value: kind(word(value))


def positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError(f"expected a duration of more than 0, got {show(value)}")
    return seconds


def restart(value: object) -> Restart:
    # YAML 1.1 reads a bare `no` as false; a `yes` would have to guess between two policies.
    if value is True:
        raise ValueError("true is not a restart policy: write on-failure or always")
    return Restart.NO if value is False else choice(Restart)(value)


def address(value: object) -> Address:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected an address such as tcp://0.0.0.0:80, got {show(value)}")
    return parse_address(value)


def control(value: object) -> str:
    if not (isinstance(value, str) and value.startswith("unix:")):
        raise ValueError(f"expected unix:/PATH, got {show(value)}")
    address = parse_address(value)
    if address.is_abstract or address.path is None:
        raise ValueError(f"expected unix:/PATH, got {show(value)}")
    return address.path


def metrics(value: object) -> Address:
    parsed = address(value)
    if parsed.kind is not Kind.TCP:
        raise ValueError(f"expected a TCP address such as tcp://127.0.0.1:9464, got {show(value)}")
    if parsed.dual_stack:
        # A bare port: the endpoint has no authentication, so it answers on
        # loopback only unless an address says otherwise.
        return Address(Kind.TCP, host="127.0.0.1", port=parsed.port)
    return parsed


def file_mode(value: object, written: str) -> int:
    mode = -1
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads 0660 as octal but 660 as decimal: a mode written without its
        # leading zero is almost certainly not the number its writer meant.
        if not written.lstrip("+-").startswith("0"):
            raise ValueError(f"file mode {written} would be read as a decimal number; "
                             "write it in octal with a leading 0, such as 0660")
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"(0o)?[0-7]{1,5}", value.strip(), re.ASCII):
        mode = int(value.strip().removeprefix("0o"), 8)
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"bad file mode {show(value)}: expected octal 0000 to 7777, "
                         "such as 0660")
    return mode
