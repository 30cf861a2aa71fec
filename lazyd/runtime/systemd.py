"""lazyd under systemd: sockets it inherits, and readiness it reports.

systemd (or `systemd-socket-activate`) may bind lazyd's sockets and pass them
with LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES, exactly as lazyd passes sockets
to its own services.  Then lazyd needs no root at all: it adopts each
inherited socket whose name is `SERVICE.SOCKET` (or just `SOCKET`, when that
name is unique) instead of binding one.  It reports READY=1 to its own
NOTIFY_SOCKET once every socket is held (Type=notify), RELOADING=1 around a
reload and STOPPING=1 on shutdown.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, MutableMapping

from lazyd.config import Config
from lazyd.errors import BindError
from lazyd.privileged.handoff import socket_identity

LISTEN_FDS_START = 3
Inherited = dict[tuple[str, str], socket.socket]


def take_listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, list[int]]:
    """The fds passed to this process, by name (sd_listen_fds_with_names(3)).

    The variables are removed once read, as sd_listen_fds(unset=1) does, so
    that nothing lazyd starts mistakes them for its own.
    """
    env = os.environ if environ is None else environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != str(os.getpid()) or not count or not count.isdigit():
        return {}
    n = int(count)
    labels = names.split(":") if names else []
    if len(labels) != n:
        labels = ["unknown"] * n
    fds: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)  # lazyd's own from now on, like every socket it binds
        fds.setdefault(label, []).append(fd)
    return fds


def adopt(
    config: Config, passed: dict[str, list[int]], log: Callable[[str], None]
) -> Inherited:
    """Match passed fds to configured sockets; close the ones nothing wants.

    A socket named `SERVICE.SOCKET` goes to that socket; one named `SOCKET`
    goes to the only configured socket of that name.  Type and family must
    agree with the config, or lazyd refuses to start rather than serve the
    wrong thing.
    """
    wanted: dict[str, list[tuple[str, str]]] = {}
    for svc in config.services.values():
        for sc in svc.sockets:
            wanted.setdefault(f"{svc.name}.{sc.name}", []).append((svc.name, sc.name))
            wanted.setdefault(sc.name, []).append((svc.name, sc.name))
    adopted: Inherited = {}
    try:
        for label, fds in passed.items():
            targets = wanted.get(label, [])
            if len(fds) != 1 or len(targets) != 1:
                why = (
                    "matches no configured socket" if not targets
                    else "is ambiguous" if len(targets) > 1
                    else "was passed more than once"
                )
                log(f"lazyd: inherited socket {label!r} {why}; closing it")
                for fd in fds:
                    os.close(fd)
                continue
            key = targets[0]
            sock = socket.socket(fileno=fds[0])
            adopted[key] = sock
            _check(config, key, sock)
            where = f"services.{key[0]}.sockets.{key[1]}"
            log(f"lazyd: using the inherited socket {label!r} for {where}")
    except BindError:
        for sock in adopted.values():
            sock.close()
        raise
    return adopted


def _check(config: Config, key: tuple[str, str], sock: socket.socket) -> None:
    sc = next(s for s in config.services[key[0]].sockets if s.name == key[1])
    where = f"services.{key[0]}.sockets.{key[1]} ({sc.listen})"
    if sock.type != sc.listen.type or sock.family != sc.listen.family:
        raise BindError(
            f"{where}: the inherited socket is {sock.family.name}/{sock.type.name}, not "
            f"{sc.listen.family.name}/{sc.listen.type.name}"
        )
    # The spawner hands a service only sockets bound where the config says:
    # one bound elsewhere would fail every start, so fail here, at once.
    bound = socket_identity(sock.fileno())["address"]
    want = sc.listen.path if sc.listen.is_unix else [sc.listen.host, sc.listen.port]
    if bound != want:
        shown = ":".join(map(str, bound)) if isinstance(bound, list) else bound
        raise BindError(f"{where}: the inherited socket is bound to {shown}")


class Supervisor:
    """lazyd's own supervisor (systemd, with Type=notify), reached through
    NOTIFY_SOCKET; sd_notify(3) without libsystemd.

    The socket is connected once, at start-up, while lazyd is still root: the
    kernel checks the right to write to a socket's path at connect() only, so
    a supervisor's socket in a directory that the user lazyd drops to cannot
    enter stays reachable.  A message that cannot be delivered is logged (at
    most once per kind of message and error), never ignored: under systemd a
    lost READY=1 ends in a start timeout and lazyd killed.  Sending never
    blocks the daemon.
    """

    def __init__(self, log: Callable[[str], None],
                 environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.pop("NOTIFY_SOCKET", None) or None
        self._log = log
        self._said: set[tuple[str, str]] = set()
        self._sock: socket.socket | None = None
        if self.address is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            log(f"lazyd: cannot reach the supervisor's NOTIFY_SOCKET {self.address}: "
                f"{os.strerror(exc.errno or 0)}; it will not learn that lazyd is ready")
            return
        sock.setblocking(False)
        self._sock = sock

    def notify(self, message: str) -> None:
        """Send one sd_notify message (e.g. ``READY=1``), if there is a supervisor."""
        if self.address is None:
            return
        first = message.split("\n", 1)[0]
        if self._sock is None:
            self._say(first, "its socket could not be reached at start-up")
            return
        try:
            self._sock.send(message.encode())
        except OSError as exc:
            self._say(first, os.strerror(exc.errno or 0))

    def _say(self, what: str, why: str) -> None:
        if (what, why) not in self._said:
            self._said.add((what, why))
            self._log(f"lazyd: could not tell the supervisor {what} "
                      f"(NOTIFY_SOCKET {self.address}): {why}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
