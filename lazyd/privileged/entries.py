"""The entries of the helper's table of services: what each may be, built and checked here.

The table says, for every configured service, how the privileged helper may
start it; after the daemon has dropped its privileges it is the only thing
the helper believes.  The daemon builds entries with `process_entry`,
`broken_entry` and `socket_entry` (`lazyd.backends.process.launch`); so does
the table reader a reload runs.  The helper checks each with `parse_table`
before anything of it is used.

An entry has a ``kind``: ``process`` (a command the helper forks and execs as
the service's user; the default when the field is absent) or ``container``
(an existing container the helper starts and stops through its engine's API,
`lazyd.privileged.containers`).  Operations name the kind they act on
(``spawn``: a process; ``container``: a container), so that
another kind of service, with operations of its own, is one more kind here
and one more parser in `_PARSERS`, not a change to what a process entry may
be.

A container entry is ``{"kind", "container", "engine", "tls"}``: the
container's name (Docker's rule for names), its engine's address
(``unix:/PATH`` or ``tcp://HOST:PORT``) and ``tls`` null or ``{"ca", "cert",
"key"}``, absolute paths of PEM files.  It names the only container the
helper may act on for that service.

A process entry is ``{"kind", "executable", "argv", "env", "uid", "gid",
"groups", "workdir", "nofile_soft", "sockets", "notify"}``: ``executable``
absolute; ``env`` complete but for LISTEN_* and NOTIFY_SOCKET; ``uid``,
``gid`` and ``groups`` all three or none; they, ``workdir`` and
``nofile_soft`` may be null: "as is"; ``sockets`` the fds a spawn must pass,
in order, each ``{"name", "family", "type", "address", "listening",
"connected"}`` as `lazyd.privileged.handoff.socket_identity` describes
a socket, empty (the default) for a service that binds its own (proxy mode);
``notify`` true for a ``ready: notify`` service, false by default;
``steer`` (optional, empty by default) the sockets whose listener the
service binds itself and the daemon may have for the kernel data path: socket
name -> the upstream ``[host, port]`` that listener is bound to (see
`lazyd.privileged.listeners`).  An entry
``{"error"}`` is a service that cannot be started (its program is missing):
a spawn of it is answered with that error.

Standard library only, and not even `typing` (see `lazyd.privileged`).
"""

from __future__ import annotations

import socket

from lazyd.privileged.fields import (
    ProtocolError,
    boolean,
    only,
    optional_integer,
    text,
)
from lazyd.privileged.handoff import PROTOCOL_VARIABLES, SOCKET_IDENTITY_FIELDS

TYPE_CHECKING = False  # not from typing, which the helper would have to import
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, TypeAlias

PROCESS = "process"  # the kind of a service the helper forks and execs
CONTAINER = "container"  # the kind of a service that is a container on an engine
KINDS = (PROCESS, CONTAINER)

MAX_SERVICES = 65536  # entries in the table of services
MAX_SOCKETS = 253  # sockets one service is handed: Linux's SCM_MAX_FD
MAX_GROUPS = 65536  # NGROUPS_MAX
ID_BITS = 0xFFFFFFFE  # uid_t/gid_t: (uid_t)-1 means "unchanged" to the kernel, so refused
MAX_NOFILE = 2**63 - 1  # rlim_t

PROCESS_FIELDS = ("kind", "executable", "argv", "env", "uid", "gid", "groups", "workdir",
                  "nofile_soft", "sockets", "notify", "steer")
SOCKET_FIELDS = ("name", *SOCKET_IDENTITY_FIELDS)
ERROR = "error"  # the one field of a broken entry
CONTAINER_FIELDS = ("kind", "container", "engine", "tls")
TLS_FIELDS = ("ca", "cert", "key")


# -- building (the daemon and the table reader) ------------------------------------------


def process_entry(
    *,
    executable: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    uid: int | None,
    gid: int | None,
    groups: Sequence[int] | None,
    workdir: str | None,
    nofile_soft: int | None,
    sockets: Sequence[Mapping[str, object]],
    notify: bool,
    steer: Mapping[str, Sequence[object]] | None = None,
) -> dict[str, Any]:
    """The entry of a service that is a process (see the module's docstring)."""
    return {
        "kind": PROCESS,
        "executable": executable,
        "argv": list(argv),
        "env": dict(env),
        "uid": uid,
        "gid": gid,
        "groups": None if groups is None else list(groups),
        "workdir": workdir,
        "nofile_soft": nofile_soft,
        "sockets": [dict(sock) for sock in sockets],
        "notify": notify,
        "steer": {name: list(address) for name, address in (steer or {}).items()},
    }


def container_entry(
    *, container: str, engine: str, tls: Mapping[str, str] | None
) -> dict[str, Any]:
    """The entry of a service that is a container (see the module's docstring)."""
    return {"kind": CONTAINER, "container": container, "engine": engine,
            "tls": None if tls is None else dict(tls)}


def broken_entry(reason: str) -> dict[str, Any]:
    """The entry of a service that cannot be started: its spawn fails with `reason`."""
    return {ERROR: reason}


def socket_entry(name: str, identity: Mapping[str, object]) -> dict[str, object]:
    """One of an entry's ``sockets``: its name and the identity its fd must have
    (`lazyd.privileged.handoff.identity` or `socket_identity`)."""
    return {"name": name, **identity}


# -- checking (the helper) --------------------------------------------------------------


class BrokenEntry:
    """A checked entry of a service that cannot be started."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class ProcessEntry:
    """A checked entry of a service that is a process: how it is started."""

    __slots__ = ("argv", "env", "executable", "gid", "groups", "nofile_soft", "notify",
                 "sockets", "steer", "uid", "workdir")

    kind = PROCESS

    def __init__(self, entry: Mapping[str, Any]) -> None:
        only(entry, PROCESS_FIELDS)
        self.executable = text(entry.get("executable"), "executable")
        if not self.executable.startswith("/"):
            raise ProtocolError("executable must be an absolute path")
        argv = entry.get("argv")
        if not isinstance(argv, list) or not argv:
            raise ProtocolError("argv must be a non-empty list")
        for arg in argv:
            if not isinstance(arg, str) or "\0" in arg:
                raise ProtocolError("each argument must be a string without NUL")
        self.argv: list[str] = argv
        env = entry.get("env")
        if not isinstance(env, dict):
            raise ProtocolError("env must be an object")
        for key, value in env.items():
            if "=" in text(key, "each variable name") or not isinstance(value, str):
                raise ProtocolError(f"environment variable {key!r} cannot be set")
            # The protocol's variables come with each spawn, checked there.
            if "\0" in value or key in PROTOCOL_VARIABLES:
                raise ProtocolError(f"environment variable {key!r} cannot be set")
        self.env: dict[str, str] = env
        self.uid = optional_integer(entry.get("uid"), "uid", 0, ID_BITS)
        self.gid = optional_integer(entry.get("gid"), "gid", 0, ID_BITS)
        groups = entry.get("groups")
        if groups is not None:
            if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
                raise ProtocolError(f"groups must be a list of at most {MAX_GROUPS} group ids")
            for group in groups:
                if type(group) is not int or not 0 <= group <= ID_BITS:
                    raise ProtocolError(f"groups must be integers in 0..{ID_BITS}")
        self.groups: list[int] | None = groups
        workdir = entry.get("workdir")
        self.workdir = None if workdir is None else text(workdir, "workdir")
        self.nofile_soft = optional_integer(entry.get("nofile_soft"), "nofile_soft", 0, MAX_NOFILE)
        # All or nothing: a uid without its gid and groups would leave the
        # service with the helper's own, which may be root's.
        if (self.uid is None) != (self.gid is None) or (self.uid is None) != (groups is None):
            raise ProtocolError("uid, gid and groups are given together or not at all")
        self.sockets = _sockets(entry.get("sockets", []))
        self.notify = boolean(entry.get("notify", False), "notify")
        self.steer = _steer(entry.get("steer", {}))


class ContainerEntry:
    """A checked entry of a service that is a container: which one, on which engine."""

    __slots__ = ("container", "engine", "tls")

    kind = CONTAINER

    def __init__(self, entry: Mapping[str, Any]) -> None:
        only(entry, CONTAINER_FIELDS)
        self.container = text(entry.get("container"), "container")
        first = self.container[:1]
        if not (first.isascii() and first.isalnum()) or not all(
            c.isascii() and (c.isalnum() or c in "_.-") for c in self.container
        ):
            raise ProtocolError(f"container {self.container!r} is not a container name")
        self.engine = text(entry.get("engine"), "engine")
        if not self.engine.startswith(("unix:/", "tcp://")):
            raise ProtocolError("engine must be unix:/PATH or tcp://HOST:PORT")
        tls = entry.get("tls")
        if tls is not None:
            if not isinstance(tls, dict) or set(tls) != set(TLS_FIELDS):
                raise ProtocolError(f"tls must be null or an object of {list(TLS_FIELDS)}")
            for key in TLS_FIELDS:
                if not text(tls[key], f"tls {key}").startswith("/"):
                    raise ProtocolError(f"tls {key} must be an absolute path")
        self.tls: dict[str, str] | None = tls


if TYPE_CHECKING:
    Entry: TypeAlias = "ProcessEntry | ContainerEntry | BrokenEntry"

# How each kind of entry is checked.
_PARSERS: dict[str, type[ProcessEntry | ContainerEntry]] = {
    PROCESS: ProcessEntry, CONTAINER: ContainerEntry,
}


def parse_entry(entry: object) -> Entry:
    """A checked entry; raises ProtocolError saying which field is wrong."""
    if not isinstance(entry, dict):
        raise ProtocolError("each service must be an object")
    if ERROR in entry:
        # A service that cannot be started (its program was not found): a
        # spawn of it is answered with this error.
        if set(entry) != {ERROR}:
            raise ProtocolError("an entry with an error has nothing else")
        return BrokenEntry(text(entry[ERROR], "error"))
    kind = entry.get("kind", PROCESS)
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError(f"kind must be one of {list(KINDS)}, not {kind!r}")
    return parser(entry)


def parse_table(services: object) -> dict[str, Entry]:
    """A checked table of services: name -> entry. Raises ProtocolError naming the service."""
    if not isinstance(services, dict) or len(services) > MAX_SERVICES:
        raise ProtocolError(f"services must be an object of at most {MAX_SERVICES} entries")
    table = {}
    for name, entry in services.items():
        try:
            table[text(name, "service name")] = parse_entry(entry)
        except ProtocolError as exc:
            raise ProtocolError(f"service {name!r}: {exc}") from None
    return table


def _sockets(value: object) -> list[dict[str, Any]]:
    """A checked ``sockets`` of an entry: what each fd of a spawn must be."""
    if not isinstance(value, list) or len(value) > MAX_SOCKETS:
        raise ProtocolError(f"sockets must be a list of at most {MAX_SOCKETS}")
    for sock in value:
        if not isinstance(sock, dict) or set(sock) != set(SOCKET_FIELDS):
            raise ProtocolError(f"each socket must have exactly {sorted(SOCKET_FIELDS)}")
        name = text(sock["name"], "socket name")
        # As sd_listen_fds_with_names(3) can read them back (see lazyd.privileged.handoff).
        if ":" in name or len(name) > 255 or not name.isprintable():
            raise ProtocolError(f"socket name {name!r} cannot be passed in LISTEN_FDNAMES")
        for key in ("family", "type"):
            if type(sock[key]) is not int:
                raise ProtocolError(f"socket {key} must be an integer")
        for key in ("listening", "connected"):
            boolean(sock[key], f"socket {key}")
        address = sock["address"]
        ip = (isinstance(address, list) and len(address) == 2 and isinstance(address[0], str)
              and type(address[1]) is int)
        if not ip and not isinstance(address, str):
            raise ProtocolError("socket address must be [host, port] or a path")
    return value


def _steer(value: object) -> dict[str, list[Any]]:
    """A checked ``steer`` of an entry: socket name -> upstream (IP address, port)."""
    if not isinstance(value, dict) or len(value) > MAX_SOCKETS:
        raise ProtocolError(f"steer must be an object of at most {MAX_SOCKETS} sockets")
    steer = {}
    for name, address in value.items():
        text(name, "steer socket name")
        if not (isinstance(address, list) and len(address) == 2
                and isinstance(address[0], str) and type(address[1]) is int
                and 0 < address[1] < 65536):
            raise ProtocolError("each steer address must be [host, port]")
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in address[0] else socket.AF_INET,
                             address[0])
        except OSError:
            raise ProtocolError(f"steer host {address[0]!r} is not an IP address") from None
        steer[name] = address
    return steer


def describe_socket(identity: Mapping[str, Any]) -> str:
    """A socket's identity as people read it: ``AF_INET/SOCK_STREAM 0.0.0.0:80 listening``."""
    try:
        kind = f"{socket.AddressFamily(identity['family']).name}/"
        kind += socket.SocketKind(identity["type"]).name
    except ValueError:
        kind = f"family {identity['family']}/type {identity['type']}"
    address = identity["address"]
    where = f"{address[0]}:{address[1]}" if isinstance(address, list) else repr(address)
    state = "listening" if identity["listening"] else "connected" if identity["connected"] else ""
    return f"{kind} {where} {state}".rstrip()
