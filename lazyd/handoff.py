"""Handing listening sockets to a service the way sd_listen_fds(3) expects.

A service started in pass mode finds its sockets at fds 3, 4, ... (config order)
and three variables describing them:

    LISTEN_FDS=N            how many fds start at 3
    LISTEN_PID=PID          the pid they are meant for: the process that execs the service
    LISTEN_FDNAMES=a:b:...  their names, in the same order

Everything here is plain `os`: `make_preexec` builds the function that
`subprocess` runs in the forked child between fork and exec, and that child
must not need an event loop. `lazyd.launch` does the spawning.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import signal
from collections.abc import Callable, Mapping, Sequence

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START

# Variables that belong to the protocol between lazyd and the service: whatever the
# config says about them is replaced, so a service never sees a stale or forged value.
PROTOCOL_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


def _find_clearenv() -> Callable[[], int] | None:
    # os.environ is a snapshot taken at start-up: a variable that C code put in
    # the real environment with setenv(3) is not in it, and clearing os.environ
    # leaves such a variable behind (under pytest, something sets LINES and
    # COLUMNS that way). clearenv(3) empties the C environment itself. Resolved
    # here, at import, so the child only makes the call.
    try:
        clearenv: Callable[[], int] = ctypes.CDLL(None).clearenv
    except (OSError, AttributeError):
        return None
    return clearenv


_clearenv = _find_clearenv()


def arrange_fds(fds: Sequence[int]) -> None:
    """Make fd 3+i refer to what ``fds[i]`` referred to, inheritable, for every i.

    Meant for a freshly forked child. Works for any input: sources inside the
    target range 3..3+N-1, a source listed twice, sources below 3. The source
    fds themselves are left open (``close_fds`` closes them before exec).
    """
    n = len(fds)
    if n == 0:
        return
    end = LISTEN_FDS_START + n
    # A plain `dup2(fds[i], 3+i)` loop clobbers any source that already sits at a
    # target it reaches first: sources [4, 3] would turn into [4, 4]. So every
    # source is first copied to a number at or above the end of the range, where
    # no dup2 below can touch it, and only then copied into place. The copies are
    # close-on-exec, so even if something fails halfway they cannot leak into the
    # service.
    moved: dict[int, int] = {}
    try:
        for fd in fds:
            if fd not in moved:
                moved[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, end)
        for i, fd in enumerate(fds):
            # The temporary never equals the target (it is >= end), so dup2 always
            # really duplicates and therefore clears FD_CLOEXEC on the target; a
            # dup2 onto itself would be a no-op that leaves the flag set.
            os.dup2(moved[fd], LISTEN_FDS_START + i, inheritable=True)
    finally:
        for temporary in moved.values():
            os.close(temporary)


def service_environment(
    *,
    path: str,
    environment: Mapping[str, str],
    fd_names: Sequence[str],
    notify_socket: str | None,
) -> dict[str, str]:
    """The whole environment a service starts with, except LISTEN_PID.

    PATH, the configured `environment` (which may override PATH), LISTEN_FDS and
    LISTEN_FDNAMES when there are sockets, NOTIFY_SOCKET when given. LISTEN_PID is
    only known in the child (see `make_preexec`). Raises ValueError for a name
    or value the C environment cannot hold, or an fd name LISTEN_FDNAMES cannot.
    """
    env = {"PATH": path}
    for key, value in environment.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"environment variable {key!r} cannot be set")
        if key not in PROTOCOL_VARIABLES:
            env[key] = value
    if fd_names:
        for name in fd_names:
            # sd_listen_fds_with_names(3) splits on ':'; systemd also refuses
            # names longer than 255 characters or with control characters.
            if not name or ":" in name or len(name) > 255 or not name.isprintable():
                raise ValueError(f"socket name {name!r} cannot be passed in LISTEN_FDNAMES")
        env["LISTEN_FDS"] = str(len(fd_names))
        env["LISTEN_FDNAMES"] = ":".join(fd_names)
    if notify_socket is not None:
        env["NOTIFY_SOCKET"] = notify_socket
    return env


class TargetRangeBusy(Exception):
    """An fd in 3..3+N-1 still belongs to the process that forked us (see make_preexec)."""


def make_preexec(
    fds: Sequence[int], env: Mapping[str, str], nofile_soft: int | None
) -> Callable[[], None]:
    """The `preexec_fn` that turns a forked child of lazyd into a service's process.

    It moves `fds` to 3, 4, ..., replaces the C environment with `env` plus
    LISTEN_PID (the child's own pid, when there are fds), restores the
    RLIMIT_NOFILE soft limit `nofile_soft` (None leaves it as inherited) and
    unblocks every signal. Use it with ``close_fds=True``,
    ``pass_fds=range(3, 3 + len(fds))`` and ``env=None``: subprocess then execs
    with the environment set here and closes every other fd. It raises
    TargetRangeBusy (so subprocess reports a failure) when subprocess's error
    pipe sits in 3..3+N-1, rather than overwrite it.
    """
    fds = tuple(fds)
    n = len(fds)
    clean_env = dict(env)
    # Work that allocates or may fail is done here, in the parent, so the child
    # does as little as possible between fork and exec.
    soft_hard: tuple[int, int] | None = None
    if nofile_soft is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = nofile_soft
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            soft = hard  # a soft limit above the hard one would make setrlimit fail
        soft_hard = (soft, hard)

    def preexec() -> None:
        # CPython's child runs, in this order: pass_fds made inheritable (every fd
        # in 3..3+N-1, except subprocess's own error pipe, which stays
        # close-on-exec), stdio dup'd onto 0-2, chdir, setsid, setgroups,
        # setregid, setreuid, then this function, then close_fds, then exec.
        #
        # So this runs with the service's credentials, which is fine for
        # everything below: dup2 and fcntl need no privilege, and lowering (or
        # raising up to the hard limit) the soft RLIMIT_NOFILE is allowed.
        #
        # The error pipe is how the parent learns that exec failed, and it has
        # to survive until exec. If it had been allocated inside 3..3+N-1,
        # arrange_fds would overwrite it: the parent would then read EOF and
        # report success for a child that may still fail. lazyd.launch keeps
        # the range occupied in the parent so that cannot happen, but other
        # code in lazyd may close an fd there in the meantime. It is recognisable:
        # after make_inheritable, the only close-on-exec fd in the range is the
        # error pipe. Raising here reports the failure through the intact pipe
        # and the parent tries again.
        #
        # First, though, detach trio's signal wakeup fd: its number may be
        # about to become one of the service's sockets, and a signal arriving
        # before exec would make Python's C handler write a byte to it.
        signal.set_wakeup_fd(-1)
        for target in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
            try:
                flags = fcntl.fcntl(target, fcntl.F_GETFD)
            except OSError:
                continue  # a free number: nothing to overwrite
            if flags & fcntl.FD_CLOEXEC:
                raise TargetRangeBusy(target)
        arrange_fds(fds)
        # close_fds runs after us and keeps exactly pass_fds (3..3+N-1) and the
        # error pipe (close-on-exec): the sources and every other fd of lazyd go.

        # With env=None subprocess calls execv, which uses the C `environ`. In
        # the child, os.environ changes go through putenv/unsetenv, so once the
        # C environment is empty (see _find_clearenv), filling os.environ leaves
        # exactly the clean environment.
        if _clearenv is not None:
            _clearenv()
        os.environ.clear()
        os.environ.update(clean_env)
        if n:
            # As systemd's activate.c does: set in the process that execs, so it
            # equals the pid the service sees as its own.
            os.environ["LISTEN_PID"] = str(os.getpid())

        if soft_hard is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, soft_hard)
        # A service starts with no signal blocked, whatever the thread that forked
        # us had blocked; handlers are reset by exec itself.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

    return preexec
