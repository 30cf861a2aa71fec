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
    if sock.type != sc.listen.type or sock.family != sc.listen.family:
        raise BindError(
            f"services.{key[0]}.sockets.{key[1]} ({sc.listen}): the inherited socket is "
            f"{sock.family.name}/{sock.type.name}, not {sc.listen.family.name}/"
            f"{sc.listen.type.name}"
        )


def notify(message: str) -> None:
    """sd_notify(3) to lazyd's own supervisor, if it has one (else nothing)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        pass  # a supervisor that went away is no reason to fail
