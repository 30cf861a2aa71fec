"""The configuration: what lazyd holds and what it starts.

Every default lives in the dataclass fields below and nowhere else. `load()` and
`loads()` read a YAML config and check all of it, reporting each problem as
``FILE:LINE:COL: path.to.key: what is wrong``; `plan()` describes a loaded config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import grp
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from lazyd.config.ownership import who_else_can_change
from lazyd.core.policy import READY_STARTED, Policy, Ready, ReadyKind, Restart
from lazyd.errors import ConfigError
from lazyd.net.addresses import Address, Kind, Network, overlaps, parse_address, parse_network

# Defaults for the values that are not plain field defaults.
DEFAULT_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
DEFAULT_SOCKET_MODE = 0o666
# The account the daemon drops to when the config names no top-level user (if
# it exists; else a uid of its own, see lazyd.runtime.privileges).
DEFAULT_USER = "lazyd"


class Mode(enum.Enum):
    PASS = "pass"
    PROXY = "proxy"

    @property
    def hands_over_sockets(self) -> bool:
        """Whether the service inherits lazyd's listening sockets (pass), or binds
        its own upstream and is reached only through lazyd (proxy)."""
        return self is Mode.PASS


class Activate(enum.Enum):
    LAZY = "lazy"
    EAGER = "eager"


@dataclass(frozen=True)
class SocketConfig:
    name: str
    listen: Address
    upstream: Address | None = None
    backlog: int = DEFAULT_BACKLOG
    reuse_port: bool = False
    mode: int = DEFAULT_SOCKET_MODE  # Unix socket file mode
    owner: str | None = None  # Unix socket file owner (user name)
    group: str | None = None  # Unix socket file group (group name)
    proxy_protocol: str | None = None  # "v1" | "v2"
    allow: tuple[Network, ...] | None = None  # proxy, TCP/UDP: None admits every source
    deny: tuple[Network, ...] = ()  # proxy, TCP/UDP: refused even if allowed


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    command: tuple[str, ...]
    sockets: tuple[SocketConfig, ...]
    mode: Mode = Mode.PASS
    user: str | None = None
    group: str | None = None  # None: the user's primary group
    ready: Ready = READY_STARTED  # proxy mode: Ready(CONNECT) unless given
    environment: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    start_timeout: float = 30.0
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    restart: Restart = Restart.NO
    start_limit: int = 5
    start_limit_interval: float = 10.0
    requires: tuple[str, ...] = ()
    activate: Activate = Activate.LAZY
    # A held connection costs one fd and no task; past this many the kernel's
    # backlog (somaxconn, often 4096) holds the rest, and past that SYNs are
    # dropped and retried a second later.
    queue_limit: int = 16384
    datagram_queue_limit: int = 1024
    idle_timeout: float | None = None  # proxy mode only
    max_connections: int | None = None  # proxy: open forwarded connections at most
    flow_timeout: float = 60.0  # proxy, datagrams: a client's flow ends after this silence
    # Proxy: connections (held and forwarded) and datagram flows open at once
    # per client IP address.  256 is a few dozen busy browsers behind one NAT
    # (six connections each to a host), yet one address can no longer take
    # every fd and every flow for itself; README's key table says more.
    max_connections_per_source: int | None = 256
    # Proxy, streams: a forwarded connection with no byte either way for this
    # long is closed.  Off unless asked for: a quiet websocket or ssh session
    # is not a broken one.
    connection_idle_timeout: float | None = None
    # A service that is an existing container (instead of `command`): its
    # name, the engine that has it (None: the default, see
    # lazyd.backends.container.engine.default_address) and client TLS to a
    # tcp:// engine (ca, cert, key: PEM files).
    container: str | None = None
    engine: str | None = None
    engine_tls: tuple[str, str, str] | None = None

    @property
    def policy(self) -> Policy:
        """What the lifecycle is driven by (see lazyd.core.policy)."""
        return Policy(
            ready=self.ready, start_timeout=self.start_timeout, stop_signal=self.stop_signal,
            stop_timeout=self.stop_timeout, restart=self.restart, start_limit=self.start_limit,
            start_limit_interval=self.start_limit_interval,
        )


@dataclass(frozen=True)
class Config:
    path: str
    services: Mapping[str, ServiceConfig]
    control: str | None = None  # control socket path (from `control: unix:PATH`)
    metrics: Address | None = None
    user: str | None = None  # the unprivileged user lazyd drops to after binding
    allow_shared_user: bool = False  # may a service run as the user the daemon drops to?


# --- Loading ------------------------------------------------------------------------
#
# The YAML is composed, not loaded: composing keeps every node's position, so each
# problem can point at the line and column where it was written (and duplicate keys,
# which PyYAML's loader silently merges, can be seen). A small reader turns nodes into
# typed values and records located problems; one function per section walks the tree.
# All problems are collected, so a single `lazyd check` shows every one of them.

_MAP, _SEQ, _STR, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "null"))
_MERGE = "tag:yaml.org,2002:merge"
_MAX_INT = 2**31 - 1  # what a C int (listen()'s backlog, ...) holds

_TOP_KEYS = ("control", "metrics", "user", "allow_shared_user", "services")
_SERVICE_KEYS = (
    "command", "mode", "user", "group", "sockets", "ready", "environment", "workdir",
    "start_timeout", "stop_signal", "stop_timeout", "restart", "start_limit",
    "start_limit_interval", "requires", "activate", "queue_limit", "datagram_queue_limit",
    "idle_timeout", "max_connections", "flow_timeout", "max_connections_per_source",
    "connection_idle_timeout", "container", "engine", "engine_tls",
)
_SOCKET_KEYS = ("listen", "upstream", "backlog", "reuse_port", "mode", "owner", "group",
                "proxy_protocol", "allow", "deny")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FD_NAME = re.compile(r"[!-9;-~]{1,255}")  # printable ASCII without ':' or space
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SET_BY_LAZYD = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+) *(ms|s|m|h)?", re.ASCII)
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

T = TypeVar("T")
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
        raise ValueError(f"bad duration {_show(value)}: "
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
    raise ValueError(f"unknown signal {_show(value)}")


def _show(value: object) -> str:
    """A value as messages show it: strings quoted, others as YAML writes them."""
    if value is None or isinstance(value, bool):
        return str(value).lower().replace("none", "null")
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:76] + "..."


def _join(path: str, name: str) -> str:
    # A name that could be misread in a message (empty, spaces, quotes) is shown quoted.
    if not name or not name.isprintable() or re.search(r"[\s'\"]", name):
        name = repr(name)
    return f"{path}.{name}" if path else name


@dataclass(frozen=True)
class _Entry:
    key: Node  # problems about the entry as a whole point here
    value: Node


class _Reader:
    """Typed access to composed YAML nodes; every problem is recorded at its node."""

    def __init__(self, filename: str, loader: yaml.SafeLoader) -> None:
        self.filename = filename
        self.loader = loader
        self.problems: list[tuple[int, int, str]] = []
        self.find_programs = True  # see loads()
        self.as_root = False  # see loads(): whether root will act on what is read

    def problem(self, node: Node, path: str, message: str) -> None:
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        where = f"{path}: " if path else ""
        self.problems.append((line, col, f"{self.filename}:{line}:{col}: {where}{message}"))

    def describe(self, node: Node) -> str:
        if not isinstance(node, ScalarNode):
            return "a list" if isinstance(node, SequenceNode) else "a mapping"
        if node.tag == _NULL:
            return "nothing" if node.value == "" else "null"
        text = str(node.value)
        plain = node.tag != _STR and text.isprintable() and 0 < len(text) <= 80
        return text if plain else _show(text)

    def expected(self, node: Node, path: str, what: str) -> None:
        self.problem(node, path, f"expected {what}, got {self.describe(node)}")

    def mapping(
        self, node: Node, path: str, known: Sequence[str] | None = None, what: str = "a mapping"
    ) -> dict[str, _Entry] | None:
        """A mapping's entries by key; duplicate keys and keys not `known` are problems."""
        if not (isinstance(node, MappingNode) and node.tag == _MAP):
            self.expected(node, path, what)
            return None
        entries: dict[str, _Entry] = {}
        for key, value in node.value:
            if key.tag == _MERGE:
                self.problem(key, path, "merge keys (<<) are not supported; write the keys out")
            elif not isinstance(key, ScalarNode):
                self.expected(key, path, "a name as key")
            elif key.value in entries:
                first = entries[key.value].key.start_mark.line + 1
                self.problem(key, _join(path, key.value),
                             f"duplicate key {key.value!r} (first at line {first})")
            elif known is not None and key.value not in known:
                close = difflib.get_close_matches(key.value, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(key, path, f"unknown key {key.value!r}{hint}")
            else:
                entries[key.value] = _Entry(key, value)
        return entries

    def items(self, node: Node, path: str, what: str) -> list[Node] | None:
        if isinstance(node, SequenceNode) and node.tag == _SEQ:
            return list(node.value)
        self.expected(node, path, what)
        return None

    def convert(self, node: Node, path: str, func: Callable[[object], T], what: str) -> T | None:
        """func(the scalar's value); the ValueError it raises becomes a problem at the node."""
        if not isinstance(node, ScalarNode):
            self.expected(node, path, what)
            return None
        try:
            value = self.loader.construct_object(node, deep=True)
        except Exception:  # PyYAML's constructors let int(), dict lookups etc. raise through
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.problem(node, path, f"cannot read {self.describe(node)} as {tag}")
            return None
        try:
            return func(value)
        except ValueError as exc:
            self.problem(node, path, str(exc).replace("\n", " "))
            return None

    def text(self, node: Node, path: str, what: str) -> str | None:
        """A scalar exactly as written (`0660` stays `0660`), for arguments and variables."""
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            self.expected(node, path, what)
            return None
        if "\0" in node.value:
            self.problem(node, path, "a NUL character cannot be passed to a process")
            return None
        return str(node.value)


# Converters: a scalar's value in, a typed value out, ValueError saying what is wrong.


def _string(value: object) -> str:
    if not isinstance(value, str) or value == "":
        raise ValueError(f"expected a non-empty string, got {_show(value)}")
    return value


def _whole(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_INT:
        raise ValueError(f"expected a whole number from 1 to {_MAX_INT}, got {_show(value)}")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _word(*words: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if isinstance(value, str) and value in words:
            return value
        raise ValueError(f"expected {', '.join(words[:-1])} or {words[-1]}, got {_show(value)}")

    return convert


def _choice(kind: type[E], *words: str) -> Callable[[object], E]:
    """A converter to a member of `kind` (only those whose values are `words`, if given)."""
    word = _word(*(words or [str(member.value) for member in kind]))
    return lambda value: kind(word(value))


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError(f"expected a duration of more than 0, got {_show(value)}")
    return seconds


def _restart(value: object) -> Restart:
    # YAML 1.1 reads a bare `no` as false; a `yes` would have to guess between two policies.
    if value is True:
        raise ValueError("true is not a restart policy: write on-failure or always")
    return Restart.NO if value is False else _choice(Restart)(value)


def _user(value: object) -> str:
    name = _string(value)
    try:
        return pwd.getpwnam(name).pw_name
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise ValueError(f"unknown user {name!r}") from None


def _group(value: object) -> str:
    name = _string(value)
    try:
        return grp.getgrnam(name).gr_name
    except (KeyError, ValueError):
        raise ValueError(f"unknown group {name!r}") from None


def _workdir(value: object) -> str:
    path = _string(value)
    if not os.path.isabs(path):
        raise ValueError(f"expected an absolute path, got {path!r}")
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        raise ValueError(f"{path!r} does not exist") from None
    except PermissionError:
        # A daemon that dropped its privileges may not see into it; the
        # spawner, which does, reads the config itself before using it.
        return path
    except OSError as exc:
        raise ValueError(f"{path!r}: {exc.strerror}") from None
    if not is_dir:
        raise ValueError(f"{path!r} is not a directory")
    return path


def _address(value: object) -> Address:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected an address such as tcp://0.0.0.0:80, got {_show(value)}")
    return parse_address(value)


def _control(value: object) -> str:
    if not (isinstance(value, str) and value.startswith("unix:")):
        raise ValueError(f"expected unix:/PATH, got {_show(value)}")
    address = parse_address(value)
    if address.is_abstract or address.path is None:
        raise ValueError(f"expected unix:/PATH, got {_show(value)}")
    return address.path


def _metrics(value: object) -> Address:
    address = _address(value)
    if address.kind is not Kind.TCP:
        raise ValueError(f"expected a TCP address such as tcp://127.0.0.1:9464, got {_show(value)}")
    if address.dual_stack:
        # A bare port: the endpoint has no authentication, so it answers on
        # loopback only unless an address says otherwise.
        return Address(Kind.TCP, host="127.0.0.1", port=address.port)
    return address


def _file_mode(value: object, written: str) -> int:
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
        raise ValueError(f"bad file mode {_show(value)}: expected octal 0000 to 7777, "
                         "such as 0660")
    return mode


# Sections: one function each, in the order of the file's nesting.

_Converters = dict[str, tuple[Callable[[object], object], str]]
_Claimed = list[tuple[Address, str]]  # addresses bound so far, each with what binds it
_Requires = dict[str, tuple[Node, dict[str, Node]]]  # service -> (its list, name -> item)

_SERVICE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServiceConfig)}
_SOCKET_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SocketConfig)}
_TOP_VALUES: _Converters = {
    "control": (_control, "unix:/PATH"),
    "metrics": (_metrics, "a TCP address"),
    "user": (_user, "a user name"),
    "allow_shared_user": (_flag, "true or false"),
}
_SERVICE_VALUES: _Converters = {
    "mode": (_choice(Mode), "pass or proxy"),
    "user": (_user, "a user name"),
    "group": (_group, "a group name"),
    "workdir": (_workdir, "a directory"),
    "start_timeout": (_positive_duration, "a duration"),
    "stop_signal": (parse_signal, "a signal"),
    "stop_timeout": (_positive_duration, "a duration"),
    "restart": (_restart, "no, on-failure or always"),
    "start_limit": (_whole, "a whole number"),
    "start_limit_interval": (parse_duration, "a duration"),
    "activate": (_choice(Activate), "lazy or eager"),
    "queue_limit": (_whole, "a whole number"),
    "datagram_queue_limit": (_whole, "a whole number"),
    "idle_timeout": (_positive_duration, "a duration"),
    "max_connections": (_whole, "a whole number"),
    "flow_timeout": (_positive_duration, "a duration"),
    "max_connections_per_source": (_whole, "a whole number"),
    "connection_idle_timeout": (_positive_duration, "a duration"),
}
# Beside idle_timeout, which has its own explanation.
_PROXY_ONLY_SERVICE_KEYS = ("max_connections", "flow_timeout", "max_connections_per_source",
                            "connection_idle_timeout")
_SOCKET_VALUES: _Converters = {
    "upstream": (_address, "an address"),
    "backlog": (_whole, "a whole number"),
    "reuse_port": (_flag, "true or false"),
    "owner": (_user, "a user name"),
    "group": (_group, "a group name"),
    "proxy_protocol": (_word("v1", "v2"), "v1 or v2"),
}
_AS_ROOT = (
    "lazyd runs as root, so this service must name a user (write 'user: root' to run it as root)"
)
_IDLE_IN_PASS_MODE = (
    "idle_timeout needs mode: proxy (in pass mode lazyd cannot see traffic; the service exits "
    "by itself when idle and lazyd holds its sockets again)"
)


def _values(r: _Reader, keys: dict[str, _Entry], path: str, table: _Converters) -> dict[str, Any]:
    """Every key of `table` that is present, converted; a value with a problem is left out."""
    values = {}
    for key, (func, what) in table.items():
        if key in keys:
            value = r.convert(keys[key].value, _join(path, key), func, what)
            if value is not None:
                values[key] = value
    return values


def _config(r: _Reader, root: Node, as_root: bool) -> Config | None:
    keys = r.mapping(root, "", _TOP_KEYS, what="a mapping with a services: key")
    if keys is None:
        return None
    args = _values(r, keys, "", _TOP_VALUES)
    # The daemon's own sockets must not collide with a service's either.
    claimed: _Claimed = [(args["metrics"], "metrics")] if "metrics" in args else []
    if "control" in args:
        claimed.append((Address(Kind.UNIX, path=args["control"]), "control"))
        if as_root:
            _check_socket_directory(r, args["control"], keys["control"].value, "control")
    if "services" not in keys:
        r.problem(root, "", "missing required key 'services'")
        return None
    node = keys["services"].value
    entries = r.mapping(node, "services", what="a mapping of service names to services")
    if entries is None:
        return None
    if not entries:
        r.problem(node, "services", "no services: define at least one")
    services: dict[str, ServiceConfig] = {}
    requires: _Requires = {}
    for name, entry in entries.items():
        if not _SERVICE_NAME.fullmatch(name):
            r.problem(entry.key, "services", f"bad service name {name!r}: use letters, digits, "
                      "'-', '_' and '.', starting with a letter or digit")
        if service := _service(r, name, entry, as_root, claimed, requires):
            services[name] = service
    if as_root and not args.get("allow_shared_user", False):
        _check_shared_user(r, args.get("user"), entries, services)
    _check_requires(r, entries.keys(), requires)
    return Config(path=r.filename, services=services, **args)


def _service(
    r: _Reader, name: str, entry: _Entry, as_root: bool, claimed: _Claimed, requires: _Requires
) -> ServiceConfig | None:
    path = _join("services", name)
    keys = r.mapping(entry.value, path, _SERVICE_KEYS)
    if keys is None:
        return None
    for key in ("sockets",) if "container" in keys else ("command", "sockets"):
        if key not in keys:
            r.problem(entry.key, path, f"missing required key {key!r}")
    args = _values(r, keys, path, _SERVICE_VALUES)
    # With an unreadable mode, `mode` is None and the checks that depend on it stay quiet.
    mode = None if "mode" in keys else _SERVICE_DEFAULTS["mode"]
    mode = args.get("mode", mode)
    if "container" in keys:
        # A container is reached through lazyd's proxy only: proxy is its default.
        if "mode" not in keys:
            mode = args["mode"] = Mode.PROXY
        args.update(_container(r, keys, path, mode))
    if mode is Mode.PASS and "idle_timeout" in keys:
        r.problem(keys["idle_timeout"].value, _join(path, "idle_timeout"), _IDLE_IN_PASS_MODE)
    for key in _PROXY_ONLY_SERVICE_KEYS:
        if mode is Mode.PASS and key in keys:
            r.problem(keys[key].value, _join(path, key), f"{key} only applies to mode: proxy")
    if as_root and "user" not in keys and "container" not in keys:
        r.problem(entry.key, path, _AS_ROOT)
    if "user" in args and "group" not in keys:
        with contextlib.suppress(KeyError):  # a gid without a name: the launcher uses the gid
            args["group"] = grp.getgrgid(pwd.getpwnam(args["user"]).pw_gid).gr_name
    if "ready" in keys:
        args["ready"] = _ready(r, keys["ready"].value, _join(path, "ready"), mode, keys)
    elif mode is Mode.PROXY:
        args["ready"] = Ready(ReadyKind.CONNECT)
    if "environment" in keys:
        args["environment"] = _environment(r, keys["environment"].value, path)
    if "requires" in keys:
        args["requires"] = _requires(r, name, keys["requires"].value, path, requires)
    command = sockets = None
    if "command" in keys:
        # The PATH the service is started with: its environment's, else lazyd's own.
        search = (args.get("environment") or {}).get("PATH")
        search = os.environ.get("PATH", os.defpath) if search is None else search
        command = _command(r, keys["command"].value, _join(path, "command"), search,
                           args.get("workdir"))
    if "sockets" in keys:
        sockets = _sockets(r, keys["sockets"].value, _join(path, "sockets"), mode, claimed)
    if "container" in keys:
        command = ()
    if command is None or sockets is None or None in args.values():
        return None  # its problems are recorded
    return ServiceConfig(name=name, command=command, sockets=sockets, **args)


def _ready(
    r: _Reader, node: Node, path: str, mode: Mode | None, path_keys: Collection[str] = ()
) -> Ready | None:
    if isinstance(node, MappingNode):
        keys = r.mapping(node, path, ("delay",))
        if keys is None:
            return None
        if "delay" not in keys:
            r.problem(node, path, "missing required key 'delay'")
            return None
        delay = r.convert(keys["delay"].value, _join(path, "delay"), parse_duration, "a duration")
        return None if delay is None else Ready(ReadyKind.DELAY, delay)
    kinds = _choice(ReadyKind, "started", "notify", "connect", "health")
    kind = r.convert(node, path, kinds, "started, notify, connect, health or {delay: DURATION}")
    if kind is ReadyKind.HEALTH and "container" not in path_keys:
        r.problem(node, path, "ready: health only applies to a container (its own healthcheck)")
        return None
    if kind is ReadyKind.CONNECT and mode is Mode.PASS:
        r.problem(node, path, "ready: connect only applies to mode: proxy")
        return None
    return None if kind is None else Ready(kind)


# Keys of a process that mean nothing for a container, and why.
_NOT_FOR_CONTAINERS = {
    "command": "command and container are exclusive: a service is one or the other",
    "user": "the container runs as its image and the engine say",
    "group": "the container runs as its image and the engine say",
    "workdir": "the container's working directory is its own",
    "environment": "a container's environment is set when it is created",
    "stop_signal": "the engine stops a container with its own stop signal (podman/docker create "
                   "--stop-signal)",
}


def _container(r: _Reader, keys: dict[str, _Entry], path: str, mode: Mode | None) -> dict[str, Any]:
    """The container keys of a service that has `container:` (each problem recorded;
    a value with one is None): container, engine, engine_tls."""
    args: dict[str, Any] = {}
    name_path = _join(path, "container")
    args["container"] = r.convert(keys["container"].value, name_path, _container_name,
                                  "a container name")
    for key, why in _NOT_FOR_CONTAINERS.items():
        if key in keys:
            r.problem(keys[key].value, _join(path, key), f"{key} does not apply to a container: "
                      f"{why}")
    if mode is Mode.PASS:
        r.problem(keys["mode"].value, _join(path, "mode"), "a container service is mode: proxy: "
                  "the engine's API cannot hand a container lazyd's listening sockets")
    if "ready" in keys and isinstance(keys["ready"].value, ScalarNode) \
            and keys["ready"].value.value == "notify":
        r.problem(keys["ready"].value, _join(path, "ready"), "ready: notify does not apply to a "
                  "container (use connect, health, started or {delay: DURATION})")
    if "engine" in keys:
        args["engine"] = r.convert(keys["engine"].value, _join(path, "engine"), _engine,
                                   "unix:/PATH or tcp://HOST:PORT")
    if "engine_tls" in keys:
        tls_path = _join(path, "engine_tls")
        tls = r.mapping(keys["engine_tls"].value, tls_path, ("ca", "cert", "key"))
        files = {}
        for key in ("ca", "cert", "key"):
            if tls is not None and key not in tls:
                r.problem(keys["engine_tls"].value, tls_path, f"missing required key {key!r}")
            elif tls is not None:
                files[key] = r.convert(tls[key].value, _join(tls_path, key), _tls_file,
                                       "an absolute path to a PEM file")
        args["engine_tls"] = (files["ca"], files["cert"], files["key"]) \
            if len(files) == 3 and None not in files.values() else None
        engine = args.get("engine")
        if engine is not None and not engine.startswith("tcp://"):
            r.problem(keys["engine_tls"].value, tls_path, "engine_tls applies to a tcp:// engine")
    return args


def _container_name(value: object) -> str:
    # Docker's own rule for container names (as lazyd.backends.container.engine checks).
    name = _string(value)
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name):
        raise ValueError(f"bad container name {name!r}: letters, digits, '_', '.' and '-', "
                         "starting with a letter or digit")
    return name


def _engine(value: object) -> str:
    # A host name is fine (TLS checks the engine's certificate against it), so
    # not net.addresses, which binds and takes IP addresses only.
    text = _string(value)
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    tcp = text.startswith("tcp://") and host and port.isdigit() and 0 < int(port) < 65536
    if not tcp and not (text.startswith("unix:/") and "\0" not in text):
        raise ValueError(f"bad engine {text!r}: expected unix:/PATH or tcp://HOST:PORT")
    return text


def _tls_file(value: object) -> str:
    path = _string(value)
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return path


def _environment(r: _Reader, node: Node, service: str) -> dict[str, str] | None:
    path = _join(service, "environment")
    entries = r.mapping(node, path, what="a mapping of variable names to values")
    if entries is None:
        return None
    environment: dict[str, str] = {}
    for name, entry in entries.items():
        if not _ENV_NAME.fullmatch(name):
            r.problem(entry.key, path, f"bad variable name {name!r}: use letters, digits and "
                      "'_', not starting with a digit")
        elif name in _SET_BY_LAZYD:
            r.problem(entry.key, path, f"{name} is set by lazyd itself; remove it")
        if (value := r.text(entry.value, _join(path, name), "a string or number")) is not None:
            environment[name] = value
    return environment if len(environment) == len(entries) else None


def _requires(r: _Reader, name: str, node: Node, service: str, all_: _Requires) -> tuple[str, ...]:
    path = _join(service, "requires")
    names: dict[str, Node] = {}
    for item in r.items(node, path, "a list of service names") or ():
        dep = r.convert(item, path, _string, "a service name")
        if dep in names:
            r.problem(item, path, f"{dep!r} is listed twice")
        elif dep is not None:
            names[dep] = item
    all_[name] = (node, names)
    return tuple(names)


def _command(
    r: _Reader, node: Node, path: str, search: str, workdir: str | None
) -> tuple[str, ...] | None:
    if isinstance(node, SequenceNode):
        items = r.items(node, path, "a list of strings") or []
        words = [word for item in items if (word := r.text(item, path, "a string")) is not None]
        if len(words) < len(items):
            return None
    elif (line := r.text(node, path, "a list of strings or a command line")) is None:
        return None
    else:
        try:
            words = shlex.split(line)
        except ValueError as exc:  # an unclosed quote
            r.problem(node, path, f"cannot split the command line: {exc}")
            return None
    if r.find_programs and (problem := _find_program(words, search, workdir)):
        r.problem(node, path, problem)
        return None
    return tuple(words)


def _find_program(words: list[str], search: str, workdir: str | None) -> str | None:
    """What keeps the command's program from being executed, or None if nothing does."""
    if not words:
        return "the command is empty"
    program = words[0]
    try:
        if "/" not in program:
            found = shutil.which(program, path=search) is not None
        else:
            # A relative path is relative to workdir, where the service is started.
            full = os.path.join(workdir or os.getcwd(), program)
            if os.path.exists(full) and not (os.path.isfile(full) and os.access(full, os.X_OK)):
                return f"command is not an executable file: {program!r}"
            found = os.path.exists(full)
    except ValueError:  # a name the OS cannot look up at all (a NUL, a lone surrogate)
        found = False
    return None if found else f"command not found: {program!r}"


def _sockets(
    r: _Reader, node: Node, path: str, mode: Mode | None, claimed: _Claimed
) -> tuple[SocketConfig, ...] | None:
    entries = r.mapping(node, path, what="a mapping of socket names to addresses")
    if not entries:
        if entries is not None:
            r.problem(node, path, "no sockets: a service needs at least one")
        return None
    sockets = []
    for name, entry in entries.items():
        if not _FD_NAME.fullmatch(name):
            r.problem(entry.key, path, f"bad socket name {name!r}: it becomes the fd name, so "
                      "1 to 255 printable ASCII characters without ':' or spaces")
        if socket := _socket(r, name, entry, _join(path, name), mode, claimed):
            sockets.append(socket)
    return tuple(sockets) if len(sockets) == len(entries) else None


def _socket(
    r: _Reader, name: str, entry: _Entry, path: str, mode: Mode | None, claimed: _Claimed
) -> SocketConfig | None:
    listen = None
    keys: dict[str, _Entry] | None
    if not isinstance(entry.value, MappingNode):
        keys = {"listen": entry}  # the short form: just the address
        listen = r.convert(entry.value, path, _address, "an address or a mapping with listen:")
    else:
        keys = r.mapping(entry.value, path, _SOCKET_KEYS)
        if keys is None:
            return None
        if "listen" not in keys:
            r.problem(entry.key, path, "missing required key 'listen'")
        else:
            listen = r.convert(keys["listen"].value, _join(path, "listen"), _address, "an address")
    args = _values(r, keys, path, _SOCKET_VALUES)
    if "mode" in keys:
        written = str(keys["mode"].value.value)
        convert = functools.partial(_file_mode, written=written)
        args["mode"] = r.convert(keys["mode"].value, _join(path, "mode"), convert, "a file mode")
    if listen is not None:
        _claim(r, listen, keys["listen"].value, path, claimed)
        if r.as_root and listen.is_unix and not listen.is_abstract:
            assert listen.path is not None
            _check_socket_directory(r, listen.path, keys["listen"].value, path)
        for key in ("mode", "owner", "group"):
            if key in keys and not (listen.is_unix and not listen.is_abstract):
                r.problem(keys[key].value, _join(path, key), f"{key} only applies to a Unix "
                          "socket with a path (unix:/PATH or unix-dgram:/PATH)")
    for key in ("upstream", "proxy_protocol"):
        if key in keys and mode is Mode.PASS:
            r.problem(keys[key].value, _join(path, key), f"{key} only applies to mode: proxy")
    if mode is Mode.PROXY and listen is not None:
        upstream = args.get("upstream")
        if "upstream" not in keys:
            r.problem(entry.key, path, "mode: proxy needs an upstream address for each socket")
        elif upstream is not None and upstream.is_stream != listen.is_stream:
            r.problem(keys["upstream"].value, _join(path, "upstream"),
                      "upstream and listen must both be stream or both be datagram addresses")
        if "proxy_protocol" in keys and not listen.is_stream:
            r.problem(keys["proxy_protocol"].value, _join(path, "proxy_protocol"),
                      "proxy_protocol only applies to stream sockets")
    for key in ("allow", "deny"):
        if key in keys:
            args[key] = _access_list(r, key, keys[key].value, _join(path, key), mode, listen)
    if listen is None or None in args.values():
        return None
    return SocketConfig(name, listen, **args)


def _access_list(
    r: _Reader, key: str, node: Node, path: str, mode: Mode | None, listen: Address | None
) -> tuple[Network, ...] | None:
    """A socket's `allow` or `deny`: a list of networks (or just one)."""
    if mode is Mode.PASS:
        r.problem(node, path, f"{key} only applies to mode: proxy (in pass mode the service "
                  "accepts its connections itself, so lazyd never sees who connects)")
    elif listen is not None and listen.is_unix:
        r.problem(node, path, f"{key} only applies to TCP and UDP sockets (a Unix socket's "
                  "clients have no IP address; use mode, owner and group)")
    items = [node] if isinstance(node, ScalarNode) and node.tag != _NULL else r.items(
        node, path, "a list of networks such as [10.0.0.0/8, ::1]")
    if items is None:
        return None
    networks = []
    for item in items:
        # The text as written: YAML 1.1 would read some IPv6 addresses as numbers.
        if (text := r.text(item, path, "an IP address or network")) is not None:
            try:
                networks.append(parse_network(text.strip()))
            except ValueError as exc:
                r.problem(item, path, str(exc))
    if len(networks) < len(items):
        return None
    if key == "allow" and not networks:
        r.problem(node, path, "an empty allow list would refuse every client; "
                  "list who may connect, or leave allow out")
        return None
    return tuple(networks)


def _check_socket_directory(r: _Reader, socket_path: str, node: Node, path: str) -> None:
    """As root, a socket file goes only where no one else can swap it (`lazyd.config.ownership`)."""
    if problem := who_else_can_change(socket_path, directories_only=True):
        r.problem(node, path, f"{problem}: lazyd, as root, creates socket files only in "
                  "directories that only root can change (or root's sticky ones, such as /tmp), "
                  "as anyone who can rename files there can swap the socket file for a symlink")


def _check_shared_user(
    r: _Reader, top_user: str | None, entries: Mapping[str, _Entry],
    services: Mapping[str, ServiceConfig],
) -> None:
    """No service may run as the user the daemon drops to, unless allow_shared_user says so.

    A process of the daemon's own uid can signal it, lower its limits with
    prlimit(2) and pass the control socket's peer check. A daemon with a uid
    of its own (no user:, no lazyd account) shares it with no service.
    """
    name = top_user if top_user is not None else DEFAULT_USER
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return  # no such account: the daemon runs as a uid of its own
    if uid == 0:
        return  # user: root: the daemon keeps root, and said so
    which = "the top-level user:" if top_user is not None else (
        f"the {DEFAULT_USER} account, which it becomes when the config names no user:")
    for service in services.values():
        if service.user is None or pwd.getpwnam(service.user).pw_uid != uid:
            continue
        entry = entries[service.name]
        node = next((value for key, value in entry.value.value
                     if isinstance(key, ScalarNode) and key.value == "user"), entry.key)
        r.problem(node, _join(_join("services", service.name), "user"),
                  f"{service.user} is the user lazyd itself runs as ({which}); a service "
                  "running as it could signal lazyd, lower its limits and use its control "
                  "socket: give the service an account of its own, or write "
                  "allow_shared_user: true at the top level to accept that")


def _claim(r: _Reader, address: Address, node: Node, path: str, claimed: _Claimed) -> None:
    for other, owner in claimed:
        if overlaps(address, other):
            r.problem(node, path, f"address {address} is already used by {owner}")
            return
    claimed.append((address, path))


def _check_requires(r: _Reader, names: Collection[str], requires: _Requires) -> None:
    graph: dict[str, list[str]] = {}
    for name, (_, deps) in requires.items():
        path = _join(_join("services", name), "requires")
        graph[name] = []
        for dep, node in deps.items():
            if dep == name:
                r.problem(node, path, "a service cannot require itself")
            elif dep not in names:
                close = difflib.get_close_matches(dep, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                r.problem(node, path, f"unknown service {dep!r}{hint}")
            else:
                graph[name].append(dep)
    for cycle in _cycles(graph):
        path = _join(_join("services", cycle[0]), "requires")
        r.problem(requires[cycle[0]][0], path, "dependency cycle: " + " -> ".join(cycle))


def _cycles(graph: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Each cycle a depth-first walk meets, as [a, b, ..., a]; iterative, so no depth limit."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    for root in graph:
        stack, pending = [root], [iter(graph[root])]
        while stack:
            dep = next(pending[-1], None)
            if dep is None:
                done.add(stack.pop())
                pending.pop()
            elif dep in stack:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in done:
                stack.append(dep)
                pending.append(iter(graph.get(dep, ())))
    return cycles


# --- Entry points -------------------------------------------------------------------


def load(path: str, *, as_root: bool | None = None, find_programs: bool = True) -> Config:
    """Read and check the config file at `path`; raise ConfigError listing every problem."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        line, col = data.count(b"\n", 0, exc.start) + 1, exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError([f"{path}:{line}:{col}: not UTF-8 text"]) from None
    return loads(text, path, as_root=as_root, find_programs=find_programs)


def loads(
    text: str, filename: str = "<config>", *, as_root: bool | None = None,
    find_programs: bool = True,
) -> Config:
    """Check config text; `as_root=None` means whether lazyd runs as root right now.

    `find_programs=False` skips checking that each command's program exists:
    a daemon that dropped its privileges may not see it, and its spawner,
    which still can, checks the config itself on a reload.

    Raise ConfigError whose every line reads ``FILE:LINE:COL: path.to.key: what is wrong``.
    """
    if as_root is None:
        as_root = os.geteuid() == 0
    try:
        loader = yaml.SafeLoader(text)  # a str is checked for bad characters right here
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError([_syntax_error(filename, text, exc)]) from None
    if root is None:
        raise ConfigError([f"{filename}:1:1: the config is empty; it needs at least services:"])
    reader = _Reader(filename, loader)
    reader.find_programs = find_programs
    reader.as_root = as_root
    config = _config(reader, root, as_root)
    if reader.problems or config is None:
        # In file order; problems at one position keep the order they were found in.
        ordered = sorted(reader.problems, key=lambda problem: problem[:2])
        raise ConfigError([text for *_, text in ordered])
    return config


def _syntax_error(filename: str, text: str, exc: BaseException) -> str:
    line, col, problem = 1, 1, "the document is nested too deeply"  # a RecursionError
    if isinstance(exc, yaml.MarkedYAMLError):
        if mark := exc.problem_mark or exc.context_mark:
            line, col = mark.line + 1, mark.column + 1
        problem = exc.problem or exc.context or "cannot parse"
        if exc.context and exc.problem and not exc.context.startswith("while"):
            problem = f"{exc.context}, {exc.problem}"  # "expected a single document ..., but"
    elif isinstance(exc, ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - text.rfind("\n", 0, exc.position)
        problem = f"character #x{exc.character:04x} is not allowed"
    elif isinstance(exc, yaml.YAMLError):
        problem = str(exc)
    return f"{filename}:{line}:{col}: YAML syntax error: " + problem.replace("\n", " ")


def plan(config: Config) -> str:
    """What `lazyd check` prints: every service, its sockets in fd order and its command."""
    count = len(config.services)
    lines = [f"{config.path}: {count} service{'' if count == 1 else 's'}, config OK"]
    for service in config.services.values():
        user = service.user or "(lazyd's own)"
        group = service.group or ("(the user's)" if service.user else "(lazyd's own)")
        lines.append(f"{service.name}: {service.mode.value} mode, user {user}, group {group}, "
                     f"ready {service.ready}, activate {service.activate.value}")
        width = max(len(socket.name) for socket in service.sockets)
        fd_width = len(str(2 + len(service.sockets)))
        for fd, socket in enumerate(service.sockets, start=3):
            # In proxy mode lazyd keeps the sockets itself: the service gets no fds.
            label = f"fd {fd:<{fd_width}}  " if service.mode is Mode.PASS else ""
            where = str(socket.listen) + (f" -> {socket.upstream}" if socket.upstream else "")
            notes = [  # the settings that differ from their defaults
                f"mode {value:04o}" if key == "mode" else key if value is True else f"{key} {value}"
                for key in ("backlog", "reuse_port", "mode", "owner", "group", "proxy_protocol")
                if (value := getattr(socket, key)) != _SOCKET_DEFAULTS[key]
            ]
            notes += [f"{key} {', '.join(map(str, networks))}" for key in ("allow", "deny")
                      if (networks := getattr(socket, key))]
            notes_text = f"  ({', '.join(notes)})" if notes else ""
            lines.append(f"  {label}{socket.name:<{width}}  {where}{notes_text}")
        if service.container is not None:
            engine = service.engine or "the default engine"
            lines.append(f"  container: {service.container} on {engine}")
        else:
            lines.append(f"  command: {shlex.join(service.command)}")
        if service.requires:
            lines.append(f"  requires: {', '.join(service.requires)}")
        limits = [f"{key} {value}" for key in ("max_connections", "max_connections_per_source",
                                               "connection_idle_timeout")
                  if (value := getattr(service, key)) is not None and service.mode is Mode.PROXY]
        if limits:
            lines.append(f"  limits: {', '.join(limits)}")
        if service.workdir:
            lines.append(f"  workdir: {service.workdir}")
        if service.environment:
            # Names only: values are often secrets, and this output ends up in logs.
            lines.append(f"  environment: {', '.join(service.environment)}")
    return "\n".join(lines)
