"""Reading unit files the way systemd does: the lookup directories (earlier ones
win), `NAME.d/*.conf` drop-ins (with those of the template and of dash
prefixes) in file-name order, sections, assignments and line continuations
(systemd.syntax(7), systemd.unit(5)).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

# Where systemd's system manager finds units, highest priority first (the
# subset that holds units people write or packages ship).
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/lib/systemd/system", "/usr/lib/systemd/system")


_LISTEN_KEYS = ("ListenStream", "ListenDatagram", "ListenSequentialPacket", "ListenFIFO",
                "ListenSpecial", "ListenNetlink", "ListenMessageQueue", "ListenUSBFunction")


# Settings that are lists: every assignment adds, an empty one resets.
_LIST_KEYS = {
    *_LISTEN_KEYS, "ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop", "ExecStopPost",
    "ExecReload", "Environment", "EnvironmentFile", "Requires", "Wants", "BindsTo", "Requisite",
    "PartOf", "Upholds", "After", "Before", "Conflicts", "Sockets", "Documentation",
    "WantedBy", "RequiredBy", "Also", "Alias", "Symlinks", "UnsetEnvironment",
    "SupplementaryGroups", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
    "RequiresMountsFor",
}


class UnitError(ValueError):
    """A value that cannot be read; the message says what is wrong."""


@dataclass(frozen=True)
class Assignment:
    """One `Key=value` line, with where it was written."""

    file: str
    line: int
    section: str
    key: str
    value: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def shown(self) -> str:
        text = f"{self.key}={self.value}"
        return text if len(text) <= 100 else text[:96] + "..."


@dataclass
class Unit:
    """A unit as systemd sees it: its file, then its drop-ins, in order."""

    name: str  # as systemd names it: lehu-http.socket, foo@bar.service
    path: str
    assignments: list[Assignment] = field(default_factory=list)
    dropins: list[str] = field(default_factory=list)

    @property
    def suffix(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def stem(self) -> str:
        return self.name.rpartition(".")[0]

    def effective(self) -> list[Assignment]:
        """The assignments that count: for a list, those after its last reset; for
        anything else, the last one (unless that reset it to its default)."""
        last: dict[tuple[str, str], int] = {}
        reset: dict[tuple[str, str], int] = {}
        for index, a in enumerate(self.assignments):
            group = (a.section, "Listen" if a.key in _LISTEN_KEYS else a.key)
            last[group] = index
            if a.value == "":
                reset[group] = index
        kept = []
        for index, a in enumerate(self.assignments):
            group = (a.section, "Listen" if a.key in _LISTEN_KEYS else a.key)
            if a.value == "" or index < reset.get(group, -1):
                continue
            if a.key in _LIST_KEYS or index == last[group]:
                kept.append(a)
        return kept

    def values(self, section: str, key: str) -> list[Assignment]:
        return [a for a in self.effective() if a.section == section and a.key == key]

    def value(self, section: str, key: str) -> Assignment | None:
        found = self.values(section, key)
        return found[-1] if found else None


def parse_unit_text(text: str, filename: str) -> tuple[list[Assignment], list[str]]:
    """The assignments of one unit file, and its syntax problems as FILE:LINE: lines."""
    assignments: list[Assignment] = []
    problems: list[str] = []
    section = ""
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        start = number
        line = lines[number].strip()
        number += 1
        if not line or line[0] in "#;":
            continue
        # A trailing backslash joins the next line (comment lines in between are
        # skipped), the backslash becoming a space.
        while line.endswith("\\") and number < len(lines):
            following = lines[number].strip()
            number += 1
            if following[:1] in ("#", ";"):
                continue
            line = line[:-1] + " " + following
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                problems.append(f"{filename}:{start + 1}: bad section header {line!r}")
                section = "?"
            else:
                section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            problems.append(f"{filename}:{start + 1}: expected Key=value, got {line!r}")
            continue
        if not section:
            problems.append(f"{filename}:{start + 1}: {key.strip()}= is outside any section")
            continue
        assignments.append(Assignment(filename, start + 1, section, key.strip(), value.strip()))
    return assignments, problems


@dataclass
class UnitFiles:
    """Finds units by name in an ordered list of directories, with their drop-ins."""

    dirs: Sequence[str] = UNIT_DIRS
    read: Callable[[str], str] = field(default=lambda path: _read_text(path))

    def find(self, name: str) -> str | None:
        """The file of unit `name` (or of its template), in the first directory that has it."""
        candidates = [name]
        if (template := _template(name)) != name:
            candidates.append(template)
        for candidate in candidates:
            for directory in _unique(self.dirs):
                path = os.path.join(directory, candidate)
                if os.path.isfile(path):
                    return path
        return None

    def dropins(self, name: str) -> list[str]:
        """The drop-in files of unit `name` in the order systemd applies them.

        Per file name the most specific directory (the unit's own `.d` over its
        template's over its dash prefixes') in the highest-priority unit directory
        wins; then all are sorted by file name.
        """
        chosen: dict[str, str] = {}
        for directory in reversed(_unique(self.dirs)):
            for dropin_dir in _dropin_dirs(name):
                path = os.path.join(directory, dropin_dir)
                try:
                    entries = sorted(os.listdir(path))
                except OSError:
                    continue
                for entry in entries:
                    full = os.path.join(path, entry)
                    if entry.endswith(".conf") and os.path.isfile(full):
                        chosen[entry] = full
        return [chosen[entry] for entry in sorted(chosen)]

    def load(self, name: str, path: str | None = None) -> tuple[Unit | None, list[str]]:
        """Unit `name` (from `path` if given), drop-ins applied; None and why if missing."""
        path = path or self.find(name)
        if path is None:
            where = ", ".join(_unique(self.dirs))
            return None, [f"{name}: no such unit in {where}"]
        unit = Unit(name, path)
        problems: list[str] = []
        for file in [path, *self.dropins(name)]:
            try:
                text = self.read(file)
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}")
                if file == path:
                    return None, problems
                continue
            assignments, syntax = parse_unit_text(text, file)
            unit.assignments.extend(assignments)
            problems.extend(syntax)
            if file != path:
                unit.dropins.append(file)
        return unit, problems


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def _unique(dirs: Iterable[str]) -> list[str]:
    """Directories without repeats (/lib is often /usr/lib), in order."""
    seen: set[str] = set()
    result = []
    for directory in dirs:
        real = os.path.realpath(directory)
        if real not in seen:
            seen.add(real)
            result.append(directory)
    return result


def _template(name: str) -> str:
    """foo@bar.service -> foo@.service; other names unchanged."""
    prefix, at, rest = name.partition("@")
    if not at:
        return name
    return f"{prefix}@.{rest.rpartition('.')[2]}"


def _dropin_dirs(name: str) -> list[str]:
    """Drop-in directories from the least to the most specific: the type's
    (service.d), the dash prefixes' (a-.service.d), the template's, the unit's."""
    stem, _, suffix = name.rpartition(".")
    dirs = [f"{suffix}.d"]
    base = stem.partition("@")[0]
    for index, char in enumerate(base):
        if char == "-" and index:
            dirs.append(f"{base[: index + 1]}.{suffix}.d")
    if (template := _template(name)) != name:
        dirs.append(f"{template}.d")
    dirs.append(f"{name}.d")
    return dirs
