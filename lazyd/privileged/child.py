"""The child side of a spawn: between fork and exec, turn the forked helper into the service.

`run_child` runs in the freshly forked copy of the helper and never returns:
it either execs the service or writes why not to its error pipe and exits.
Everything that can be done in the parent is done there (`Credentials` says
only what differs from the helper's own): on a fork, every page this code
writes to is copied first, and that is most of its cost.  The error pipe is
close-on-exec, so its EOF tells the parent that exec succeeded; what a
failure writes there is `failure_report`'s to write and `read_failure`'s to
read, nothing else.

Standard library only, and not even `typing` (see `lazyd.privileged`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import signal

from lazyd.privileged.handoff import LISTEN_FDS_START, lift_sources, place_fds

TYPE_CHECKING = False  # not from typing, which the helper would have to import
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

    from lazyd.privileged.entries import ProcessEntry

MAX_ERROR = 512  # bytes a failed child writes to its error pipe, at most

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class Credentials:
    """What a child must change: None for what it keeps."""

    __slots__ = ("gid", "groups", "uid")

    def __init__(self, uid: int | None, gid: int | None, groups: list[int] | None) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups


class ForkError(Exception):
    """fork(2) failed; `errno` says why."""

    def __init__(self, number: int) -> None:
        super().__init__(os.strerror(number))
        self.errno = number


def fork_child(
    entry: ProcessEntry,
    env: dict[str, str],
    creds: Credentials,
    fds: Sequence[int],
    devnull: int,
    fd_limit: int,
    nofile: tuple[int, int] | None,
) -> tuple[int, int, int]:
    """Fork a child that becomes `entry`'s service (`run_child`); in the parent,
    (pid, the read end of its output pipe, the read end of its error pipe).

    The error pipe's read end is non-blocking; the child's ends are closed
    here, so that its EOF means "exec'd". Raises ForkError when fork(2)
    fails, OSError when a pipe cannot be made.
    """
    end = LISTEN_FDS_START + len(fds)
    out_r = err_r = -1
    pid = -1
    # The child's pipe ends, and temporary copies: ours are closed after the
    # fork (the error pipe's must be, for its EOF to mean "exec'd").
    ours: list[int] = []
    try:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        ours.append(out_w)
        err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        ours.append(err_w)
        # The child first fills 3..end-1; what it needs after that lives above,
        # and so do the sockets it copies there (half of `arrange_fds`, done
        # here: whatever the child runs is paid for in copied pages).
        out_w, err_w, devnull = (_above(fd, end, ours) for fd in (out_w, err_w, devnull))
        sources = lift_sources(fds, ours)
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            raise ForkError(exc.errno or 0) from None
        if pid == 0:
            run_child(entry.executable, entry.argv, env, creds, sources, devnull, out_w, err_w,
                      fd_limit, entry.workdir, nofile, parent)
    finally:
        for fd in ours:
            os.close(fd)
        if pid < 0:
            for fd in (out_r, err_r):
                if fd >= 0:
                    os.close(fd)
    return pid, out_r, err_r


def _above(fd: int, low: int, temporaries: list[int]) -> int:
    """`fd`, or a close-on-exec copy of it at `low` or above (added to `temporaries`)."""
    if fd >= low:
        return fd
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    temporaries.append(copy)
    return copy


def prepare_child_fds(
    sources: Sequence[int], devnull: int, out_w: int, keep: int, fd_limit: int
) -> None:
    """In a forked child: sockets at 3.., /dev/null at 0, `out_w` at 1 and 2.

    `sources`, `devnull`, `out_w` and `keep` must be at or above
    3+len(sources) (the parent puts them there: `lift_sources`, `_above`), so
    that nothing below overwrites them. Afterwards every fd from
    3+len(sources) up to `fd_limit` is closed except `keep` (the error pipe,
    which is close-on-exec).
    """
    place_fds(sources)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    # close_range(2) where the interpreter has it: one call, whatever the limit.
    os.closerange(LISTEN_FDS_START + len(sources), keep)
    os.closerange(keep + 1, max(fd_limit, keep + 1))


def run_child(
    executable: str,
    argv: list[str],
    env: dict[str, str],
    creds: Credentials,
    sources: Sequence[int],
    devnull: int,
    out_w: int,
    err_w: int,
    fd_limit: int,
    workdir: str | None,
    nofile: tuple[int, int] | None,
    parent: int,
) -> NoReturn:
    """Between fork and exec: turn this child into the service. Never returns.

    Everything here is paid for twice, in the work itself and in the pages
    of the helper it writes to, which the kernel copies first (a spawn's
    child touches ~150 of them): so it runs no more Python than it must, and
    whatever can be decided in the parent is decided there. What cannot be:
    LISTEN_PID (this process's own pid) and the parent-death signal, which
    only the process itself can set, after its credentials; so a child
    without Python (`_posixsubprocess.fork_exec`, `posix_spawn`) could not
    start a service as it must be started.

    Signal dispositions need no work (the helper handles, rather than
    ignores, the signals it does not leave at their default, and exec resets
    handled ones); the mask is empty.
    """
    stage = "setsid"
    try:
        # A signal arriving before exec runs the helper's C handler, which
        # writes to the wakeup fd: detach it, as its number is about to be
        # closed and could be reused.
        signal.set_wakeup_fd(-1)
        os.setsid()
        stage = "fds"
        prepare_child_fds(sources, devnull, out_w, err_w, fd_limit)
        # Only what differs from the helper's own (see Spawnerd.spawn).
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
        # Should the helper itself be killed, the service dies with it
        # instead of outliving it unsupervised, holding lazyd's sockets. Only
        # after the credentials: changing them clears the parent-death signal.
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # killed already, before the prctl
            raise OSError(errno.ESRCH, "the spawner is gone")
        if workdir is not None:
            stage = "chdir"
            os.chdir(workdir)
        if nofile is not None:
            stage = "rlimit"
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        if sources:
            # As systemd's activate.c does: set in the process that execs, so it
            # equals the pid the service sees as its own.
            env["LISTEN_PID"] = str(os.getpid())
        stage = "exec"
        os.execve(executable, argv, env)
    except BaseException as exc:
        os.write(err_w, failure_report(stage, exc))
    finally:
        os._exit(127)


def failure_report(stage: str, exc: BaseException) -> bytes:
    """What a child that failed at `stage` writes to its error pipe: ``ERRNO STAGE EXCEPTION``."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
    return f"{code} {stage} {type(exc).__name__}".encode()[:MAX_ERROR]


def read_failure(report: bytes) -> tuple[str, int, str]:
    """A `failure_report` read back: (stage, errno or 0, the reason as people read it)."""
    code, stage, name = [*report.decode(errors="replace").split(" ", 2), "", ""][:3]
    number = int(code) if code.isdigit() else 0
    return stage, number, os.strerror(number) if number else name
