"""`lazyd import`: systemd .socket and .service units turned into a lazyd config.

The units are read the way systemd reads them (systemd.syntax(7), systemd.unit(5)):
a name is looked up in the unit directories, earlier directories winning; its
`NAME.d/*.conf` drop-ins (and those of its template and dash prefixes) are
applied after it in file-name order; an empty assignment resets a list. Socket
units are grouped under the service they activate (`Service=`, else the unit of
the same name), each unit's sockets in the order it lists them, named by
`FileDescriptorName=` (default: the socket unit's name), so the service sees
the `LISTEN_FDS`/`LISTEN_FDNAMES` it saw under systemd.

Everything that has no lazyd equivalent becomes a `# not converted: Key=value
(why)` comment where it would have gone, and a `FILE:LINE:` line in `problems`.
Nothing here writes anything: `convert()` returns the config text and the
problems, and the command line prints them.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from lazyd.net.addresses import parse_address

# Where systemd's system manager finds units, highest priority first (the
# subset that holds units people write or packages ship).
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/lib/systemd/system", "/usr/lib/systemd/system")
# systemd's compiled-in search path for a command given without a slash.
_EXEC_SEARCH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

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
_DEPENDENCY_KEYS = ("Requires", "Wants", "BindsTo")

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

_BOOL_TRUE = ("1", "yes", "y", "true", "t", "on")
_BOOL_FALSE = ("0", "no", "n", "false", "f", "off")
_TIME_UNITS = {
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", '"': '"', "'": "'", "s": " "}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FD_NAME = re.compile(r"[!-9;-~]{1,255}")
_SET_BY_LAZYD = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


class UnitError(ValueError):
    """A value that cannot be read; the message says what is wrong."""


# --- Reading units ------------------------------------------------------------------


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


# --- Values ---------------------------------------------------------------------------


def split_words(text: str) -> list[str]:
    """Split a value into items the way systemd.syntax(7) "Quoting" says: whitespace
    separates, '...' and "..." quote, C-style escapes are understood."""
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t\n":
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quote = ""
        while i < n:
            char = text[i]
            if char == "\\":
                decoded, i = _escape(text, i)
                word.append(decoded)
                continue
            if quote:
                if char == quote:
                    quote = ""
                else:
                    word.append(char)
            elif char in "'\"":
                quote = char
            elif char in " \t\n":
                break
            else:
                word.append(char)
            i += 1
        if quote:
            raise UnitError(f"unclosed quote {quote} in {text!r}")
        words.append("".join(word))


def _escape(text: str, i: int) -> tuple[str, int]:
    """The character that the escape at text[i] (a backslash) stands for, and where
    the text goes on."""
    if i + 1 >= len(text):
        raise UnitError(f"a backslash ends {text!r}")
    char = text[i + 1]
    if char in _ESCAPES:
        return _ESCAPES[char], i + 2
    for lead, digits, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if char == lead:
            code = text[i + 2 : i + 2 + digits]
            if len(code) == digits and all(c in "0123456789abcdefABCDEF" for c in code):
                return chr(int(code, base)), i + 2 + digits
            raise UnitError(f"bad escape \\{char}{code} in {text!r}")
    code = text[i + 1 : i + 4]
    if len(code) == 3 and all(c in "01234567" for c in code) and int(code, 8) < 256:
        return chr(int(code, 8)), i + 4
    if char == ";":
        return "\\;", i + 2  # systemd's escaped command separator: a literal ';' later
    raise UnitError(f"unknown escape \\{char} in {text!r} (write \\\\ for a backslash)")


def parse_bool(text: str) -> bool:
    if text.lower() in _BOOL_TRUE:
        return True
    if text.lower() in _BOOL_FALSE:
        return False
    raise UnitError(f"expected yes or no, got {text!r}")


def parse_timespan(text: str) -> float | None:
    """Seconds from a systemd time span (`90`, `1min 30s`, `500ms`); None for infinity."""
    if text.strip() == "infinity":
        return None
    total = 0.0
    parts = re.findall(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-zµ]*)", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
        raise UnitError(f"bad time span {text!r}: expected such as 90s, 1min 30s, 500ms")
    for number, unit in parts:
        if unit not in _TIME_UNITS and unit != "":
            raise UnitError(f"bad time span {text!r}: unknown unit {unit!r}")
        total += float(number) * _TIME_UNITS.get(unit, 1.0)
    return total


def format_duration(seconds: float) -> str:
    """A lazyd duration: 250ms, 90s."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _unescape_name(text: str) -> str:
    """systemd's unit name unescaping (%I, %P, %f): '-' is '/', \\xNN a byte."""
    text = text.replace("-", "/")
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), text)


def expand_specifiers(text: str, unit: Unit) -> str:
    """Expand the %-specifiers that mean the same on every machine (systemd.unit(5)).

    The system manager's own user is root, so %u, %h and their kin are root's.
    Specifiers that depend on the machine or the boot (%H, %m, %b, ...) raise
    UnitError: the config would be right on this machine only.
    """
    prefix, at, instance = unit.stem.partition("@")
    last = prefix.rpartition("-")[2]
    table = {
        "n": unit.name, "N": unit.stem, "p": prefix, "P": _unescape_name(prefix),
        "i": instance, "I": _unescape_name(instance), "j": last, "J": _unescape_name(last),
        "f": "/" + _unescape_name(instance if at else prefix).lstrip("/"),
        "t": "/run", "S": "/var/lib", "C": "/var/cache", "L": "/var/log", "E": "/etc",
        "T": "/tmp", "V": "/var/tmp", "u": "root", "U": "0", "g": "root", "G": "0",
        "h": "/root", "s": "/bin/sh", "y": unit.path, "Y": os.path.dirname(unit.path), "%": "%",
    }

    def replace(match: re.Match[str]) -> str:
        letter = match[1]
        if letter in table:
            return table[letter]
        if letter == "":
            raise UnitError(f"a lone % ends {text!r} (write %% for a percent sign)")
        raise UnitError(f"specifier %{letter} depends on the machine or boot it runs on, or "
                        "is unknown")

    return re.sub(r"%(.?)", replace, text)


def parse_environment(text: str) -> list[tuple[str, str]]:
    """`Environment=` items: quoted KEY=VALUE words."""
    pairs = []
    for word in split_words(text):
        name, sep, value = word.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise UnitError(f"expected NAME=VALUE, got {word!r}")
        pairs.append((name, value))
    return pairs


def parse_environment_file(text: str, filename: str) -> list[tuple[str, str]]:
    """An `EnvironmentFile=`: KEY=VALUE lines, # comments, shell-like quotes."""
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _ENV_NAME.fullmatch(name):
            raise UnitError(f"{filename}:{number}: expected NAME=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = re.sub(r'\\(["\\$`])', r"\1", value)
        pairs.append((name, value))
    return pairs


def substitute_variables(words: list[str], env: dict[str, str]) -> tuple[list[str], list[str]]:
    """systemd's `$FOO` (a word of its own: split at whitespace) and `${FOO}` (exactly
    one argument) in a command line, `$$` a dollar; also the names that were unset."""
    unset: list[str] = []

    def lookup(name: str) -> str:
        if name not in env:
            unset.append(name)
        return env.get(name, "")

    result: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            result.extend(split_words(lookup(whole[1])))
            continue
        result.append(re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                             lambda m: "$" if m[0] == "$$" else lookup(m[1]), word))
    return result, unset


def convert_listen(key: str, value: str, ipv6_only: bool | None) -> tuple[str, str | None]:
    """A lazyd address for a systemd Listen*= value, and a remark about any
    difference (None when it is the same socket).

    `ipv6_only` is BindIPv6Only=: True for ipv6-only, False for both, None for
    default (the system's net.ipv6.bindv6only, which is 0 unless changed).
    """
    if key not in ("ListenStream", "ListenDatagram", "ListenSequentialPacket"):
        raise UnitError(f"lazyd holds only stream and datagram sockets, not {key}=")
    if key == "ListenSequentialPacket":
        raise UnitError("lazyd has no SOCK_SEQPACKET sockets")
    stream = key == "ListenStream"
    if value.startswith("/"):
        return ("unix:" if stream else "unix-dgram:") + value, None
    if value.startswith("@"):
        return ("unix:" if stream else "unix-dgram:") + value, None
    if value.startswith("vsock:"):
        raise UnitError("lazyd has no AF_VSOCK sockets")
    scheme = "tcp" if stream else "udp"
    port_only = re.fullmatch(r"\d+", value)
    if port_only or _is_ipv6_wildcard(value):
        port = value if port_only else value.rpartition(":")[2]
        # systemd binds [::]:PORT, which takes IPv4 too unless ipv6-only.
        if ipv6_only:
            return f"{scheme}://[::]:{port}", None
        if stream:
            return str(int(port)), None
        return (f"udp://0.0.0.0:{port}", f"IPv4 only: lazyd has no dual-stack UDP socket; "
                f"add udp://[::]:{port} as another socket for IPv6")
    if "%" in value.rpartition("]")[2] or "%" in value.partition("]")[0]:
        raise UnitError("lazyd binds no interface scopes (%dev)")
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
        address = f"{scheme}://[{host}]:{port}"
    else:
        address = f"{scheme}://{value}"
    parse_address(address)  # raises ValueError saying what is wrong
    return address, None


def _is_ipv6_wildcard(value: str) -> bool:
    """[::]:PORT, however the zeros are written."""
    match = re.fullmatch(r"\[([0-9a-fA-F:]+)\]:\d+", value)
    try:
        return match is not None and ipaddress.IPv6Address(match[1]).is_unspecified
    except ValueError:
        return False


# --- Converting -------------------------------------------------------------------


@dataclass
class _Remark:
    """A comment in the output; `problem` also goes to stderr (as FILE:LINE: ...)."""

    text: str
    where: str | None = None
    problem: bool = True
    near: str | None = None  # the lazyd key it is about: printed just above that key


@dataclass
class _Socket:
    name: str
    address: str
    options: dict[str, str]
    remarks: list[_Remark]  # printed above the socket line


@dataclass
class _SocketUnit:
    unit: Unit
    service: str  # the service unit it activates
    sockets: list[_Socket]
    remarks: list[_Remark]  # about the unit as a whole: printed above its first socket


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


def _convert_socket_unit(unit: Unit) -> _SocketUnit:
    remarks: list[_Remark] = []
    sockets: list[_Socket] = []
    service = f"{unit.stem}.service"
    name = unit.name
    ipv6_only: bool | None = None
    options: dict[str, str] = {}
    unix_options: dict[str, str] = {}
    handled: set[int] = set()

    def take(a: Assignment) -> None:
        handled.add(id(a))

    effective = unit.effective()
    for a in effective:
        if a.section == "Unit" and a.key in ("Description", "Documentation"):
            remarks.append(_Remark(a.shown(), problem=False))
            take(a)
        elif a.section == "Socket":
            try:
                value = expand_specifiers(a.value, unit)
                if a.key == "Service":
                    service = value
                    take(a)
                elif a.key == "FileDescriptorName":
                    if not _FD_NAME.fullmatch(value):
                        raise UnitError("1 to 255 printable ASCII characters without ':'")
                    name = value
                    take(a)
                elif a.key == "BindIPv6Only":
                    if value not in ("default", "both", "ipv6-only"):
                        raise UnitError("expected default, both or ipv6-only")
                    ipv6_only = {"default": None, "both": False, "ipv6-only": True}[value]
                    take(a)
                elif a.key == "Backlog":
                    backlog = int(value)
                    if backlog > 2**31 - 1:  # systemd's default: let somaxconn decide
                        take(a)
                    elif backlog >= 1:
                        options["backlog"] = str(backlog)
                        take(a)
                elif a.key == "ReusePort":
                    if parse_bool(value):
                        options["reuse_port"] = "true"
                    take(a)
                elif a.key == "SocketMode":
                    if not re.fullmatch(r"[0-7]{1,4}", value):
                        raise UnitError("expected an octal mode such as 0660")
                    unix_options["mode"] = "0" + value.lstrip("0").rjust(3, "0")
                    take(a)
                elif a.key in ("SocketUser", "SocketGroup"):
                    unix_options["owner" if a.key == "SocketUser" else "group"] = _scalar(value)
                    take(a)
                elif a.key == "Accept":
                    if parse_bool(value):
                        remarks.append(_not_converted(a, "lazyd has no per-connection service "
                                                      "instances (inetd style); its sockets "
                                                      "are left out"))
                        return _SocketUnit(unit, service, [], remarks)
                    take(a)
            except (UnitError, ValueError) as exc:
                remarks.append(_Remark(f"not converted: {a.shown()} ({exc})", a.where))
                take(a)
    for a in effective:
        if a.section == "Socket" and a.key in _LISTEN_KEYS:
            take(a)
            try:
                address, remark = convert_listen(a.key, expand_specifiers(a.value, unit),
                                                 ipv6_only)
            except (UnitError, ValueError) as exc:
                remarks.append(_not_converted(a, str(exc)))
                continue
            is_path = address.startswith(("unix:/", "unix-dgram:/"))
            socket_options = {**options, **(unix_options if is_path else {})}
            if not (address.startswith(("tcp:", "unix:")) or address.isdigit()):
                socket_options.pop("backlog", None)  # it matters for stream sockets only
            own = [_not_converted(a, remark)] if remark else []
            sockets.append(_Socket(name, address, socket_options, own))
    if unix_options and not any(s.address.startswith(("unix:/", "unix-dgram:/"))
                                for s in sockets):
        for a in effective:
            if a.key in ("SocketMode", "SocketUser", "SocketGroup") and id(a) in handled:
                remarks.append(_not_converted(a, "applies to socket files only, and this unit "
                                              "has none"))
    for a in effective:
        if id(a) not in handled and not (a.section == "Socket" and a.key in _LISTEN_KEYS):
            remarks.append(_not_converted(a, _why(a.key)))
    if not sockets:
        remarks.append(_Remark(f"not converted: {unit.name} (no socket lazyd can hold)",
                               unit.path))
    return _SocketUnit(unit, service, sockets, remarks)


@dataclass
class _Service:
    unit: Unit
    name: str
    keys: dict[str, str]  # lazyd key -> YAML value, in output order
    remarks: list[_Remark]
    dependencies: list[tuple[str, Assignment]]  # unit names from Requires=/Wants=/BindsTo=
    socket_order: list[str]  # socket unit names in the order the unit mentions them
    usable: bool


def service_name(unit_name: str) -> str:
    """A lazyd service name for a systemd unit name (foo@bar.service -> foo-bar)."""
    stem = unit_name.removesuffix(".service")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.")
    return name or "service"


def _convert_service_unit(unit: Unit) -> _Service:
    remarks: list[_Remark] = []
    keys: dict[str, str] = {}
    handled: set[int] = set()
    effective = unit.effective()
    deps: list[tuple[str, Assignment]] = []
    socket_order: list[str] = []
    usable = True

    def take(a: Assignment) -> None:
        handled.add(id(a))

    def get(key: str) -> Assignment | None:
        return unit.value("Service", key)

    def problem(a: Assignment, exc: Exception) -> None:
        remarks.append(_not_converted(a, str(exc)))
        take(a)

    for a in effective:
        if a.section == "Unit" and a.key in ("Description", "Documentation"):
            remarks.append(_Remark(a.shown(), problem=False))
            take(a)
        elif a.section == "Unit" and a.key in (*_DEPENDENCY_KEYS, "After"):
            try:
                names = split_words(expand_specifiers(a.value, unit))
            except UnitError as exc:
                problem(a, exc)
                continue
            for dep in names:
                if dep.endswith(".socket"):
                    socket_order.append(dep)
                if a.key in _DEPENDENCY_KEYS:
                    deps.append((dep, a))
            if a.key in _DEPENDENCY_KEYS:
                take(a)  # reported later, once it is known which were imported
        elif a.section == "Service" and a.key == "Sockets":
            try:
                socket_order[:0] = split_words(expand_specifiers(a.value, unit))
                take(a)
            except UnitError as exc:
                problem(a, exc)

    # The user: User=, or root (systemd's default for a system service); +/! run as root.
    user_a, group_a = get("User"), get("Group")
    dynamic = get("DynamicUser")
    user: str | None = None
    for setting in (user_a, group_a):
        if setting is not None:
            take(setting)
    if user_a is not None:
        try:
            user = expand_specifiers(user_a.value, unit)
        except UnitError as exc:
            problem(user_a, exc)
    if dynamic is not None:
        take(dynamic)
        try:
            if parse_bool(dynamic.value):
                remarks.append(_not_converted(dynamic, "lazyd allocates no users" + (
                    "" if user else ": the service runs as nobody; better give it an account")))
                user = user or "nobody"
        except UnitError as exc:
            problem(dynamic, exc)

    # ExecStart=: one command, its prefixes, quoting and $VARIABLES.
    env, env_keys = _environment(unit, remarks, take)
    commands = unit.values("Service", "ExecStart")
    command: list[str] | None = None
    for a in commands:
        take(a)
    service_type = get("Type")
    if not commands:
        where = unit.path
        remarks.append(_Remark(f"not converted: {unit.name} (no ExecStart=: lazyd needs a "
                               "command)", where))
        usable = False
    elif len(commands) > 1:
        remarks.append(_not_converted(commands[1], "lazyd runs one command per service"))
        usable = False
    else:
        a = commands[0]
        try:
            command, as_root, notes = _command(a, unit, env, user)
        except UnitError as exc:
            problem(a, exc)
            usable = False
        else:
            remarks.extend(notes)
            if as_root:
                user = "root"
    if user is None:
        user = "root"
        remarks.append(_Remark("User= is not set: systemd runs the service as root, and so "
                               "does this config", problem=False, near="user"))
    if command is not None:
        keys["command"] = _flow(command)
    keys["user"] = _scalar(user)
    if user_a is not None and user != "root" and _lookup_user(user) is None:
        remarks.append(_Remark(f"warning: {user_a.shown()}: no such user on this machine; "
                               "lazyd check refuses the config until it exists", user_a.where,
                               near="user"))
    if group_a is not None:
        group = group_a.value
        if _lookup_group(group):
            keys["group"] = _scalar(group)
        else:
            primary = _primary_group(user)
            instead = (f"the service runs with {user}'s primary group {primary}" if primary
                       else "the service runs with its user's primary group")
            remarks.append(_not_converted(group_a, f"no group {group!r} on this machine; "
                                          f"{instead}"))
    keys.update(env_keys)

    # The rest, one setting at a time.
    for a in effective:
        if a.section != "Service" or id(a) in handled:
            continue
        try:
            value = expand_specifiers(a.value, unit)
            converted = _service_setting(a, value, unit, service_type)
        except UnitError as exc:
            problem(a, exc)
            continue
        if converted is None:
            continue
        take(a)
        if isinstance(converted, _Remark):
            remarks.append(converted)
        else:
            keys.update(converted)
    if service_type is None and commands:
        keys["ready"] = "started"
    for a in effective:
        if id(a) not in handled:
            remarks.append(_not_converted(a, _why(a.key)))
    return _Service(unit, service_name(unit.name), keys, remarks, deps, socket_order, usable)


def _service_setting(
    a: Assignment, value: str, unit: Unit, service_type: Assignment | None
) -> list[tuple[str, str]] | _Remark | None:
    """One [Service] setting as a lazyd key and value, a remark, or None (not converted)."""
    key = a.key
    if key == "Type":
        if value in ("simple", "exec"):
            return [("ready", "started")]
        if value in ("notify", "notify-reload"):  # reloading is systemd's; readiness the same
            return [("ready", "notify")]
        raise UnitError({
            "forking": "lazyd supervises the process it starts; it does not follow a fork",
            "oneshot": "a lazyd service serves its sockets; it is not a one-off job",
            "dbus": "lazyd does not watch the bus for a name",
            "idle": "lazyd has no idle queue",
        }.get(value, f"unknown type {value!r}"))
    if key == "Restart":
        if value in ("no", "always", "on-failure"):
            return [("restart", value)]
        raise UnitError(f"lazyd restarts no, on-failure or always; {value} is none of them")
    if key in ("TimeoutStartSec", "TimeoutStopSec", "TimeoutSec"):
        seconds = parse_timespan(value)
        if not seconds:  # infinity or 0, which systemd takes as "no timeout"
            raise UnitError("lazyd always has a timeout")
        names = {"TimeoutStartSec": ["start_timeout"], "TimeoutStopSec": ["stop_timeout"],
                 "TimeoutSec": ["start_timeout", "stop_timeout"]}[key]
        return [(name, format_duration(seconds)) for name in names]
    if key == "KillSignal":
        from lazyd.config import parse_signal

        try:
            return [("stop_signal", parse_signal(value).name)]
        except ValueError as exc:
            raise UnitError(str(exc)) from None
    if key == "WorkingDirectory":
        path = value.removeprefix("-")
        if path == "~":
            raise UnitError("write the home directory out")
        if not path.startswith("/"):
            raise UnitError("expected an absolute path")
        return [("workdir", _scalar(path))]
    if key == "NotifyAccess":
        if value in ("main", "exec", "all"):
            return _Remark(f"{a.shown()}: lazyd believes the main process and its "
                           "descendants", problem=False, near="ready")
        if value == "none" and not (service_type and service_type.value.startswith("notify")):
            return _Remark(f"{a.shown()}: lazyd reads notifications only with ready: notify",
                           problem=False, near="ready")
        raise UnitError("ready: notify needs the service's notifications")
    if key == "KillMode" and value == "control-group":
        return _Remark(f"{a.shown()}: lazyd kills the whole process group after the stop "
                       "signal's timeout", problem=False)
    return None


def _environment(
    unit: Unit, remarks: list[_Remark], take: Callable[[Assignment], None]
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Environment= and EnvironmentFile= (read now: files change, configs don't), the
    files winning as under systemd; the variables and the `environment` key."""
    env: dict[str, str] = {}
    from_files: dict[str, str] = {}
    for a in unit.values("Service", "Environment"):
        take(a)
        try:
            env.update(parse_environment(expand_specifiers(a.value, unit)))
        except UnitError as exc:
            remarks.append(_not_converted(a, str(exc)))
    for a in unit.values("Service", "EnvironmentFile"):
        take(a)
        try:
            path = expand_specifiers(a.value, unit)
            optional = path.startswith("-")
            path = path.removeprefix("-")
            try:
                text = _read_text(path)
            except OSError as exc:
                if optional:
                    remarks.append(_Remark(f"{a.shown()}: not there, and optional",
                                           problem=False, near="environment"))
                    continue
                raise UnitError(f"cannot read {path}: {exc.strerror}") from None
            from_files.update(parse_environment_file(text, path))
            remarks.append(_Remark(f"{a.shown()}: read now; import again after changing it",
                                   problem=False, near="environment"))
        except UnitError as exc:
            remarks.append(_not_converted(a, str(exc)))
    env.update(from_files)
    for name in _SET_BY_LAZYD:
        if name in env:
            del env[name]
            remarks.append(_Remark(f"not converted: {name} (lazyd sets it itself)",
                                   unit.path, near="environment"))
    keys = []
    if env:
        body = ", ".join(f"{name}: {json.dumps(value, ensure_ascii=False)}"
                         for name, value in env.items())
        keys.append(("environment", "{" + body + "}"))
    return env, keys


def _command(
    a: Assignment, unit: Unit, env: dict[str, str], user: str | None
) -> tuple[list[str], bool, list[_Remark]]:
    """ExecStart=: the argv, whether it runs as root (+, !), and remarks."""
    remarks: list[_Remark] = []
    text = expand_specifiers(a.value, unit)
    words = split_words(text)
    if ";" in words:
        raise UnitError("lazyd runs one command per service (';' separates commands)")
    words = [w.replace("\\;", ";") for w in words]
    if not words:
        raise UnitError("the command is empty")
    match = re.match(r"[-@:+!]*", words[0])
    prefixes = match[0] if match else ""
    words[0] = words[0][len(prefixes):]
    as_root = "+" in prefixes or ("!" in prefixes and "!!" not in prefixes)
    if "!!" in prefixes:
        pass  # only matters without ambient capabilities, which Linux has had since 4.3
    if as_root:
        remarks.append(_Remark(f"{a.key}= prefix {prefixes!r}: systemd runs it as root, and so "
                               "does this config", problem=False, near="user"))
    if "-" in prefixes:
        remarks.append(_Remark(f"not converted: the '-' of {a.shown()} (lazyd counts a failed "
                               "exit as a failure)", a.where, near="command"))
    if ":" not in prefixes:
        static = {"USER": user or "root", "LOGNAME": user or "root"}
        if (entry := _lookup_user(user or "root")) is not None:
            static.update(HOME=entry.pw_dir, SHELL=entry.pw_shell)
        words, unset = substitute_variables(words, {**static, **env})
        for name in dict.fromkeys(unset):
            remarks.append(_Remark(f"{a.key}=: ${name} is not set in the unit, so it is "
                                   "empty, as under systemd", a.where, near="command"))
    if not words or not words[0]:
        raise UnitError("the program may not come from a variable")
    if "@" in prefixes:
        if len(words) < 2:
            raise UnitError("'@' needs the program and then its argv[0]")
        remarks.append(_Remark(f"not converted: argv[0] {words[1]!r} of {a.shown()} (lazyd "
                               "passes the program's own path as argv[0])", a.where,
                               near="command"))
        del words[1]
    if "/" not in words[0]:
        found = shutil.which(words[0], path=_EXEC_SEARCH)
        if found:
            words[0] = found
    if "/" not in words[0] or not os.access(words[0], os.X_OK):
        remarks.append(_Remark(f"warning: {a.key}=: no program {words[0]!r} on this machine; "
                               "lazyd check refuses the config until it exists", a.where,
                               near="command"))
    return words, as_root, remarks


def _lookup_user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _lookup_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _primary_group(user: str) -> str | None:
    entry = _lookup_user(user)
    if entry is None:
        return None
    try:
        return grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        return None


# --- YAML output ----------------------------------------------------------------------

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


# --- The whole conversion -------------------------------------------------------------


def convert(units: Sequence[str], files: UnitFiles | None = None) -> Result:
    """Convert units (files, or names looked up in `files.dirs`) to a lazyd config.

    The socket units that activate an imported service and the service that an
    imported socket unit activates are imported too when they can be found.
    """
    problems: list[str] = []
    explicit: dict[str, str] = {}
    for given in units:
        name = os.path.basename(given)
        if "/" in given or os.path.isfile(given):  # a file, else a name to look up
            explicit[name] = given
        else:
            explicit.setdefault(name, "")
    # Related units are looked for beside the files given first.
    file_dirs = [os.path.dirname(os.path.abspath(p)) for p in explicit.values() if p]
    files = files or UnitFiles()
    files = UnitFiles(dirs=[*dict.fromkeys(file_dirs), *files.dirs], read=files.read)

    loaded: dict[str, Unit] = {}
    missing: set[str] = set()

    def load(name: str) -> Unit | None:
        if name in loaded:
            return loaded[name]
        if name in missing:
            return None
        unit, unit_problems = files.load(name, explicit.get(name) or None)
        problems.extend(unit_problems)
        if unit is None:
            missing.add(name)
            return None
        loaded[name] = unit
        return unit

    wanted = []
    for name in explicit:
        if not name.endswith((".socket", ".service")):
            problems.append(f"{explicit[name] or name}: lazyd imports .socket and .service "
                            "units only")
        elif "@." in name:
            problems.append(f"{explicit[name] or name}: a template: name an instance, such "
                            f"as {name.replace('@.', '@NAME.')}")
        else:
            wanted.append(name)
    socket_units: dict[str, _SocketUnit] = {}
    services: dict[str, _Service] = {}
    # Each unit to load, with the service whose unit led to it (None if given).
    pending: list[tuple[str, str | None]] = [(name, None) for name in wanted]
    while pending:
        name, via = pending.pop(0)
        if name in socket_units or name in services or name in missing:
            continue
        if via is not None and name not in explicit and not files.find(name):
            continue  # a socket unit a service mentions, but nobody has
        unit = load(name)
        if unit is None:
            continue
        if name.endswith(".socket"):
            socket_unit = _convert_socket_unit(unit)
            if via is not None and socket_unit.service != via:
                continue  # mentioned (After=syslog.socket), but it activates another service
            socket_units[name] = socket_unit
            if socket_unit.sockets and socket_unit.service not in services:
                pending.append((socket_unit.service, None))
        elif name.endswith(".service"):
            service = _convert_service_unit(unit)
            services[name] = service
            # Its sockets: Sockets=, the socket units it depends on, and NAME.socket.
            for candidate in [*service.socket_order, f"{unit.stem}.socket"]:
                pending.append((candidate, name))

    # Group the sockets under their services, in the order systemd passes them:
    # each unit's in its own order; across units systemd promises none, so the
    # order the service names them in (Sockets=, Requires=, ...), then as given.
    given_order = {name: index for index, name in enumerate(wanted)}
    grouped: dict[str, list[_SocketUnit]] = {}
    out_of_service: list[_SocketUnit] = []
    for socket_unit in socket_units.values():
        if socket_unit.service in services and services[socket_unit.service].usable:
            grouped.setdefault(socket_unit.service, []).append(socket_unit)
        else:
            out_of_service.append(socket_unit)
    imported = {name: service.name for name, service in services.items()
                if service.usable and any(m.sockets for m in grouped.get(name, []))}
    blocks: list[str] = []
    orphans: list[str] = []
    for unit_name, service in services.items():
        members = grouped.get(unit_name, [])
        mentioned = {n: i for i, n in enumerate(dict.fromkeys(service.socket_order))}
        members.sort(key=lambda s: (mentioned.get(s.unit.name, len(mentioned)),
                                    given_order.get(s.unit.name, len(given_order)),
                                    s.unit.name))
        if unit_name in imported:
            blocks.append(_service_block(service, members, imported, problems))
            continue
        if service.usable:
            service.remarks.append(_Remark(
                f"not converted: {unit_name} (no socket unit activates it: lazyd starts "
                "a service on traffic to its sockets)", service.unit.path))
        orphans.append(_orphan_block(service.unit, service.remarks, members, problems))
    for socket_unit in out_of_service:
        if socket_unit.sockets and socket_unit.service not in services:
            socket_unit.remarks.append(_Remark(
                f"not converted: {socket_unit.unit.name} (it activates {socket_unit.service}, "
                "which was not found: import that unit too)", socket_unit.unit.path))
        orphans.append(_orphan_block(socket_unit.unit, socket_unit.remarks, [], problems))
    if not imported:
        if not problems:
            problems.append("nothing to import")
        return Result("", problems)
    converted = [*services, *socket_units]
    order = ", ".join([*(n for n in wanted if n in converted),
                       *(n for n in converted if n not in wanted)])
    head = [f"# Imported from systemd units: {order}", "services:"]
    return Result("\n".join(head + blocks + orphans) + "\n", problems)


def _service_block(
    service: _Service, members: list[_SocketUnit], imported: dict[str, str], sink: list[str]
) -> str:
    indent = "    "
    lines = [f"  {_scalar(service.name)}:", f"{indent}# from {_files(service.unit)}"]
    for remark in service.remarks:
        if remark.near is None:
            _comment(lines, indent, remark, sink)
    for key, value in service.keys.items():
        for remark in service.remarks:
            if remark.near == key:
                _comment(lines, indent, remark, sink)
        lines.append(f"{indent}{key}: {value}")
    for remark in service.remarks:  # about a key that is not there
        if remark.near is not None and remark.near not in service.keys:
            _comment(lines, indent, remark, sink)
    requires = []
    for dep, a in service.dependencies:
        if dep.endswith(".socket") and any(m.unit.name == dep for m in members):
            continue  # its sockets are this service's
        if dep in imported and imported[dep] != service.name:
            requires.append(imported[dep])
        else:
            why = ("lazyd holds sockets itself" if dep.endswith(".socket") else
                   "not an imported lazyd service" if dep.endswith(".service") else
                   "lazyd requires only services")
            _comment(lines, indent, _Remark(f"not converted: {a.key}={dep} ({why})", a.where),
                     sink)
    if requires:
        lines.append(f"{indent}requires: [{', '.join(_scalar(r) for r in requires)}]")
    lines.append(f"{indent}sockets:")
    inner = indent + "  "
    if len(members) > 1:
        _comment(lines, inner, _Remark(
            "fd order across socket units: systemd promises none; here it follows "
            f"{service.unit.name} (a service should find its sockets by LISTEN_FDNAMES)",
            problem=False), sink)
    names: dict[str, int] = {}
    for member in members:
        _comment(lines, inner, _Remark(f"from {_files(member.unit)}", problem=False), sink)
        for remark in member.remarks:
            _comment(lines, inner, remark, sink)
        for sock in member.sockets:
            name = sock.name
            if name in names:
                names[name] += 1
                renamed = f"{name}-{names[name]}"
                _comment(lines, inner, _Remark(
                    f"not converted: fd name {name!r} for a second socket (lazyd names each "
                    f"socket once: this one is {renamed})", member.unit.path), sink)
                name = renamed
            names.setdefault(name, 1)
            for remark in sock.remarks:
                _comment(lines, inner, remark, sink)
            address = _address_scalar(sock.address)
            if sock.options:
                options = ", ".join(f"{k}: {v}" for k, v in sock.options.items())
                lines.append(f"{inner}{_scalar(name)}: {{listen: {address}, {options}}}")
            else:
                lines.append(f"{inner}{_scalar(name)}: {address}")
    return "\n".join(lines)


def _orphan_block(
    unit: Unit, remarks: list[_Remark], members: list[_SocketUnit], sink: list[str]
) -> str:
    """What could not become a service, as comments after the services."""
    lines = [f"# from {_files(unit)}"]
    for remark in remarks:
        _comment(lines, "", remark, sink)
    for member in members:
        lines.append(f"# from {_files(member.unit)}")
        for remark in member.remarks:
            _comment(lines, "", remark, sink)
        for sock in member.sockets:
            _comment(lines, "", _Remark(f"not converted: socket {sock.name} {sock.address} "
                                        f"(its service {unit.name} was not converted)",
                                        member.unit.path), sink)
    return "\n".join(lines)


def _files(unit: Unit) -> str:
    return " + ".join([unit.path, *unit.dropins])
