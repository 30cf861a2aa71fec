"""Starting a service's process, relaying its output, signalling it.

`open_service_process` forks and execs one service the way systemd would: its
sockets at fds 3.. with the LISTEN_* variables (`lazyd.handoff`), a clean
environment, setsid(2) so that it leads its own process group, its user and
groups, its working directory, the original RLIMIT_NOFILE soft limit. It
returns once exec has succeeded; the caller owns the `trio.Process` (waits for it, closes its
stdout) and relays its output with `relay_output`.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import trio

from lazyd.errors import LaunchError
from lazyd.handoff import LISTEN_FDS_START, make_preexec, service_environment

# The longest line relayed in one piece. A service that writes megabytes without a
# newline must not make lazyd buffer them all.
MAX_LINE = 16 * 1024

# A spawn can be spoiled by another thread or coroutine closing an fd in 3..3+N-1 at the wrong
# moment (see _reserve_fd_range). That is rare and detected, so it is worth trying
# again a couple of times before calling it a failure.
SPAWN_ATTEMPTS = 3


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one service process."""

    name: str
    command: Sequence[str]
    fds: Sequence[int] = ()  # passed at 3, 4, ... in this order
    fd_names: Sequence[str] = ()  # LISTEN_FDNAMES, one per fd
    environment: Mapping[str, str] = field(default_factory=dict)
    path: str | None = None  # the service's PATH; None: lazyd's own, else os.defpath
    user: str | None = None  # None: run as lazyd's own user
    group: str | None = None  # None: the user's primary group
    workdir: str | None = None
    notify_socket: str | None = None
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


def _resolve_command(command0: str, path: str) -> str | None:
    """The file to exec for command0, searched in the service's PATH.

    With env=None subprocess searches the *parent's* PATH, so a bare name is
    looked up here. A name with a slash is left alone: it is relative to the
    service's workdir, which only exists as cwd in the child.
    """
    if "/" in command0:
        return command0
    found = shutil.which(command0, path=path)
    return None if found is None else os.path.abspath(found)


@contextmanager
def _reserve_fd_range(n: int) -> Iterator[None]:
    """Keep every fd number in 3..3+n-1 open in lazyd while a child is spawned.

    subprocess allocates its error pipe (and trio the output pipe, and
    subprocess /dev/null for stdin) as lowest free fds. Inside 3..3+n-1 they
    would be hit by arrange_fds in the child, and a free number there makes
    CPython's make_inheritable(pass_fds) fail with EBADF before the child gets
    anywhere. Filling the holes with /dev/null placeholders keeps all of them
    above the range. F_DUPFD allocates the lowest free number at or above its
    argument atomically, so a number another thread takes in the meantime is
    never overwritten.
    """
    end = LISTEN_FDS_START + n
    placeholders: list[int] = []
    try:
        if n:
            devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            placeholders.append(devnull)
            while True:
                fd = fcntl.fcntl(devnull, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START)
                placeholders.append(fd)
                if fd >= end:
                    break
        yield
    finally:
        for fd in placeholders:
            os.close(fd)


@contextmanager
def _sources_above_stdio(fds: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """`fds`, with any of 0, 1, 2 replaced by a copy at 3 or above.

    In the child, subprocess puts /dev/null and the output pipe on 0-2 before
    the preexec function runs, so a socket that lazyd holds at fd 0-2 (it was
    started with stdio closed) would be gone by then.
    """
    copies: dict[int, int] = {}
    try:
        for fd in fds:
            if fd < LISTEN_FDS_START and fd not in copies:
                copies[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START)
        yield tuple(copies.get(fd, fd) for fd in fds)
    finally:
        for fd in copies.values():
            os.close(fd)


# One spawn at a time: a spawn closes its placeholders while another one's child
# may still be relying on them.
_spawn_lock = trio.Lock()


def _reason(exc: OSError, workdir: str | None) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if workdir is not None and exc.filename == workdir:
        # subprocess names the cwd for every failure before exec; chdir is the
        # one that can fail for a root parent.
        return f"workdir {workdir}: {reason}"
    return reason


async def open_service_process(spec: LaunchSpec) -> trio.Process:
    """Start the service described by `spec`; return once exec has succeeded.

    The process has called setsid(2), so it leads its own process group; it
    has /dev/null as stdin and one pipe (`process.stdout`) for its stdout and
    stderr. The caller owns it: it must wait for it and close `process.stdout`.
    Raises LaunchError for anything that prevents the start, ValueError when
    `fds` and `fd_names` differ in length (a bug in the caller).
    """
    if not spec.command:
        raise LaunchError(f"{spec.name}: cannot start: the command is empty")
    command0 = spec.command[0]

    def fail(reason: str) -> LaunchError:
        return LaunchError(f"{spec.name}: cannot start {command0}: {reason}")

    if len(spec.fds) != len(spec.fd_names):
        raise ValueError(f"{spec.name}: {len(spec.fds)} fds but {len(spec.fd_names)} names")
    path = spec.path if spec.path is not None else os.environ.get("PATH", os.defpath)
    try:
        env = service_environment(
            path=path,
            environment=spec.environment,
            fd_names=spec.fd_names,
            notify_socket=spec.notify_socket,
        )
        creds = _credentials(spec.user, spec.group)
    except ValueError as exc:
        raise fail(str(exc)) from None
    executable = _resolve_command(command0, env["PATH"])
    if executable is None:
        raise fail(f"not found in PATH={env['PATH']}")
    n = len(spec.fds)
    if creds is None or _already(creds):
        creds = None

    async with _spawn_lock:
        for attempt in range(1, SPAWN_ATTEMPTS + 1):
            with _sources_above_stdio(spec.fds) as sources, _reserve_fd_range(n):
                try:
                    return await trio.lowlevel.open_process(
                        # argv[0] stays as configured, as with execvp; the file
                        # exec'd is `executable`.
                        list(spec.command),
                        executable=executable,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        # One pipe for both keeps the order of lines between them.
                        stderr=subprocess.STDOUT,
                        close_fds=True,
                        pass_fds=tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + n)),
                        # The environment is installed by the preexec function;
                        # env=None makes subprocess exec with the child's own.
                        env=None,
                        preexec_fn=make_preexec(sources, env, spec.nofile_soft),
                        start_new_session=True,
                        cwd=spec.workdir,
                        user=None if creds is None else creds.uid,
                        group=None if creds is None else creds.gid,
                        extra_groups=None if creds is None else list(creds.groups),
                    )
                except subprocess.SubprocessError:
                    # The preexec function failed: the error pipe was in the fd
                    # range after all (see handoff.make_preexec), or dup/setrlimit
                    # failed. Nothing was exec'd, so trying again is harmless.
                    if attempt == SPAWN_ATTEMPTS:
                        raise fail("the child could not be prepared") from None
                except OSError as exc:
                    # EBADF: an fd in the range was closed by someone else before
                    # the child made it inheritable; the same race as above.
                    if exc.errno == errno.EBADF and attempt < SPAWN_ATTEMPTS:
                        continue
                    raise fail(_reason(exc, spec.workdir)) from None
    raise AssertionError("unreachable")


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


def signal_group(process: trio.Process, sig: int) -> None:
    """Send `sig` to the service's whole process group (it leads its own).

    A group that no longer exists is not an error. The group id stays reserved
    while any member lives, so this also reaches what the service left behind
    after its main process was reaped.
    """
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
