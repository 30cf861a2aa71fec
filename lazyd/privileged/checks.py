"""What a spawn may hand a service: checked against the sealed table, fd by fd.

After the drop, the daemon may be an attacker's.  A spawn request names a
service of the table and adds only what cannot be known in advance: its
sockets (as fds) and its notify socket.  `spawn_env` makes sure that each is
the one the table describes, so that a daemon taken over can neither hand a
service any other socket nor point its notifications anywhere else, such as
systemd's own notify socket:

- each fd must be the socket the table says (its family, type, the address
  it is bound to, listening or not, unconnected), and there must be as many
  as the table lists;
- ``env`` may add only LISTEN_FDS and LISTEN_FDNAMES (which must be the
  table's count and names) and, for a ``notify`` service, NOTIFY_SOCKET:
  only lazyd's own notify socket for that service, ``@`` +
  `lazyd.privileged.handoff.notify_socket_name` with the daemon's pid
  (the helper's parent); the socket itself goes as one more fd after the
  sockets, as proof that the daemon holds it (it is not passed on).

Standard library only, and not even `typing` (see `lazyd.privileged`).
"""

from __future__ import annotations

import socket

from lazyd.privileged.entries import describe_socket
from lazyd.privileged.fields import ProtocolError
from lazyd.privileged.handoff import (
    LISTEN_FDS_START,
    NOTIFY_TOKEN_LENGTH,
    notify_socket_name,
    socket_identity,
)

TYPE_CHECKING = False  # not from typing, which the helper would have to import
if TYPE_CHECKING:
    from lazyd.privileged.entries import ProcessEntry


def spawn_env(
    name: str, entry: ProcessEntry, env: dict[str, str], fds: list[int], lazyd_pid: int
) -> tuple[dict[str, str], list[int]]:
    """Check a spawn's `env` (well-formed already: `lazyd.privileged.protocol.Spawn`)
    and `fds` against the table; the variables it adds (LISTEN_FDS, LISTEN_FDNAMES,
    NOTIFY_SOCKET) and the fds the service gets. Raises ProtocolError saying why not."""
    notify = env.get("NOTIFY_SOCKET")
    if notify is not None:
        if not entry.notify:
            raise ProtocolError(
                f"service {name!r} is not ready: notify; NOTIFY_SOCKET cannot be set"
            )
        if not fds:
            raise ProtocolError(
                "NOTIFY_SOCKET comes with the notify socket itself, as the last fd"
            )
        check_notify(name, notify, fds[-1], lazyd_pid)
        fds = fds[:-1]  # the proof; not the service's
    expected = entry.sockets
    names = ":".join(sock["name"] for sock in expected)
    if len(fds) != len(expected):
        if not expected:
            raise ProtocolError(f"service {name!r} is handed no sockets (it binds its own), "
                                f"but {len(fds)} fds were sent")
        raise ProtocolError(f"service {name!r} takes its {len(expected)} configured sockets "
                            f"({names}), but {len(fds)} fds were sent")
    for number, (fd, want) in enumerate(zip(fds, expected, strict=True), start=LISTEN_FDS_START):
        got = socket_identity(fd)
        if any(got[key] != want[key] for key in got):
            raise ProtocolError(f"fd {number} ({want['name']}) is {describe_socket(got)}, "
                                f"not the configured {describe_socket(want)}")
    if fds:
        if env.get("LISTEN_FDS") != str(len(fds)) or env.get("LISTEN_FDNAMES") != names:
            raise ProtocolError(f"LISTEN_FDS and LISTEN_FDNAMES must be {len(fds)} and "
                                f"{names!r}, as the table says")
    elif "LISTEN_FDS" in env or "LISTEN_FDNAMES" in env:
        raise ProtocolError("LISTEN_FDS and LISTEN_FDNAMES go with fds")
    return env, fds


def check_notify(name: str, notify: str, proof: int, lazyd_pid: int) -> None:
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
        raise ProtocolError(f"NOTIFY_SOCKET {notify[:120]!r} is not lazyd's notify socket "
                            f"for {name!r} ({pattern})")
    got = socket_identity(proof)
    datagram = got["family"] == socket.AF_UNIX and got["type"] == socket.SOCK_DGRAM
    if not datagram or got["address"] != notify:
        raise ProtocolError(f"the socket sent with NOTIFY_SOCKET is {describe_socket(got)}, "
                            f"not bound to {notify}")
