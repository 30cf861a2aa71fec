"""Starting a service's process and relaying its output.

`open_service_process` starts one service the way systemd would: its sockets
at fds 3.. with the LISTEN_* variables (`lazyd.privileged.handoff`; pass mode only: a
proxied service binds its own port and gets none), a clean environment,
setsid(2) so that it leads its own process group, its user and groups, its
working directory, the original RLIMIT_NOFILE soft limit. What each service
is started with (environment, credentials, the file to exec) is worked out
here, once per config (`table`), and handed to the spawner (`lazyd.backends.process.spawner`),
which forks and execs; a spawn then names the service and adds only its
sockets and its notify socket, which the spawner checks against the table
(the configured addresses and names, `ready: notify`). It returns once exec
has succeeded; the caller owns the `ServiceProcess` (waits for it, closes its
stdout) and relays its output with `relay_output`.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from lazyd.backends.process.spawner import ServiceProcess, Spawner, SpawnError, current_spawner
from lazyd.config import Config, ReadyKind, ServiceConfig, ownership
from lazyd.config.datapath import steered_sockets
from lazyd.errors import ConfigError, LaunchError
from lazyd.net.addresses import Address
from lazyd.privileged import entries, protocol
from lazyd.privileged.handoff import identity, service_environment, socket_identity
from lazyd.readiness.notify import NotifySocket

# The longest line relayed in one piece. A service that writes megabytes without a
# newline must not make lazyd buffer them all.
MAX_LINE = 16 * 1024


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one service process."""

    name: str
    command: Sequence[str]
    fds: Sequence[int] = ()  # passed at 3, 4, ... in this order
    fd_names: Sequence[str] = ()  # LISTEN_FDNAMES, one per fd
    # Where each fd is bound, one per name: what the spawner's table holds and
    # checks every spawn's fds against. Empty: as the fds are (a spec made by
    # hand, for an unsealed table).
    listen: Sequence[Address] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    path: str | None = None  # the service's PATH; None: lazyd's own, else os.defpath
    user: str | None = None  # None: run as lazyd's own user
    group: str | None = None  # None: the user's primary group
    workdir: str | None = None
    notify_socket: NotifySocket | None = None  # given to the service as NOTIFY_SOCKET
    ready_notify: bool = False  # `ready: notify`: it may be given a notify socket
    nofile_soft: int | None = None  # RLIMIT_NOFILE soft limit to restore; None: inherit


@dataclass(frozen=True)
class _Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]


def _credentials(user: str | None, group: str | None) -> _Credentials | None:
    """Resolve user and group in the parent; None means keep lazyd's own."""
    if user is None and group is None:
        return None
    user_name: str | None = None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"unknown user {user!r}") from None
        user_name, uid, gid = entry.pw_name, entry.pw_uid, entry.pw_gid
    else:
        uid, gid = os.geteuid(), os.getegid()
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"unknown group {group!r}") from None
    # The user's supplementary groups, as initgroups(3) would set them (the list
    # includes gid). Without this the service would keep lazyd's, root's.
    groups = (gid,) if user_name is None else tuple(os.getgrouplist(user_name, gid))
    return _Credentials(uid, gid, groups)


def _already(creds: _Credentials) -> bool:
    """Whether an unprivileged lazyd already runs with exactly these credentials.

    setgroups would fail with EPERM then, although nothing needs to change.
    """
    return (
        os.geteuid() != 0
        and creds.uid == os.geteuid()
        and creds.gid == os.getegid()
        and set(creds.groups) <= {creds.gid, *os.getgroups()}
    )


def _resolve_command(command0: str, path: str, workdir: str | None) -> str | None:
    """The absolute file to exec for command0, as execvp in the service would find it.

    A bare name is searched in the service's PATH (not lazyd's). A name with
    a slash is relative to the service's workdir (else to lazyd's own).
    """
    if "/" in command0:
        return os.path.join(workdir or os.getcwd(), command0)
    found = shutil.which(command0, path=path)
    return None if found is None else os.path.abspath(found)


def _reason(exc: SpawnError, workdir: str | None) -> str:
    if exc.stage in ("exec", "resolve"):
        return exc.reason
    if exc.stage == "chdir":
        return f"workdir {workdir}: {exc.reason}"
    return f"{exc.stage}: {exc.reason}"


def entry(spec: LaunchSpec) -> dict[str, Any]:
    """How the spawner is to start `spec`'s service: its entry in the spawner's table.

    Everything but the sockets and NOTIFY_SOCKET, which come with each spawn;
    but what those may be: ``sockets``, what each fd must be (its name, and
    what `socket_identity` says of it), and ``notify``, whether the service
    may be given a notify socket (lazyd's own for it: the spawner checks). A
    service that cannot be started (an unknown user, a program not found)
    gets ``{"error": reason}``, which a spawn of it reports.
    """
    path = spec.path if spec.path is not None else os.environ.get("PATH", os.defpath)
    try:
        env = service_environment(
            path=path, environment=spec.environment, fd_names=(), notify_socket=None
        )
        creds = _credentials(spec.user, spec.group)
    except ValueError as exc:
        return entries.broken_entry(str(exc))
    if not spec.command:
        return entries.broken_entry("the command is empty")
    executable = _resolve_command(spec.command[0], env["PATH"], spec.workdir)
    if executable is None:
        return entries.broken_entry(f"not found in PATH={env['PATH']}")
    if creds is not None and _already(creds):
        creds = None
    return entries.process_entry(
        sockets=_expected_sockets(spec),
        notify=spec.ready_notify or spec.notify_socket is not None,
        executable=executable,
        argv=spec.command,  # argv[0] stays as configured, as with execvp
        env=env,
        uid=None if creds is None else creds.uid,
        gid=None if creds is None else creds.gid,
        groups=None if creds is None else creds.groups,
        workdir=spec.workdir,
        nofile_soft=spec.nofile_soft,
    )


def _expected_sockets(spec: LaunchSpec) -> list[dict[str, object]]:
    """The table's ``sockets``: what each fd of a spawn of `spec` must be."""
    # strict: a spec with as many names as addresses (or fds) is the caller's job.
    if spec.listen:
        return [
            _bound_to(name, address)
            for name, address in zip(spec.fd_names, spec.listen, strict=True)
        ]
    return [
        entries.socket_entry(name, socket_identity(fd))
        for name, fd in zip(spec.fd_names, spec.fds, strict=True)
    ]


def _bound_to(name: str, address: Address) -> dict[str, object]:
    """`socket_identity` of the socket lazyd binds for `address`."""
    # An abstract name keeps its '@', as socket_identity says it.
    bound = address.path if address.is_unix else [address.host, address.port]
    return entries.socket_entry(name, identity(
        int(address.family), int(address.type), bound,
        listening=address.is_stream, connected=False,
    ))


def service_spec(
    service: ServiceConfig,
    nofile_soft: int | None = None,
    *,
    sockets: Sequence[socket.socket] | None = None,
    notify_socket: NotifySocket | None = None,
) -> LaunchSpec:
    """What starting `service` takes: with `sockets` (its own, in config order)
    and `notify_socket`, one start of it; without, its entry in the table.

    Only a mode that hands over sockets (pass) gets them, and only a `ready:
    notify` service its notify socket.
    """
    handed = service.mode.hands_over_sockets
    notify = service.ready.kind is ReadyKind.NOTIFY
    return LaunchSpec(
        name=service.name,
        command=service.command,
        fds=[s.fileno() for s in sockets or ()] if handed else (),
        fd_names=[sc.name for sc in service.sockets] if handed else (),
        listen=[sc.listen for sc in service.sockets] if handed else (),
        environment=service.environment,
        path=service.environment.get("PATH"),
        user=service.user,
        group=service.group,
        workdir=service.workdir,
        notify_socket=notify_socket if notify else None,
        ready_notify=notify,
        nofile_soft=nofile_soft,
    )


def table(config: Config, nofile_soft: int | None = None) -> dict[str, dict[str, Any]]:
    """The spawner's table for `config`: service name -> `entry` (a container
    service's: `lazyd.backends.container.backend.table_entry`), with ``steer``
    for a service on the kernel data path (`lazyd.config.datapath.steered_sockets`)."""
    from lazyd.backends.container.backend import table_entry

    made = {}
    for name, service in config.services.items():
        if service.container is not None:
            made[name] = table_entry(service)
            continue
        made[name] = entry(service_spec(service, nofile_soft))
        if (steer := steered_sockets(service)) and made[name].get("kind") == entries.PROCESS:
            made[name]["steer"] = steer
    return made


def print_table(config_path: str, nofile_soft: int) -> None:
    """Print the spawner's table for the config file as JSON: the spawner's reload.

    The spawner runs this in a fresh interpreter with its own credentials
    (`lazyd.privileged.read_table`): ``{"services": {...}}``, or ``{"problems": [...]}``
    when the config has errors (`lazyd.privileged.protocol.table_answer`,
    `problems_answer`). `nofile_soft` -1 means none.
    """
    from lazyd import config as config_mod

    try:
        if os.geteuid() == 0:
            # Whoever can change the file (or a directory above it) decides what
            # root runs on the next reload: as root, read only a file that no
            # one else can change, by the resolved path that was checked.
            config_path = os.path.realpath(config_path)
            _check_root_only(config_path)
        config = config_mod.load(config_path)
        if any(service.container is not None for service in config.services.values()):
            from lazyd.backends.container.checks import container_problems

            # A container that is missing is a config error, as at start-up;
            # an engine out of reach is not (each start says so).
            missing, _unreachable = container_problems(config)
            if missing:
                raise ConfigError(missing)
    except ConfigError as exc:
        answer = protocol.problems_answer(exc.problems)
    else:
        answer = protocol.table_answer(table(config, None if nofile_soft < 0 else nofile_soft))
    sys.stdout.buffer.write(protocol.encode(answer))
    sys.stdout.flush()


def _check_root_only(path: str) -> None:
    """Raise ConfigError unless only root can change `path` and every directory above it.

    Owner, mode bits and POSIX ACLs all count (`lazyd.config.ownership`): an ACL
    entry letting another user write is as good as the mode letting them.
    Group write is allowed for group root; a directory with the sticky bit
    (/tmp) may be writable by all, as others cannot replace what root owns there.
    """
    problem = ownership.who_else_can_change(path)
    if problem is not None:
        raise ConfigError([
            f"{path}: not reloaded: {problem}; "
            "lazyd, as root, reloads only a config that only root can change"
        ])


async def open_service_process(spec: LaunchSpec, spawner: Spawner | None = None) -> ServiceProcess:
    """Start the service described by `spec`; return once exec has succeeded.

    `spawner` defaults to `current_spawner()`. While the spawner's table is
    not sealed, `spec` is first defined in it (`entry`); once sealed (as in
    the daemon), the spawner starts the service as its table says, and only
    the name, fds, fd_names and notify_socket of `spec` count (and must fit
    the table). The process
    has called setsid(2), so it leads its own process group; it has
    /dev/null as stdin and one pipe (`process.stdout`) for its stdout and
    stderr. The caller owns it: it must wait for it and close
    `process.stdout`. Raises LaunchError (``NAME: cannot start COMMAND:
    reason``) for anything that prevents the start, ValueError when `fds`
    and `fd_names` differ in length (a bug in the caller).
    """
    if not spec.command:
        raise LaunchError(f"{spec.name}: cannot start: the command is empty")
    command0 = spec.command[0]

    def fail(reason: str) -> LaunchError:
        return LaunchError(f"{spec.name}: cannot start {command0}: {reason}")

    if len(spec.fds) != len(spec.fd_names):
        raise ValueError(f"{spec.name}: {len(spec.fds)} fds but {len(spec.fd_names)} names")
    notify = spec.notify_socket
    try:
        env = service_environment(
            path="",
            environment={},
            fd_names=spec.fd_names,
            notify_socket=None if notify is None else notify.address,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    del env["PATH"]  # the table entry has the service's
    if spawner is None:
        spawner = current_spawner()
    try:
        if not spawner.sealed:
            await spawner.define({spec.name: entry(spec)})
        return await spawner.spawn(
            spec.name, env=env, fds=spec.fds, notify_fd=None if notify is None else notify.fileno()
        )
    except SpawnError as exc:
        raise fail(_reason(exc, spec.workdir)) from None


async def relay_output(
    name: str, stream: trio.abc.ReceiveStream, write: Callable[[str], None]
) -> None:
    """Read `stream` to EOF and pass each line to `write` as ``"NAME: line"``.

    Lines are decoded as UTF-8 (bad bytes replaced), without their newline. A
    line longer than MAX_LINE bytes is passed on in pieces; a last line without
    a newline is passed on at EOF.
    """
    prefix = f"{name}: "
    buffer = bytearray()

    def emit(line: bytes, *, ended: bool) -> None:
        if ended and line.endswith(b"\r"):
            line = line[:-1]  # a CRLF line end
        write(prefix + line.decode("utf-8", errors="replace"))

    while True:
        chunk = await stream.receive_some()
        if not chunk:
            break
        buffer += chunk
        start = 0
        while True:
            newline = buffer.find(b"\n", start, start + MAX_LINE + 1)
            if newline >= 0:
                emit(bytes(buffer[start:newline]), ended=True)
                start = newline + 1
            elif len(buffer) - start > MAX_LINE:
                cut = _utf8_cut(buffer, start + MAX_LINE)
                emit(bytes(buffer[start:cut]), ended=False)
                start = cut
            else:
                break
        del buffer[:start]
    if buffer:
        emit(bytes(buffer), ended=False)


def _utf8_cut(buffer: bytearray, cut: int) -> int:
    """`cut`, moved back (by at most 3 bytes) so that it does not split a character."""
    for back in range(4):
        # A continuation byte is 0b10xxxxxx; cutting before one splits a character.
        if buffer[cut - back] & 0xC0 != 0x80:
            return cut - back
    return cut  # not UTF-8 anyway


def write_to_stderr(line: str) -> None:
    """The sink for `relay_output` in the daemon: one line on lazyd's stderr."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
