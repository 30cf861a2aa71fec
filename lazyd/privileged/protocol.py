"""The protocol between the daemon and its privileged helper: every message,
built and checked here, by both sides.

The daemon's side (`lazyd.backends.process.spawner`) builds requests with the
``*_request`` functions and reads what comes back with `parse_reply`; the
helper (`lazyd.privileged.spawnerd`) reads requests with `parse_request` and
answers with the ``*_reply`` functions and `exited_notice`.  So a field has
one spelling, and a message one shape, on both sides.  Everything here is
pure (bytes and dicts in, checked objects or ProtocolError out), so it is
tested exhaustively without a process (tests/privileged/test_protocol.py).  It is one
module of about 450 lines on purpose: every message, both ways, in one place,
so that no field can be spelt or checked two ways (the entries of the table,
which are longer still, live in `lazyd.privileged.entries`).

The transport: an AF_UNIX SOCK_SEQPACKET socketpair, the helper's fd 0.
Every message is one JSON object (at most MAX_MESSAGE bytes) and may carry
fds (SCM_RIGHTS, at most MAX_FDS).

Requests (daemon → helper), each with an integer ``id`` (0..MAX_ID) echoed
in its reply:

``{"op": "define", "id", "services": {NAME: ENTRY}, "config", "path",
"nofile_soft", "seal"}``: add entries (`lazyd.privileged.entries`) to the
table of services.  ``config`` (an absolute path), ``path`` (lazyd's PATH)
and ``nofile_soft`` are kept for reloads.  With ``"seal": true`` no further
define is accepted: the daemon defines everything and seals before it drops
its privileges.  Reply ``{"id", "ok": true}``.

``{"op": "reload", "id"}``: read the table anew from the ``config`` file (see
`lazyd.privileged.read_table`).  Reply, once read, ``{"id", "ok": true,
"services": [NAMES]}``, or an error with stage "reload" (and the config's
``problems`` when it has errors).  ``{"op": "commit", "id"}`` then makes the
table read the one in force: the daemon commits only once the rest of its
reload has succeeded, so a failed reload changes nothing.

``{"op": "spawn", "id", "service", "env"}`` + the service's sockets as fds,
in LISTEN_FDS order (and, with NOTIFY_SOCKET, the notify socket after them):
start a ``process`` entry of the table (`lazyd.privileged.checks` says what
the fds and ``env`` must be).  Reply once exec has succeeded: ``{"id",
"pid"}`` with the read end of the service's output pipe as its one fd; or
an error.

``{"op": "signal", "id", "pid", "signal", "group"}``: kill(2), or killpg(2)
when ``group`` is true, for a pid this helper started, reported to the
daemon, and has not reaped yet.  Reply ``{"id", "ok": true}`` or an error.

``{"op": "listener", "id", "pid", "socket"}``: a copy of the listening
socket that the service's process `pid` (one this helper started and has not
reaped, or a process of its session) has bound to the upstream address its
table entry's ``steer`` gives for ``socket`` (`lazyd.privileged.listeners`),
for the kernel data path.  Reply ``{"id", "listener": SOCKET}`` with the
socket as its one fd, or an error.

``{"op": "container", "id", "service", "action", "timeout", "signal"}``:
act on the container of a ``container`` entry of the table, through its
engine (`lazyd.privileged.containers`), and on nothing else.  ``action`` is
one of CONTAINER_ACTIONS: ``start`` (reply ``{"id", "container": {"id",
"state", "health"}}`` once the engine's start has answered, with the read
end of a pipe that carries the container's output as its one fd; from then
on ``{"container_notice": START_ID, ...}`` notices follow it, START_ID
being the start request's id), ``stop`` (its stop signal, then SIGKILL
after ``timeout`` whole seconds; reply ``{"id", "ok": true}`` once
stopped), ``kill`` (``signal``; reply ok), ``inspect`` and ``health`` (run
its healthcheck) (reply ``{"id", "container": {...}}``).  ``timeout`` and
``signal`` are null where the action takes none.  Each runs in a thread of
its own, so the engine, however slow, never holds up another request.

An error reply is ``{"id", "error", "stage", "errno"}`` (and ``problems``
for a reload): ``error`` is ``"STAGE: reason"``, ``stage`` names the step
that failed ("request" for a request refused as malformed or not allowed,
"exec", "chdir", "setuid", "resolve", "reload", ...), ``errno`` its errno or
0.  ``id`` is null when the request's own id could not be read.

Notices (helper → daemon): ``{"exited": pid, "returncode": rc}`` once a
service's process was reaped (rc negative for a signal, as in `subprocess`);
it always follows the spawn reply of that pid.  ``{"container_notice":
START_ID, "id", "state", "returncode", "error"}``: what became of a
container started by request START_ID: its id and state as the engine says
(``returncode`` null while it runs); once ``returncode`` or ``error``
(following it failed: the engine went away) is not null, that start is
over and nothing more comes for it.

The table reader a reload runs prints one more kind of message on its
stdout, read by the helper with `parse_table_answer`: ``{"services":
{NAME: ENTRY}}``, or ``{"problems": [...]}`` when the config has errors.

Standard library only, and not even `typing` (see `lazyd.privileged`).
"""

from __future__ import annotations

import array
import json
import signal
import socket

from lazyd.privileged.entries import parse_table
from lazyd.privileged.fields import (
    ProtocolError,
    boolean,
    integer,
    only,
    optional_integer,
    text,
)

TYPE_CHECKING = False  # not from typing, which the helper would have to import
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, TypeAlias

    from lazyd.privileged.entries import Entry

# How long the spawner waits for an exec before it turns back to its other
# work by default; a child that takes longer (a workdir on a hung network
# mount) is then followed from the poll loop.
EXEC_WAIT_MS = 100
MAX_MESSAGE = 64 * 1024  # bytes of JSON in one message, either way
MAX_FDS = 253  # fds in one message: Linux's SCM_MAX_FD
MAX_ID = 2**53  # request ids stay exact in every JSON implementation
MAX_TABLE = 64 * 1024 * 1024  # bytes of JSON the table reader may print
MAX_PID = 2**31 - 1
MAX_SIGNAL = 255
MAX_NOFILE = 2**63 - 1  # rlim_t
FD_BYTES = array.array("i").itemsize

DEFINE, RELOAD, COMMIT, SPAWN, SIGNAL = "define", "reload", "commit", "spawn", "signal"
LISTENER = "listener"
CONTAINER = "container"
CONTAINER_ACTIONS = ("start", "stop", "kill", "inspect", "health")
MAX_STOP_TIMEOUT = 24 * 3600  # seconds a container stop may wait
MAX_TEXT = 4096  # characters of an engine's id, state or error in a message
# The fields of each request beside "op" and "id".
REQUEST_FIELDS = {
    DEFINE: ("services", "config", "path", "nofile_soft", "seal"),
    RELOAD: (),
    COMMIT: (),
    SPAWN: ("service", "env"),
    SIGNAL: ("pid", "signal", "group"),
    LISTENER: ("pid", "socket"),
    CONTAINER: ("service", "action", "timeout", "signal"),
}
# The only request that carries fds.
WITH_FDS = (SPAWN,)
# What a spawn's env may add to its entry's (checked against the table).
SPAWN_VARIABLES = ("LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
# Stage of an error reply for a request refused as it stands.
REQUEST_STAGE = "request"
RELOAD_STAGE = "reload"

_SIGNALS = frozenset(int(s) for s in signal.valid_signals())


def encode(message: Mapping[str, object]) -> bytes:
    """One message as it goes on the wire (compact JSON; callers check MAX_MESSAGE)."""
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """One message from the wire: a JSON object, or ProtocolError."""
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("not a JSON message") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


def fds_ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that carries `fds` (SCM_RIGHTS), for sendmsg."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message carried (already close-on-exec, as received)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % FD_BYTES])
    return list(fds)


# -- requests: built by the daemon -----------------------------------------------------


def define_request(
    request_id: int,
    services: Mapping[str, Mapping[str, Any]],
    *,
    config: str | None = None,
    path: str | None = None,
    nofile_soft: int | None = None,
    seal: bool = False,
) -> dict[str, Any]:
    """Add `services` (name -> entry) to the table; `seal`: the last definition."""
    return {"op": DEFINE, "id": request_id, "services": dict(services), "config": config,
            "path": path, "nofile_soft": nofile_soft, "seal": seal}


def reload_request(request_id: int) -> dict[str, Any]:
    """Read the table anew from the config file."""
    return {"op": RELOAD, "id": request_id}


def commit_request(request_id: int) -> dict[str, Any]:
    """Make the table the last reload read the one in force."""
    return {"op": COMMIT, "id": request_id}


def spawn_request(request_id: int, service: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Start `service`, adding `env` (SPAWN_VARIABLES only); its fds go with the message."""
    return {"op": SPAWN, "id": request_id, "service": service, "env": dict(env)}


def signal_request(request_id: int, pid: int, sig: int, *, group: bool) -> dict[str, Any]:
    """Send `sig` to `pid`, or to its process group."""
    return {"op": SIGNAL, "id": request_id, "pid": pid, "signal": int(sig), "group": group}


def listener_request(request_id: int, pid: int, socket_name: str) -> dict[str, Any]:
    """A copy of the listener that `pid`'s service binds for its socket `socket_name`."""
    return {"op": LISTENER, "id": request_id, "pid": pid, "socket": socket_name}


def container_request(
    request_id: int, service: str, action: str, *, timeout: int | None = None,
    sig: int | None = None,
) -> dict[str, Any]:
    """Act on `service`'s container: one of CONTAINER_ACTIONS."""
    return {"op": CONTAINER, "id": request_id, "service": service, "action": action,
            "timeout": timeout, "signal": None if sig is None else int(sig)}


# -- requests: checked by the helper ---------------------------------------------------


class Define:
    """A checked define request."""

    __slots__ = ("config", "id", "nofile_soft", "path", "seal", "services")

    def __init__(self, request_id: int, message: Mapping[str, Any]) -> None:
        self.id = request_id
        self.services: dict[str, Entry] = parse_table(message.get("services"))
        config, path = message.get("config"), message.get("path")
        self.config = None if config is None else text(config, "config")
        self.path = None if path is None else text(path, "path")
        self.nofile_soft = optional_integer(
            message.get("nofile_soft"), "nofile_soft", 0, MAX_NOFILE
        )
        self.seal = boolean(message.get("seal", False), "seal")


class Reload:
    """A checked reload request."""

    __slots__ = ("id",)

    def __init__(self, request_id: int, message: Mapping[str, Any]) -> None:
        self.id = request_id


class Commit:
    """A checked commit request."""

    __slots__ = ("id",)

    def __init__(self, request_id: int, message: Mapping[str, Any]) -> None:
        self.id = request_id


class Spawn:
    """A checked spawn request: its fields are well-formed; what they may be
    for this service is for `lazyd.privileged.checks` to say, against the table."""

    __slots__ = ("env", "id", "service")

    def __init__(self, request_id: int, message: Mapping[str, Any]) -> None:
        self.id = request_id
        self.service = text(message.get("service"), "service")
        env = message.get("env")
        if not isinstance(env, dict):
            raise ProtocolError("env must be an object")
        unknown = set(env) - set(SPAWN_VARIABLES)
        if unknown:
            raise ProtocolError(f"environment variable {sorted(unknown)[0]!r} cannot be set")
        for key, value in env.items():
            text(value, key)
        self.env: dict[str, str] = env


class Signal:
    """A checked signal request."""

    __slots__ = ("group", "id", "pid", "signal")

    def __init__(self, request_id: int, message: Mapping[str, Any]) -> None:
        self.id = request_id
        self.pid = integer(message.get("pid"), "pid", 1, MAX_PID)
        self.signal = integer(message.get("signal"), "signal", 1, MAX_SIGNAL)
        if self.signal not in _SIGNALS:
            raise ProtocolError(f"no signal {self.signal}")
        self.group = boolean(message.get("group"), "group")


class Listener:
    """A checked listener request."""

    __slots__ = ("id", "pid", "socket")

    def __init__(self, request_id: int, message: Mapping[str, Any]) -> None:
        self.id = request_id
        self.pid = integer(message.get("pid"), "pid", 1, MAX_PID)
        self.socket = text(message.get("socket"), "socket")


class Container:
    """A checked container request: what it may do to which service's container
    is for the table to say (`lazyd.privileged.containers`)."""

    __slots__ = ("action", "id", "service", "signal", "timeout")

    def __init__(self, request_id: int, message: Mapping[str, Any]) -> None:
        self.id = request_id
        self.service = text(message.get("service"), "service")
        action = message.get("action")
        if action not in CONTAINER_ACTIONS:
            raise ProtocolError(f"action must be one of {list(CONTAINER_ACTIONS)}")
        self.action: str = action
        self.timeout = optional_integer(message.get("timeout"), "timeout", 0, MAX_STOP_TIMEOUT)
        self.signal = optional_integer(message.get("signal"), "signal", 1, MAX_SIGNAL)
        if self.signal is not None and self.signal not in _SIGNALS:
            raise ProtocolError(f"no signal {self.signal}")
        if (self.timeout is None) != (action != "stop"):
            raise ProtocolError("a stop takes a timeout, nothing else does")
        if (self.signal is None) != (action != "kill"):
            raise ProtocolError("a kill takes a signal, nothing else does")


if TYPE_CHECKING:
    Request: TypeAlias = "Define | Reload | Commit | Spawn | Signal | Listener | Container"

_REQUESTS: dict[str, Callable[[int, Mapping[str, Any]], Request]] = {
    DEFINE: Define, RELOAD: Reload, COMMIT: Commit, SPAWN: Spawn, SIGNAL: Signal,
    LISTENER: Listener, CONTAINER: Container,
}


def parse_request(data: bytes, fds: int = 0, *, truncated: bool = False) -> Request:
    """A checked request from `data`, which came with `fds` fds (`truncated`:
    the kernel cut the message or its fds, MSG_TRUNC or MSG_CTRUNC).

    Raises ProtocolError saying what is wrong, with the request's id once it
    was read (the error reply carries it).
    """
    request_id = None
    try:
        if truncated:
            raise ProtocolError(f"message too long (limit {MAX_MESSAGE} bytes, {MAX_FDS} fds)")
        message = decode(data)
        request_id = integer(message.get("id"), "id", 0, MAX_ID)
        op = message.get("op")
        if not isinstance(op, str) or op not in _REQUESTS:
            raise ProtocolError(f"unknown op {op!r}")
        if fds and op not in WITH_FDS:
            raise ProtocolError(f"{op} takes no fds")
        fields = REQUEST_FIELDS[op]
        if not fields and set(message) - {"op", "id"}:
            raise ProtocolError(f"{op} takes no fields")
        only(message, ("op", "id", *fields))
        return _REQUESTS[op](request_id, message)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


# -- replies: built by the helper ------------------------------------------------------


def ok_reply(request_id: int) -> dict[str, Any]:
    """A define, commit or signal done."""
    return {"id": request_id, "ok": True}


def reloaded_reply(request_id: int, services: Sequence[str]) -> dict[str, Any]:
    """A reload read a table with these services."""
    return {"id": request_id, "ok": True, "services": sorted(services)}


def spawned_reply(request_id: int, pid: int) -> dict[str, Any]:
    """A spawn exec'd as `pid`; its output pipe goes with the message."""
    return {"id": request_id, "pid": pid}


def listener_reply(request_id: int, socket_name: str) -> dict[str, Any]:
    """The listener for `socket_name` goes with the message."""
    return {"id": request_id, "listener": socket_name}


def container_reply(request_id: int, info: Mapping[str, Any]) -> dict[str, Any]:
    """A container start, inspect or healthcheck done: what the engine says of it
    (a start's output pipe goes with the message)."""
    return {"id": request_id, "container": _container_info(info)}


def container_notice(
    start_id: int, info: Mapping[str, Any], returncode: int | None, error: str | None = None
) -> dict[str, Any]:
    """What became of the container started by request `start_id`."""
    return {"container_notice": start_id, **_container_info(info), "returncode": returncode,
            "error": None if error is None else error[:MAX_TEXT]}


def _container_info(info: Mapping[str, Any]) -> dict[str, Any]:
    def short(value: object) -> str | None:
        return None if value is None else str(value)[:MAX_TEXT]

    return {"id": short(info.get("id")), "state": short(info.get("state")),
            "health": short(info.get("health"))}


def error_reply(
    request_id: int | None,
    stage: str,
    errno: int,
    reason: str,
    problems: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A request that failed at `stage` (with `errno`, 0 for none) because of `reason`."""
    reply: dict[str, Any] = {
        "id": request_id, "error": f"{stage}: {reason}", "stage": stage, "errno": errno
    }
    if problems is not None:
        reply["problems"] = list(problems)
    return reply


def exited_notice(pid: int, returncode: int) -> dict[str, Any]:
    """A service's process was reaped with `returncode` (negative: killed by that signal)."""
    return {"exited": pid, "returncode": returncode}


# -- replies: checked by the daemon ----------------------------------------------------


class Exited:
    """The notice that a spawned process was reaped."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int, returncode: int) -> None:
        self.pid = pid
        self.returncode = returncode


class Done:
    """A request done; `services` are a reload's."""

    __slots__ = ("id", "services")

    def __init__(self, request_id: int, services: list[str] | None) -> None:
        self.id = request_id
        self.services = services


class Spawned:
    """A spawn exec'd: the process's pid (its output pipe came as the message's fd)."""

    __slots__ = ("id", "pid")

    def __init__(self, request_id: int, pid: int) -> None:
        self.id = request_id
        self.pid = pid


class Taken:
    """A listener request done: the socket came as the message's fd."""

    __slots__ = ("id", "socket")

    def __init__(self, request_id: int, socket_name: str) -> None:
        self.id = request_id
        self.socket = socket_name


class Failed:
    """A request that failed: the reason alone (without its stage), the stage and errno."""

    __slots__ = ("errno", "id", "problems", "reason", "stage")

    def __init__(
        self, request_id: int | None, reason: str, stage: str, errno: int, problems: list[str]
    ) -> None:
        self.id = request_id
        self.reason = reason
        self.stage = stage
        self.errno = errno
        self.problems = problems


class ContainerInfo:
    """A container as a reply or notice describes it (what the engine said)."""

    __slots__ = ("health", "id", "state")

    def __init__(self, message: Mapping[str, Any]) -> None:
        for key in ("id", "state", "health"):
            value = message.get(key)
            if value is not None and not isinstance(value, str):
                raise ProtocolError(f"container {key} must be a string or null")
        self.id: str | None = message.get("id")
        self.state: str | None = message.get("state")
        self.health: str | None = message.get("health")


class ContainerDone:
    """A container start, inspect or healthcheck done (a start's output pipe came as its fd)."""

    __slots__ = ("container", "id")

    def __init__(self, request_id: int, container: ContainerInfo) -> None:
        self.id = request_id
        self.container = container


class ContainerNotice:
    """What became of the container that request `start` started; `over` once
    it has exited (`returncode`) or can no longer be followed (`error`)."""

    __slots__ = ("container", "error", "returncode", "start")

    def __init__(self, start: int, container: ContainerInfo, returncode: int | None,
                 error: str | None) -> None:
        self.start = start
        self.container = container
        self.returncode = returncode
        self.error = error

    @property
    def over(self) -> bool:
        return self.returncode is not None or self.error is not None


if TYPE_CHECKING:
    Reply: TypeAlias = (
        "Exited | Done | Spawned | Taken | Failed | ContainerDone | ContainerNotice")


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolError(f"{what} must be a list of strings")
    return value


def parse_reply(data: bytes) -> Reply:
    """A checked message from the helper: a reply or a notice. Raises ProtocolError."""
    message = decode(data)
    if "container_notice" in message:
        only(message, ("container_notice", "id", "state", "health", "returncode", "error"))
        error = message.get("error")
        if error is not None and not isinstance(error, str):
            raise ProtocolError("error must be a string or null")
        return ContainerNotice(
            integer(message["container_notice"], "container_notice", 0, MAX_ID),
            ContainerInfo(message),
            optional_integer(message.get("returncode"), "returncode", -MAX_SIGNAL, 255), error)
    if "container" in message:
        only(message, ("id", "container"))
        info = message["container"]
        if not isinstance(info, dict):
            raise ProtocolError("container must be an object")
        only(info, ("id", "state", "health"))
        return ContainerDone(integer(message.get("id"), "id", 0, MAX_ID), ContainerInfo(info))
    if "exited" in message:
        only(message, ("exited", "returncode"))
        return Exited(integer(message["exited"], "exited", 1, MAX_PID),
                      integer(message.get("returncode"), "returncode", -MAX_SIGNAL, 255))
    if "error" in message:
        only(message, ("id", "error", "stage", "errno", "problems"))
        request_id = optional_integer(message.get("id"), "id", 0, MAX_ID)
        stage = message.get("stage")
        error = message["error"]
        if not isinstance(stage, str) or not isinstance(error, str):
            raise ProtocolError("error and stage must be strings")
        errno = integer(message.get("errno"), "errno", 0, 2**31 - 1)
        problems = _strings(message.get("problems", []), "problems")
        return Failed(request_id, error.removeprefix(f"{stage}: "), stage, errno, problems)
    request_id = integer(message.get("id"), "id", 0, MAX_ID)
    if "pid" in message:
        only(message, ("id", "pid"))
        return Spawned(request_id, integer(message["pid"], "pid", 1, MAX_PID))
    if "listener" in message:
        only(message, ("id", "listener"))
        return Taken(request_id, text(message["listener"], "listener"))
    only(message, ("id", "ok", "services"))
    if message.get("ok") is not True:
        raise ProtocolError("a reply is ok, an error, or a spawned pid")
    services = message.get("services")
    return Done(request_id, None if services is None else _strings(services, "services"))


# -- the table reader's answer -------------------------------------------------------


def table_answer(services: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What the table reader prints for a config without errors: its table."""
    return {"services": dict(services)}


def problems_answer(problems: Sequence[str]) -> dict[str, Any]:
    """What the table reader prints for a config with errors."""
    return {"problems": list(problems)}


def parse_table_answer(data: bytes) -> tuple[dict[str, Entry], list[str] | None]:
    """The table the reader printed, checked, or its config's problems: (table,
    None) or ({}, problems). Raises ProtocolError for anything else."""
    if len(data) > MAX_TABLE:
        raise ProtocolError(f"the table exceeds {MAX_TABLE} bytes")
    try:
        answer = decode(data)
    except ProtocolError as exc:
        if str(exc) == "not a JSON object":
            raise ProtocolError("the table reader printed no object") from None
        # Nothing, or a traceback: the reader's stderr is lazyd's.
        raise ProtocolError("the table reader failed (see lazyd's log)") from None
    if "problems" in answer:
        problems = answer["problems"]
        if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
            raise ProtocolError("the table reader printed bad problems")
        return {}, problems
    return parse_table(answer.get("services")), None
