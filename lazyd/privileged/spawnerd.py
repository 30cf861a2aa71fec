"""The spawner: the small process that forks and execs lazyd's services.

Why a separate process: LISTEN_PID must equal the pid that execs the service,
so some code has to run between fork and exec, and in the daemon that forces
CPython to fork() the whole daemon (its page tables included) instead of
vfork()ing. This process is single-threaded and small, so its fork is cheap.
When lazyd runs as root and drops its privileges after binding, this process
is also what stays privileged; so it starts only the services it was told
about before the daemon dropped them, exactly as it was told then, checks
every field of every request, and answers anything else with an error instead
of failing. A daemon taken over after the drop can start and signal the
configured services, and nothing else.

It is started by `lazyd.backends.process.spawner.open_spawner` as ``python -I -S`` (no site,
no environment, nothing from the current directory on sys.path: it imports only
the standard library and `lazyd.backends.process.handoff`, and not even `typing`, to stay
small). Its fd 0 is one end of an AF_UNIX SOCK_SEQPACKET socketpair, the
daemon holds the other. Every message is one
JSON object (at most MAX_MESSAGE bytes) and may carry fds (SCM_RIGHTS).

Requests (daemon → spawner), each with an integer ``id`` echoed in its reply:

``{"op": "define", "id", "services": {NAME: ENTRY}, "config", "path",
"nofile_soft", "seal"}``: add entries to the table of services, which says
how each may be started. ENTRY is ``{"executable", "argv", "env", "uid",
"gid", "groups", "workdir", "nofile_soft", "sockets", "notify"}``
(``executable`` absolute; ``env`` complete but for LISTEN_* and
NOTIFY_SOCKET; ``uid``/``gid``/``groups`` all three or none, they,
``workdir`` and ``nofile_soft`` may be null: "as is"; ``sockets`` the fds a
spawn must pass, in order, each ``{"name", "family", "type", "address",
"listening", "connected"}`` as `lazyd.backends.process.handoff.socket_identity` describes a
socket, empty (the default) for a service that binds its own (proxy mode);
``notify`` true for a ``ready: notify`` service, false by default), or
``{"error"}`` for a service that cannot be started (its program is missing),
whose spawn is answered with that error. ``config`` (an
absolute path), ``path`` (lazyd's PATH) and ``nofile_soft`` are kept for
reloads. With ``"seal": true`` no further define is accepted: the daemon
defines everything and seals before it drops its privileges. Reply
``{"id", "ok": true}``.

``{"op": "reload", "id"}``: read the table anew from the ``config`` file, as
this process's user, with lazyd's own config loader in a fresh interpreter
(`lazyd.backends.process.launch.print_table`, with site packages: it needs PyYAML), so that
the daemon never says what is to be run; as root, only a file that only root
can change (directories above it included) is read. Reply, once read, ``{"id", "ok":
true, "services": [NAMES]}``, or an error with stage "reload" (and the
config's ``problems`` when it has errors). ``{"op": "commit", "id"}`` then
makes the table read the one in force: the daemon commits only once the rest
of its reload has succeeded, so a failed reload changes nothing.

``{"op": "spawn", "id", "service", "env"}`` + the service's sockets as fds,
in LISTEN_FDS order: start a service of the table. Each fd must be the socket
the table says (its family, type, the address it is bound to, listening or
not, unconnected), and there must be as many as the table lists. ``env`` may
add only LISTEN_FDS and LISTEN_FDNAMES (which must be the table's count and
names) and, for a ``notify`` service, NOTIFY_SOCKET: only lazyd's own
notify socket for that service, ``@`` + `lazyd.backends.process.handoff.notify_socket_name`
with the daemon's pid (this process's parent), and the socket itself goes
as one more fd after the sockets, as proof that the daemon holds it (it is
not passed on). So a daemon taken over after the drop can neither hand a
service any other socket nor point its notifications anywhere else, such as
systemd's own notify socket.
The child calls setsid(2), gets /dev/null as stdin and one pipe as stdout and
stderr, its sockets at 3.., default signal dispositions, its credentials, its
workdir, its RLIMIT_NOFILE soft limit and LISTEN_PID (when it has sockets),
and nothing else open. Reply once exec has succeeded: ``{"id", "pid"}`` with
the read end of the output pipe as fd; or ``{"id", "error", "stage", "errno"}``
(``stage`` names the step that failed: "exec", "chdir", "setuid", ...).

``{"op": "signal", "id", "pid", "signal", "group"}``: kill(2), or killpg(2)
when ``group`` is true, for a pid this spawner started, reported to the daemon,
and has not reaped yet. Reply ``{"id", "ok": true}`` or ``{"id", "error"}``.

Notices (spawner → daemon): ``{"exited": pid, "returncode": rc}`` once a
service's process was reaped (rc negative for a signal, as in `subprocess`).
It always follows the spawn reply of that pid. Before reaping a service's main
process, while its pid (and so its process group id) is still reserved by the
zombie, the spawner sends SIGKILL to the process group: whatever the service
left behind goes with it, and no pid can have been reused in between.

Lifetime: the spawner outlives nothing. When the daemon's end closes (lazyd
exits, cleanly or not) it sends SIGKILL to the process group of every process
it started and still has, reaps them and exits. lazyd stops its services
properly (stop signal, then SIGKILL after stop_timeout) before closing it, so
normally nothing is left to kill. It runs in a session of its own, and
SIGINT, SIGTERM and SIGHUP have no effect on it: a Ctrl-C or a signal sent to
lazyd's process group must leave lazyd able to stop its services through the
spawner. Should it be killed all the same (SIGKILL), lazyd stops with an
error, and each service's main process gets SIGKILL as well (its parent-death
signal, PR_SET_PDEATHSIG), so that none outlives it unsupervised.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import os
import resource
import select
import signal
import socket
import stat
import sys

from lazyd.backends.process.handoff import (
    LISTEN_FDS_START,
    NOTIFY_TOKEN_LENGTH,
    PROTOCOL_VARIABLES,
    arrange_fds,
    notify_socket_name,
    socket_identity,
)

# Not `from typing import TYPE_CHECKING`: importing typing would cost this small
# process time and memory, and every fork copies its page tables.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn

CONTROL_FD = 0
MAX_MESSAGE = 64 * 1024  # bytes of JSON in one message, either way
MAX_FDS = 253  # fds in one message: Linux's SCM_MAX_FD
MAX_IN_FLIGHT = 64  # spawns whose exec is not confirmed yet
MAX_CHILDREN = 4096  # processes started and not yet reaped
MAX_SERVICES = 65536  # entries in the table of services
MAX_TABLE = 64 * 1024 * 1024  # bytes of JSON the table reader may print
MAX_ID = 2**53  # request ids stay exact in every JSON implementation
MAX_ERROR = 512  # bytes a failed child writes to its error pipe, at most
_ID_BITS = 0xFFFFFFFE  # uid_t/gid_t: (uid_t)-1 means "unchanged" to the kernel, so refused
_FD_BYTES = array.array("i").itemsize

# The only signals the spawner does not leave at their default. It handles
# them (with a no-op) rather than ignoring them, because exec resets handled
# signals to the default but keeps ignored ones ignored: so a child has no
# signal to reset before exec, which saves it time (see `_child`).
_HANDLED = (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The table reader: lazyd's config loader in a full interpreter (with its site
# packages: it needs PyYAML), run by the spawner with the spawner's credentials.
_READ_TABLE = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from lazyd.backends.process.launch import print_table; "
    "print_table(sys.argv[2], int(sys.argv[3]))"
)
# How long the spawner waits for an exec before it turns back to its other
# work by default; a child that takes longer (a workdir on a hung network
# mount) is then followed from the poll loop.
EXEC_WAIT_MS = 100


class BadRequest(Exception):
    """A request the spawner refuses; its message goes back in the error reply."""


class _Gone(Exception):
    """The daemon's end of the socket is closed."""


def _int(header: dict[str, Any], key: str, low: int, high: int) -> int:
    value = header.get(key)
    # bool is an int subclass; true must not pass for 1.
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{key} must be an integer in {low}..{high}")
    return value


def _optional_int(header: dict[str, Any], key: str, low: int, high: int) -> int | None:
    return None if header.get(key) is None else _int(header, key, low, high)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise BadRequest(f"{what} must be a non-empty string without NUL")
    return value


class _Launch:
    """One checked entry of the table: how one service is started."""

    __slots__ = ("argv", "env", "error", "executable", "gid", "groups", "nofile_soft", "notify",
                 "sockets", "uid", "workdir")

    def __init__(self, entry: object) -> None:
        if not isinstance(entry, dict):
            raise BadRequest("each service must be an object")
        if "error" in entry:
            # A service that cannot be started (its program was not found): a
            # spawn of it is answered with this error.
            if set(entry) != {"error"}:
                raise BadRequest("an entry with an error has nothing else")
            self.error: str | None = _text(entry["error"], "error")
            return
        self.error = None
        unknown = set(entry) - set(self.__slots__)
        if unknown:
            raise BadRequest(f"unknown field {sorted(unknown)[0]!r}")
        self.executable = _text(entry.get("executable"), "executable")
        if not self.executable.startswith("/"):
            raise BadRequest("executable must be an absolute path")
        argv = entry.get("argv")
        if not isinstance(argv, list) or not argv:
            raise BadRequest("argv must be a non-empty list")
        for arg in argv:
            if not isinstance(arg, str) or "\0" in arg:
                raise BadRequest("each argument must be a string without NUL")
        self.argv: list[str] = argv
        env = entry.get("env")
        if not isinstance(env, dict):
            raise BadRequest("env must be an object")
        for key, value in env.items():
            if "=" in _text(key, "each variable name") or not isinstance(value, str):
                raise BadRequest(f"environment variable {key!r} cannot be set")
            if "\0" in value or key in PROTOCOL_VARIABLES:
                raise BadRequest(f"environment variable {key!r} cannot be set")
        self.env: dict[str, str] = env
        self.uid = _optional_int(entry, "uid", 0, _ID_BITS)
        self.gid = _optional_int(entry, "gid", 0, _ID_BITS)
        groups = entry.get("groups")
        if groups is not None:
            if not isinstance(groups, list) or len(groups) > 65536:  # NGROUPS_MAX
                raise BadRequest("groups must be a list of at most 65536 group ids")
            for group in groups:
                if type(group) is not int or not 0 <= group <= _ID_BITS:
                    raise BadRequest(f"groups must be integers in 0..{_ID_BITS}")
        self.groups: list[int] | None = groups
        workdir = entry.get("workdir")
        self.workdir = None if workdir is None else _text(workdir, "workdir")
        self.nofile_soft = _optional_int(entry, "nofile_soft", 0, 2**63 - 1)
        # All or nothing: a uid without its gid and groups would leave the
        # service with the spawner's own, which may be root's.
        if (self.uid is None) != (self.gid is None) or (self.uid is None) != (groups is None):
            raise BadRequest("uid, gid and groups are given together or not at all")
        self.sockets = _sockets(entry.get("sockets", []))
        notify = entry.get("notify", False)
        if not isinstance(notify, bool):
            raise BadRequest("notify must be true or false")
        self.notify: bool = notify


_SOCKET_FIELDS = frozenset(("name", "family", "type", "address", "listening", "connected"))


def _sockets(value: object) -> list[dict[str, Any]]:
    """A checked ``sockets`` of a table entry: what each fd of a spawn must be."""
    if not isinstance(value, list) or len(value) > MAX_FDS:
        raise BadRequest(f"sockets must be a list of at most {MAX_FDS}")
    for sock in value:
        if not isinstance(sock, dict) or set(sock) != _SOCKET_FIELDS:
            raise BadRequest(f"each socket must have exactly {sorted(_SOCKET_FIELDS)}")
        name = _text(sock["name"], "socket name")
        # As sd_listen_fds_with_names(3) can read them back (see lazyd.backends.process.handoff).
        if ":" in name or len(name) > 255 or not name.isprintable():
            raise BadRequest(f"socket name {name!r} cannot be passed in LISTEN_FDNAMES")
        for key in ("family", "type"):
            if type(sock[key]) is not int:
                raise BadRequest(f"socket {key} must be an integer")
        for key in ("listening", "connected"):
            if not isinstance(sock[key], bool):
                raise BadRequest(f"socket {key} must be true or false")
        address = sock["address"]
        ip = (isinstance(address, list) and len(address) == 2 and isinstance(address[0], str)
              and type(address[1]) is int)
        if not ip and not isinstance(address, str):
            raise BadRequest("socket address must be [host, port] or a path")
    return value


def _describe(identity: dict[str, Any]) -> str:
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


def _table(services: object) -> dict[str, _Launch]:
    """A checked table of services: name -> _Launch."""
    if not isinstance(services, dict) or len(services) > MAX_SERVICES:
        raise BadRequest(f"services must be an object of at most {MAX_SERVICES} entries")
    table = {}
    for name, entry in services.items():
        try:
            table[_text(name, "service name")] = _Launch(entry)
        except BadRequest as exc:
            raise BadRequest(f"service {name!r}: {exc}") from None
    return table


def _spawn_env(
    name: str, launch: _Launch, env: object, fds: list[int], lazyd_pid: int
) -> tuple[dict[str, str], list[int]]:
    """Check a spawn's `env` and `fds` against the table; the variables it adds
    (LISTEN_FDS, LISTEN_FDNAMES, NOTIFY_SOCKET) and the fds the service gets."""
    if not isinstance(env, dict):
        raise BadRequest("env must be an object")
    unknown = set(env) - {"LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"}
    if unknown:
        raise BadRequest(f"environment variable {sorted(unknown)[0]!r} cannot be set")
    for key, value in env.items():
        _text(value, key)
    notify = env.get("NOTIFY_SOCKET")
    if notify is not None:
        if not launch.notify:
            raise BadRequest(f"service {name!r} is not ready: notify; NOTIFY_SOCKET cannot be set")
        if not fds:
            raise BadRequest("NOTIFY_SOCKET comes with the notify socket itself, as the last fd")
        _check_notify(name, notify, fds[-1], lazyd_pid)
        fds = fds[:-1]  # the proof; not the service's
    expected = launch.sockets
    names = ":".join(sock["name"] for sock in expected)
    if len(fds) != len(expected):
        if not expected:
            raise BadRequest(f"service {name!r} is handed no sockets (it binds its own), "
                             f"but {len(fds)} fds were sent")
        raise BadRequest(f"service {name!r} takes its {len(expected)} configured sockets "
                         f"({names}), but {len(fds)} fds were sent")
    for number, (fd, want) in enumerate(zip(fds, expected, strict=True), start=LISTEN_FDS_START):
        got = socket_identity(fd)
        if any(got[key] != want[key] for key in got):
            raise BadRequest(f"fd {number} ({want['name']}) is {_describe(got)}, "
                             f"not the configured {_describe(want)}")
    if fds:
        if env.get("LISTEN_FDS") != str(len(fds)) or env.get("LISTEN_FDNAMES") != names:
            raise BadRequest(f"LISTEN_FDS and LISTEN_FDNAMES must be {len(fds)} and {names!r}, "
                             "as the table says")
    elif "LISTEN_FDS" in env or "LISTEN_FDNAMES" in env:
        raise BadRequest("LISTEN_FDS and LISTEN_FDNAMES go with fds")
    return env, fds


def _check_notify(name: str, notify: str, proof: int, lazyd_pid: int) -> None:
    """Refuse a NOTIFY_SOCKET that is not the daemon's own notify socket for `name`.

    The name must be the one lazyd gives that service's socket, and `proof`
    (sent by the daemon) a datagram socket bound to it: an abstract name
    belongs to one socket only, so the service's messages reach the daemon
    and nobody else.
    """
    token = notify.rsplit("/", 1)[-1]
    pattern = "@" + notify_socket_name(name, lazyd_pid, "X" * NOTIFY_TOKEN_LENGTH)
    if (
        len(token) != NOTIFY_TOKEN_LENGTH
        or any(c not in "0123456789abcdef" for c in token)
        or notify != "@" + notify_socket_name(name, lazyd_pid, token)
    ):
        raise BadRequest(f"NOTIFY_SOCKET {notify[:120]!r} is not lazyd's notify socket "
                         f"for {name!r} ({pattern})")
    got = socket_identity(proof)
    datagram = got["family"] == socket.AF_UNIX and got["type"] == socket.SOCK_DGRAM
    if not datagram or got["address"] != notify:
        raise BadRequest(f"the socket sent with NOTIFY_SOCKET is {_describe(got)}, "
                         f"not bound to {notify}")


class _Credentials:
    """What a child must change: None for what it keeps."""

    __slots__ = ("gid", "groups", "uid")

    def __init__(self, uid: int | None, gid: int | None, groups: list[int] | None) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups


class _Reader:
    """A table reader started by a reload, and what it printed so far."""

    __slots__ = ("data", "fd", "pid", "request_id")

    def __init__(self, request_id: int, pid: int, fd: int) -> None:
        self.request_id = request_id
        self.pid = pid
        self.fd = fd
        self.data = b""


class _InFlight:
    """A child forked for a spawn request whose exec is not confirmed yet."""

    __slots__ = ("err_r", "out_r", "pid", "request_id")

    def __init__(self, request_id: int, pid: int, out_r: int, err_r: int) -> None:
        self.request_id = request_id
        self.pid = pid
        self.out_r = out_r
        self.err_r = err_r


def prepare_child_fds(
    fds: Sequence[int], devnull: int, out_w: int, keep: int, fd_limit: int
) -> None:
    """In a forked child: sockets at 3.., /dev/null at 0, `out_w` at 1 and 2.

    `devnull`, `out_w` and `keep` must be at or above 3+len(fds) (the parent
    puts them there), so that nothing below overwrites them. The sockets are
    arranged before stdio is touched, so a socket that sits at 0-2 is copied
    first. Afterwards every fd from 3+len(fds) up to `fd_limit` is closed
    except `keep` (the error pipe, which is close-on-exec).
    """
    end = LISTEN_FDS_START + len(fds)
    arrange_fds(fds)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    # close_range(2) where the interpreter has it: one call, whatever the limit.
    os.closerange(end, keep)
    os.closerange(keep + 1, max(fd_limit, keep + 1))


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _child(
    launch: _Launch,
    env: dict[str, str],
    creds: _Credentials,
    fds: Sequence[int],
    devnull: int,
    out_w: int,
    err_w: int,
    fd_limit: int,
    nofile: tuple[int, int] | None,
    parent: int,
) -> NoReturn:
    """Between fork and exec: turn this child into the service. Never returns.

    Everything that can be done in the parent is done there: on a fork, every
    page this code writes to is copied first, and that is most of its cost.
    Signal dispositions need no work (see _HANDLED); the mask is empty.
    """
    stage = "setsid"
    try:
        # A signal arriving before exec runs the spawner's C handler, which
        # writes to the wakeup fd: detach it, as its number is about to be
        # closed and could be reused.
        signal.set_wakeup_fd(-1)
        os.setsid()
        stage = "fds"
        prepare_child_fds(fds, devnull, out_w, err_w, fd_limit)
        # Only what differs from the spawner's own (see Spawnerd.spawn).
        if creds.groups is not None:
            stage = "setgroups"
            os.setgroups(creds.groups)
        if creds.gid is not None:
            stage = "setgid"
            os.setresgid(creds.gid, creds.gid, creds.gid)
        if creds.uid is not None:
            stage = "setuid"
            os.setresuid(creds.uid, creds.uid, creds.uid)
        stage = "prctl"
        # Should the spawner itself be killed, the service dies with it
        # instead of outliving it unsupervised, holding lazyd's sockets. Only
        # after the credentials: changing them clears the parent-death signal.
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # killed already, before the prctl
            raise OSError(errno.ESRCH, "the spawner is gone")
        if launch.workdir is not None:
            stage = "chdir"
            os.chdir(launch.workdir)
        if nofile is not None:
            stage = "rlimit"
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        if fds:
            # As systemd's activate.c does: set in the process that execs, so it
            # equals the pid the service sees as its own.
            env["LISTEN_PID"] = str(os.getpid())
        stage = "exec"
        os.execve(launch.executable, launch.argv, env)
    except BaseException as exc:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
        os.write(err_w, f"{code} {stage} {type(exc).__name__}".encode()[:MAX_ERROR])
    finally:
        os._exit(127)


class Spawnerd:
    """The spawner's state and its poll loop."""

    def __init__(self, control: socket.socket, exec_wait_ms: int = EXEC_WAIT_MS) -> None:
        self.control = control
        self.exec_wait_ms = exec_wait_ms
        # pid -> whether its exit is reported (true once the daemon was told its pid).
        self.children: dict[int, bool] = {}
        # Spawns whose exec is not confirmed yet: by pid, and those followed
        # from the poll loop (see EXEC_WAIT_MS) also by error pipe fd.
        self.in_flight_pids: dict[int, _InFlight] = {}
        self.in_flight: dict[int, _InFlight] = {}
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.nofile_hard = hard
        # No fd of ours is above the soft limit: every one was opened under it.
        self.fd_limit = soft if 0 <= soft < 2**31 else 2**31 - 1
        # Above every fd range a request can ask for if the limit allows, so
        # that no spawn needs a temporary copy of it (see _above).
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            high = fcntl.fcntl(self.devnull, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START + MAX_FDS)
            os.close(self.devnull)
            self.devnull = high
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.poller = select.poll()
        self.exec_poller = select.poll()
        self.poller.register(self.control.fileno(), select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        self.signal_numbers = frozenset(int(s) for s in signal.valid_signals())
        # The daemon: it started this process. Its notify sockets carry its pid.
        self.lazyd_pid = os.getppid()
        # Our credentials never change.
        self.own_groups = sorted(set(os.getgroups()))
        self.own_uids = os.getresuid()
        self.own_gids = os.getresgid()
        # What may be started: service name -> how. Once sealed, only a reload
        # (which reads `config` itself, as this process's user) changes it.
        self.table: dict[str, _Launch] = {}
        self.sealed = False
        self.config: str | None = None  # the config file a reload reads
        self.path = os.defpath  # PATH for the table reader, as lazyd's own
        self.nofile_soft: int | None = None
        self.reading: _Reader | None = None  # the table reader of a reload under way
        self.pending: dict[str, _Launch] | None = None  # read by a reload, not committed

    def run(self) -> None:
        """Serve requests until the daemon's end closes; then kill what is left."""
        signal.set_wakeup_fd(self.wake_w)
        for sig in _HANDLED:
            signal.signal(sig, _on_signal)
        try:
            while True:
                for fd, _events in self.poller.poll():
                    if fd == self.wake_r:
                        while _read_some(self.wake_r):
                            pass
                        self.reap()
                    elif fd == self.control.fileno():
                        if not self.handle_request():
                            return
                    elif fd in self.in_flight:
                        self.confirm(self.in_flight[fd])
                    elif self.reading is not None and fd == self.reading.fd:
                        self.read_table(self.reading)
        except _Gone:
            return
        finally:
            self.kill_all()

    # -- requests ----------------------------------------------------------

    def handle_request(self) -> bool:
        """Read and answer one request; False once the daemon's end is closed."""
        try:
            data, ancdata, flags, _ = self.control.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * _FD_BYTES), socket.MSG_CMSG_CLOEXEC
            )
        except (ConnectionResetError, BrokenPipeError):
            return False
        fds = received_fds(ancdata)
        if not data and not fds:
            return False  # EOF (lazyd never sends an empty message)
        request_id: int | None = None
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise BadRequest(f"message too long (limit {MAX_MESSAGE} bytes, {MAX_FDS} fds)")
            try:
                header = json.loads(data)
            except (ValueError, RecursionError):
                raise BadRequest("not a JSON message") from None
            if not isinstance(header, dict):
                raise BadRequest("not a JSON object")
            request_id = _int(header, "id", 0, MAX_ID)
            op = header.get("op")
            if op == "spawn":
                self.spawn(request_id, header, fds)
                return True  # answered once exec succeeds or fails
            if op == "signal":
                if fds:
                    raise BadRequest("signal takes no fds")
                self.signal(header)
                self.send({"id": request_id, "ok": True})
                return True
            if fds and op in ("define", "reload", "commit"):
                raise BadRequest(f"{op} takes no fds")
            if op == "define":
                self.define(header)
                self.send({"id": request_id, "ok": True})
                return True
            if op == "reload":
                self.reload(request_id, header)
                return True  # answered once the table is read
            if op == "commit":
                if set(header) - {"op", "id"}:
                    raise BadRequest("commit takes no fields")
                if self.pending is None:
                    raise BadRequest("no table read by a reload to commit")
                self.table, self.pending = self.pending, None
                self.send({"id": request_id, "ok": True})
                return True
            raise BadRequest(f"unknown op {op!r}")
        except _Gone:
            raise
        except BadRequest as exc:
            self.fail(request_id, "request", 0, str(exc))
        except Exception as exc:  # never crash on one request: say what went wrong
            self.fail(request_id, "request", 0, f"{type(exc).__name__}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def define(self, header: dict[str, Any]) -> None:
        """Add services to the table; with ``seal``, accept no more definitions."""
        if self.sealed:
            raise BadRequest("the table of services is sealed; only a reload changes it")
        unknown = set(header) - {"op", "id", "services", "config", "path", "nofile_soft", "seal"}
        if unknown:
            raise BadRequest(f"unknown field {sorted(unknown)[0]!r}")
        table = _table(header.get("services"))
        config = header.get("config")
        path = header.get("path")
        seal = header.get("seal", False)
        if not isinstance(seal, bool):
            raise BadRequest("seal must be true or false")
        if len(self.table.keys() | table.keys()) > MAX_SERVICES:
            raise BadRequest(f"more than {MAX_SERVICES} services")
        self.table.update(table)
        if config is not None:
            self.config = _text(config, "config")
        if path is not None:
            self.path = _text(path, "path")
        self.nofile_soft = _optional_int(header, "nofile_soft", 0, 2**63 - 1)
        self.sealed = seal

    def reload(self, request_id: int, header: dict[str, Any]) -> None:
        """Start reading the table anew from the config file, in a fresh interpreter.

        Not from the daemon: after it dropped its privileges, what it says
        about commands and users is not to be trusted. The reader prints the
        table as JSON (see `lazyd.backends.process.launch.print_table`); `read_table` takes it.
        """
        if set(header) - {"op", "id"}:
            raise BadRequest("reload takes no fields")
        if self.config is None:
            raise BadRequest("no config file to reload from")
        if self.reading is not None:
            # The daemon gave up waiting for it (a config on a hung mount):
            # this request replaces it.
            stale, self.reading = self.reading, None
            self.poller.unregister(stale.fd)
            os.close(stale.fd)
            if stale.pid:  # not reaped yet: the pid is still that reader's
                _quietly(os.kill, stale.pid, signal.SIGKILL)
            self.fail(stale.request_id, "reload", 0, "replaced by a newer reload")
        # The directory that holds the lazyd package (lazyd/privileged/ is here).
        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        nofile = -1 if self.nofile_soft is None else self.nofile_soft
        argv = [sys.executable, "-I", "-c", _READ_TABLE, package, self.config, str(nofile)]
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            actions = [(os.POSIX_SPAWN_DUP2, self.devnull, 0), (os.POSIX_SPAWN_DUP2, write_fd, 1)]
            pid = os.posix_spawn(sys.executable, argv, {"PATH": self.path}, file_actions=actions)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.pending = None
        self.reading = _Reader(request_id, pid, read_fd)
        self.poller.register(read_fd, select.POLLIN)

    def read_table(self, reading: _Reader) -> None:
        """The reader's output is readable: at its end, replace the table and reply."""
        chunk = _read_some(reading.fd)
        reading.data += chunk
        if chunk and len(reading.data) <= MAX_TABLE:
            return
        self.poller.unregister(reading.fd)
        os.close(reading.fd)
        self.reading = None  # the reader itself is reaped like any child
        try:
            if len(reading.data) > MAX_TABLE:
                raise BadRequest(f"the table exceeds {MAX_TABLE} bytes")
            try:
                answer = json.loads(reading.data)
            except (ValueError, RecursionError):
                raise BadRequest("the table reader failed (see lazyd's log)") from None
            if not isinstance(answer, dict):
                raise BadRequest("the table reader printed no object")
            if "problems" in answer:
                problems = answer["problems"]
                if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
                    raise BadRequest("the table reader printed bad problems")
                self.send({"id": reading.request_id, "error": "reload: the config has errors",
                           "stage": "reload", "errno": 0, "problems": problems})
                return
            table = _table(answer.get("services"))
        except BadRequest as exc:
            self.fail(reading.request_id, "reload", 0, str(exc))
            return
        self.pending = table
        self.send({"id": reading.request_id, "ok": True, "services": sorted(table)})

    def spawn(self, request_id: int, header: dict[str, Any], fds: list[int]) -> None:
        unknown = set(header) - {"op", "id", "service", "env"}
        if unknown:
            raise BadRequest(f"unknown field {sorted(unknown)[0]!r}")
        name = header.get("service")
        request = self.table.get(name) if isinstance(name, str) else None
        if request is None:
            raise BadRequest(f"unknown service {name!r}")
        if len(fds) > MAX_FDS:
            raise BadRequest(f"more than {MAX_FDS} fds")
        for number, fd in enumerate(fds, start=LISTEN_FDS_START):
            # A service is owed sockets only: not a file, pipe or directory
            # the daemon happens to hold, handed to a process that may be root.
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise BadRequest(f"fd {number} is not a socket")
        if request.error is not None:
            self.fail(request_id, "resolve", errno.ENOENT, request.error)
            return
        extra, fds = _spawn_env(str(name), request, header.get("env"), fds, self.lazyd_pid)
        env = {**request.env, **extra}
        if len(self.in_flight_pids) >= MAX_IN_FLIGHT:
            raise BadRequest(f"more than {MAX_IN_FLIGHT} spawns in flight")
        if len(self.children) >= MAX_CHILDREN:
            raise BadRequest(f"more than {MAX_CHILDREN} processes running")
        nofile: tuple[int, int] | None = None
        if request.nofile_soft is not None:
            soft, hard = request.nofile_soft, self.nofile_hard
            if hard != resource.RLIM_INFINITY and soft > hard:
                soft = hard  # a soft limit above the hard one would make setrlimit fail
            nofile = (soft, hard)
        # Only what differs from ours is changed (decided here, where it costs
        # less than in the child): an unprivileged spawner may still start a
        # service as its own user, which setgroups would refuse (EPERM).
        creds = _Credentials(None, None, None)
        if request.groups is not None and sorted(set(request.groups)) != self.own_groups:
            creds.groups = request.groups
        if request.gid is not None and (request.gid,) * 3 != self.own_gids:
            creds.gid = request.gid
        if request.uid is not None and (request.uid,) * 3 != self.own_uids:
            creds.uid = request.uid
        end = LISTEN_FDS_START + len(fds)
        out_r = err_r = -1
        # The child's pipe ends, and temporary copies: ours are closed after the
        # fork (the error pipe's must be, for its EOF to mean "exec'd").
        ours: list[int] = []
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            ours.append(out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            ours.append(err_w)
            # The child first fills 3..end-1; what it needs after that lives above.
            out_w, err_w, devnull = (_above(fd, end, ours) for fd in (out_w, err_w, self.devnull))
            parent = os.getpid()
            try:
                pid = os.fork()
            except OSError as exc:
                self.fail(request_id, "fork", exc.errno or 0, os.strerror(exc.errno or 0))
                pid = -1
            if pid == 0:
                _child(
                    request, env, creds, fds, devnull, out_w, err_w, self.fd_limit, nofile, parent
                )
        except BaseException:
            pid = -1
            raise
        finally:
            for fd in ours:
                os.close(fd)
            if pid < 0:
                for fd in (out_r, err_r):
                    if fd >= 0:
                        os.close(fd)
        if pid < 0:
            return
        # Sleep until the child has exec'd (or failed), before any bookkeeping:
        # with one CPU, that lets the child run at once rather than after us.
        # It usually takes well under a millisecond.
        self.exec_poller.register(err_r, select.POLLIN)
        exec_done = self.exec_poller.poll(self.exec_wait_ms)
        self.exec_poller.unregister(err_r)
        self.children[pid] = False
        spawned = _InFlight(request_id, pid, out_r, err_r)
        self.in_flight_pids[pid] = spawned
        if exec_done:
            self.confirm(spawned)
        else:
            self.in_flight[err_r] = spawned
            self.poller.register(err_r, select.POLLIN)

    def confirm(self, spawned: _InFlight) -> None:
        """The error pipe is readable: EOF means exec succeeded, bytes that it failed."""
        try:
            report = os.read(spawned.err_r, MAX_ERROR)
        except BlockingIOError:
            return  # spurious wakeup; the child still runs
        if self.in_flight.pop(spawned.err_r, None) is not None:
            self.poller.unregister(spawned.err_r)
        os.close(spawned.err_r)
        del self.in_flight_pids[spawned.pid]
        try:
            if report:
                # "ERRNO STAGE EXCEPTION", as written by _child.
                code, stage, name = [*report.decode(errors="replace").split(" ", 2), "", ""][:3]
                errno = int(code) if code.isdigit() else 0
                self.fail(spawned.request_id, stage, errno, os.strerror(errno) if errno else name)
            else:
                self.send({"id": spawned.request_id, "pid": spawned.pid}, [spawned.out_r])
                if spawned.pid in self.children:
                    self.children[spawned.pid] = True
        finally:
            os.close(spawned.out_r)

    def signal(self, header: dict[str, Any]) -> None:
        pid = _int(header, "pid", 1, 2**31 - 1)
        sig = _int(header, "signal", 1, 255)
        group = header.get("group")
        if sig not in self.signal_numbers:
            raise BadRequest(f"no signal {sig}")
        if not isinstance(group, bool):
            raise BadRequest("group must be true or false")
        # Only processes the daemon knows from us and that we have not reaped:
        # such a pid (and, since each leads its own group, that group id) cannot
        # belong to anyone else yet.
        if not self.children.get(pid, False):
            raise BadRequest(f"pid {pid} is not a running process of this spawner")
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except OSError as exc:
            raise BadRequest(f"pid {pid}: {os.strerror(exc.errno or 0)}") from None

    # -- children ----------------------------------------------------------

    def reap(self) -> None:
        """Reap every exited child; report the services' exits."""
        while True:
            try:
                # WNOWAIT: look, but leave the zombie, so that its pid stays reserved.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if pid in self.children:
                _quietly(os.killpg, pid, signal.SIGKILL)  # what the service left behind
            _, status = os.waitpid(pid, 0)
            if self.reading is not None and self.reading.pid == pid:
                # Its output may still be unread; its pid is free for anyone now.
                self.reading.pid = 0
            spawned = self.in_flight_pids.get(pid)
            if spawned is not None:
                # The child is gone, so its error pipe is at EOF or holds its error:
                # the spawn reply goes out before the exit notice.
                self.confirm(spawned)
            if self.children.pop(pid, False):
                self.send({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})

    def kill_all(self) -> None:
        """SIGKILL every process group started here; reap them all."""
        for pid in self.children:
            _quietly(os.killpg, pid, signal.SIGKILL)
            _quietly(os.kill, pid, signal.SIGKILL)  # in case it had not called setsid yet
        for pid in list(self.children):
            _quietly(os.waitpid, pid, 0)
        self.children.clear()

    # -- replies -----------------------------------------------------------

    def fail(self, request_id: int | None, stage: str, errno: int, message: str) -> None:
        self.send(
            {"id": request_id, "error": f"{stage}: {message}", "stage": stage, "errno": errno}
        )

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        ancdata = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            # Blocking: the daemon always reads; should it hang, so may we.
            self.control.sendmsg([data], ancdata, socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError):
            raise _Gone() from None


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS message carried (already close-on-exec, as received)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_BYTES])
    return list(fds)


def _above(fd: int, low: int, temporaries: list[int]) -> int:
    """`fd`, or a close-on-exec copy of it at `low` or above (added to `temporaries`)."""
    if fd >= low:
        return fd
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    temporaries.append(copy)
    return copy


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def _quietly(fn: Any, *args: Any) -> None:
    with contextlib.suppress(OSError):
        fn(*args)


def _on_signal(signum: int, frame: object) -> None:
    """Nothing to do here: SIGCHLD's byte on the wakeup fd wakes the poll loop,
    and SIGINT, SIGTERM and SIGHUP are not for the spawner (see the module's
    docstring)."""


def _setup_signals() -> None:
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            # (ValueError/OSError: one the C library keeps for itself.)
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
    # Whatever lazyd's thread had blocked is not inherited by the services.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def main(exec_wait_ms: int = EXEC_WAIT_MS) -> None:
    """Entry point: serve the socket at fd 0 until the daemon closes its end."""
    _setup_signals()
    # Keep 1 and 2 taken: should lazyd have started us with them closed, a
    # received socket landing there would get this process's stray output.
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    control = socket.socket(fileno=CONTROL_FD)
    if control.type != socket.SOCK_SEQPACKET or control.family != socket.AF_UNIX:
        sys.exit("lazyd spawner: fd 0 must be an AF_UNIX SOCK_SEQPACKET socket")
    control.set_inheritable(False)
    control.setblocking(True)
    # Everything allocated so far lives as long as we do: keep the collector
    # from walking (and so, in a fresh child, copying) the pages it sits on.
    gc.freeze()
    Spawnerd(control, exec_wait_ms).run()
    control.close()


if __name__ == "__main__":
    main()
