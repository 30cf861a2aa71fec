"""Every error lazyd reports to a user.

    LazydError                  one clear line (or several), exit status 1
    ├── ConfigError             the config is wrong; each problem says FILE:LINE:COL: key: what
    ├── BindError               a socket could not be bound; names service and socket
    ├── LaunchError             a service's command could not be executed
    └── ControlError            the control socket could not be reached or answered badly

Anything that is not a LazydError is a bug and is shown with its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class LazydError(Exception):
    """An error meant for the user: printed as its message, without a traceback."""


class ConfigError(LazydError):
    """One or more problems in a config file, each already located.

    `problems` holds lines of the form ``FILE:LINE:COL: path.to.key: what is wrong``.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class BindError(LazydError):
    """A configured socket could not be bound (or prepared) at start-up."""


class LaunchError(LazydError):
    """A service's process could not be started."""


class ControlError(LazydError):
    """The control socket could not be reached, or its answer made no sense,
    or the daemon refused the request (its reply, if any, is in `details`)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = details or {}
