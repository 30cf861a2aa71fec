"""Handing listening sockets to a service the way sd_listen_fds(3) expects.

A service started in pass mode finds its sockets at fds 3, 4, ... (config order)
and three variables describing them:

    LISTEN_FDS=N            how many fds start at 3
    LISTEN_PID=PID          the pid they are meant for: the process that execs the service
    LISTEN_FDNAMES=a:b:...  their names, in the same order

`service_environment` builds everything but LISTEN_PID, in the daemon.
`arrange_fds` moves the sockets into place: its first half (`lift_sources`) in
the spawner (`lazyd.privileged.spawnerd`) before it forks, its second
(`place_fds`) in the forked child, which is also where LISTEN_PID is set.
`socket_identity` (built by `identity`) and `notify_socket_name` are what the spawner checks a
spawn request's sockets and NOTIFY_SOCKET against (see `lazyd.privileged.spawnerd`).
This module is imported by the spawner, so it imports only `fcntl`, `os` and
`socket`, which the spawner needs anyway.
"""

from __future__ import annotations

import fcntl
import os
import socket

TYPE_CHECKING = False  # not from typing, which the spawner would have to import
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START

# Variables that belong to the protocol between lazyd and the service: whatever the
# config says about them is replaced, so a service never sees a stale or forged value.
PROTOCOL_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


def arrange_fds(fds: Sequence[int]) -> None:
    """Make fd 3+i refer to what ``fds[i]`` referred to, inheritable, for every i.

    Meant for a freshly forked child. Works for any input: sources inside the
    target range 3..3+N-1, a source listed twice, sources below 3. The source
    fds themselves are left open (the caller closes everything above the range
    before exec). Every fd number in 3..3+N-1 is overwritten, whatever it held.
    It is `lift_sources` and then `place_fds`; the spawner does the first half
    in the parent, before it forks, so that the child has less to do.
    """
    temporaries: list[int] = []
    try:
        place_fds(lift_sources(fds, temporaries))
    finally:
        for temporary in temporaries:
            os.close(temporary)


def lift_sources(fds: Sequence[int], temporaries: list[int]) -> list[int]:
    """`fds`, each one below 3+len(fds) replaced by a close-on-exec copy at or above it.

    The copies are appended to `temporaries` (the caller closes them). What comes
    back is safe for `place_fds`: no source sits in the target range 3..3+N-1.
    """
    end = LISTEN_FDS_START + len(fds)
    # A plain `dup2(fds[i], 3+i)` loop clobbers any source that already sits at a
    # target it reaches first: sources [4, 3] would turn into [4, 4]. So every
    # source below the end of the range is first copied to a number at or above
    # it, where no dup2 of `place_fds` can touch it. The copies are close-on-exec,
    # so even if something fails halfway they cannot leak into the service.
    moved: dict[int, int] = {}
    lifted = []
    for fd in fds:
        if fd >= end:
            lifted.append(fd)
            continue
        if fd not in moved:
            moved[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, end)
            temporaries.append(moved[fd])
        lifted.append(moved[fd])
    return lifted


def place_fds(sources: Sequence[int]) -> None:
    """Make fd 3+i refer to what ``sources[i]`` refers to, inheritable.

    Every source must be at or above 3+len(sources) (`lift_sources`), so that
    no dup2 here overwrites a source still to be copied. A source is never
    its own target, so dup2 always really duplicates and therefore clears
    FD_CLOEXEC on the target (a dup2 onto itself would be a no-op that leaves
    the flag set). One system call per socket: this runs between fork and exec.
    """
    number = LISTEN_FDS_START
    for fd in sources:
        os.dup2(fd, number)
        number += 1


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
    only known in the child (the spawner sets it there). Raises ValueError for a
    name or value the C environment cannot hold, or an fd name LISTEN_FDNAMES cannot.
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


# What a service name keeps in its notify socket's name; the rest becomes '_'.
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:+-")
_SUN_PATH_MAX = 107  # sizeof(sun_path) minus the leading NUL of an abstract name
NOTIFY_TOKEN_LENGTH = 8  # hex digits of randomness at the end of a notify socket's name


def notify_socket_name(service: str, lazyd_pid: int, token: str) -> str:
    """The abstract name (without its NUL or '@') of `service`'s notify socket.

    ``lazyd/<lazyd pid>/<service>/<token>``: the service name with characters
    outside ``A-Za-z0-9._:+-`` replaced by '_' and cut to fit sun_path. The
    name is a label for people reading ``ss -xl``; the random token makes it
    unique and unguessable. The spawner rebuilds it to check that a spawn's
    NOTIFY_SOCKET names the daemon's socket for that very service.
    """
    prefix = f"lazyd/{lazyd_pid}/"
    suffix = f"/{token}"
    room = _SUN_PATH_MAX - len(prefix) - len(suffix)
    label = "".join(c if c in _NAME_CHARS else "_" for c in service)
    return prefix + label[:room] + suffix


# The fields of a socket's identity, as `identity` spells them; the helper's
# table describes each socket a service is handed with these and its name.
SOCKET_IDENTITY_FIELDS = ("family", "type", "address", "listening", "connected")


def identity(
    family: int, kind: int, address: object, *, listening: bool, connected: bool
) -> dict[str, object]:
    """A socket's identity (see `socket_identity`) from its parts."""
    return dict(zip(SOCKET_IDENTITY_FIELDS, (family, kind, address, listening, connected),
                    strict=True))


def socket_identity(fd: int) -> dict[str, object]:
    """What a socket is, as the spawner compares it with its table of services.

    ``{"family", "type", "address", "listening", "connected"}``: the address
    it is bound to as ``[host, port]`` for IP, a path, ``@name`` (abstract)
    or ``""`` (unnamed) for Unix. Raises OSError for an fd that is no socket.
    """
    sock = socket.socket(fileno=fd)
    try:
        family, kind = int(sock.family), int(sock.type)
        name = sock.getsockname()
        if isinstance(name, tuple):
            address: object = [name[0], name[1]]
        elif isinstance(name, bytes):
            # An abstract name comes back as bytes with its leading NUL.
            text = name.decode(errors="surrogateescape")
            address = "@" + text[1:] if text.startswith("\0") else text
        else:
            address = name
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        try:
            sock.getpeername()
            connected = True
        except OSError:
            connected = False
    finally:
        sock.detach()
    return identity(family, kind, address, listening=listening, connected=connected)
