"""What the converted config is made of: YAML scalars that read back as exactly
the string written, and remarks, the `# not converted: Key=value (why)`
comments that also become `FILE:LINE:` problems; `Result`, what `lazyd import`
prints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lazyd.config.units.files import Assignment

# Why a setting has no lazyd equivalent, for the ones people meet most.
_WHY = {
    "After": "lazyd has no start order: a service's sockets are held before anything starts",
    "Before": "lazyd has no start order: a service's sockets are held before anything starts",
    "Conflicts": "lazyd has no conflicts between services",
    "DefaultDependencies": "lazyd has no implicit dependencies",
    "WantedBy": "lazyd holds every configured socket from its own start",
    "RequiredBy": "lazyd holds every configured socket from its own start",
    "Also": "enabling is systemd's",
    "Alias": "lazyd services have one name",
    "PartOf": "lazyd has no such dependency",
    "KillMode": "lazyd signals the main process, then kills its whole process group",
    "ExecStartPre": "lazyd runs one command",
    "ExecStartPost": "lazyd runs one command",
    "ExecStop": "lazyd stops a service with stop_signal",
    "ExecStopPost": "lazyd runs one command",
    "ExecReload": "lazyd restarts a changed service instead",
    "RemainAfterExit": "a lazyd service that exits is idle",
    "PassCredentials": "lazyd sets no SO_PASSCRED",
    "PassSecurity": "lazyd sets no SO_PASSSEC",
    "ReceiveBuffer": "lazyd leaves the kernel's buffer size",
    "SendBuffer": "lazyd leaves the kernel's buffer size",
    "Symlinks": "lazyd makes no symlinks to sockets",
    "RemoveOnStop": "lazyd replaces a stale socket file at its next start",
    "DirectoryMode": "lazyd creates no directories",
    "FreeBind": "lazyd sets no IP_FREEBIND",
    "Timestamping": "lazyd sets no SO_TIMESTAMP",
    "StandardOutput": "a service's output goes to lazyd's stderr, prefixed with its name",
    "StandardError": "a service's output goes to lazyd's stderr, prefixed with its name",
}


_DEFAULT_WHY = "lazyd has no such setting"


@dataclass
class _Remark:
    """A comment in the output; `problem` also goes to stderr (as FILE:LINE: ...)."""

    text: str
    where: str | None = None
    problem: bool = True
    near: str | None = None  # the lazyd key it is about: printed just above that key


@dataclass
class Result:
    """What `lazyd import` prints: the config (empty when nothing usable remains)
    and the problems, each a line for stderr."""

    config: str
    problems: list[str]

    @property
    def usable(self) -> bool:
        return bool(self.config)


# Where a remark about a systemd setting goes: above the lazyd key it is closest to.
_NEAR = {"ExecStart": "command", "User": "user", "Group": "user", "DynamicUser": "user",
         "Type": "ready", "NotifyAccess": "ready", "Environment": "environment",
         "EnvironmentFile": "environment", "Restart": "restart", "KillSignal": "stop_signal",
         "TimeoutStartSec": "start_timeout", "TimeoutStopSec": "stop_timeout",
         "WorkingDirectory": "workdir"}


def _not_converted(a: Assignment, why: str) -> _Remark:
    return _Remark(f"not converted: {a.shown()} ({why})", a.where, near=_NEAR.get(a.key))


def _why(key: str) -> str:
    return _WHY.get(key, _DEFAULT_WHY)


_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")


_PLAIN_ADDRESS = re.compile(r"\d+|(tcp|udp)://\d[\d.]*:\d+|(unix|unix-dgram):/[A-Za-z0-9_./-]+")


_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "~"}


def _scalar(text: str) -> str:
    """A YAML scalar that reads back as exactly this string."""
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text, ensure_ascii=False)


def _flow(words: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(w, ensure_ascii=False) for w in words) + "]"


def _address_scalar(address: str) -> str:
    return address if _PLAIN_ADDRESS.fullmatch(address) else json.dumps(address)


def _comment(lines: list[str], indent: str, remark: _Remark, sink: list[str]) -> None:
    """Write a remark as a comment line, and a problem also to `sink` (for stderr)."""
    text = " ".join(remark.text.split())  # a comment is one line
    lines.append(f"{indent}# {text}")
    if remark.problem:
        sink.append(f"{remark.where}: {text}" if remark.where else text)
