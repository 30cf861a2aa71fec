"""How much a line matters: sd-daemon(3) / syslog priorities, the ones lazyd
uses.  A leaf module: the pure lifecycle says how bad what it logs is, and
the log (`lazyd.logs`) writes it as a journald priority or a JSON
level, without either knowing the other.
"""

from __future__ import annotations

import enum


class Level(enum.IntEnum):
    ERR = 3
    WARNING = 4
    INFO = 6

    @property
    def word(self) -> str:
        return _WORDS[self]


_WORDS = {Level.ERR: "error", Level.WARNING: "warning", Level.INFO: "info"}
