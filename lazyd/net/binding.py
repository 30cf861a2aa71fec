"""Binding the configured sockets, and giving them back.

lazyd binds every socket of every service before any service starts: a port
that cannot be bound is reported at once, naming the service and the socket,
and whatever was already bound is released, so a failed start leaves nothing
behind. The sockets are made exactly as a service started by systemd would
receive them: blocking, listening, close-on-exec in lazyd itself (the fd
handoff clears that flag on the copies it makes for the service).

Unix socket files are the fiddly part. A file left by a crashed run is
replaced, but only once nobody answers on it; a live socket or a file that is
not a socket at all is never touched. lazyd removes on release only the files
it created itself, and only while they are still the very file it created: a
file inherited from a service manager, or one another process has bound since,
stays.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import resource
import socket
import stat
import struct
import weakref
from collections.abc import Mapping

from lazyd.config import Config, SocketConfig
from lazyd.errors import BindError
from lazyd.net.addresses import Address, Kind

log = logging.getLogger(__name__)

# The socket files this process created: socket -> (path, st_dev, st_ino) of the
# file as it was right after bind(). Release compares the identity, so it never
# removes a file that has since been replaced by someone else's. Weak keys: a
# socket dropped without release takes its record with it (and leaves its file,
# which the next run will recognise as stale).
_created: weakref.WeakKeyDictionary[socket.socket, tuple[str, int, int]] = (
    weakref.WeakKeyDictionary()
)


class _CannotBind(Exception):
    """Why one socket could not be bound; `bind_socket` says which socket."""


def bind_socket(sc: SocketConfig, *, service: str | None = None) -> socket.socket:
    """Bind (and, for stream kinds, listen on) one configured socket.

    The socket is blocking and close-on-exec; TCP sockets have SO_REUSEADDR,
    SO_REUSEPORT is set on IP sockets when `sc.reuse_port`, and IPv6 sockets
    take IPv4 too only for a dual-stack address. A Unix socket file gets
    `sc.mode` and, when given, `sc.owner` / `sc.group`.

    Raises BindError naming the socket (``services.SERVICE.sockets.NAME`` when
    `service` is given) and its address.
    """
    try:
        return _bind(sc)
    except _CannotBind as exc:
        where = f"services.{service}.sockets.{sc.name}" if service else f"sockets.{sc.name}"
        raise BindError(f"{where} ({sc.listen}): cannot bind: {exc}") from exc


def bind_all(
    config: Config, inherited: Mapping[tuple[str, str], socket.socket] | None = None
) -> dict[str, list[socket.socket]]:
    """Bind every socket of every service: service name -> its sockets in config order.

    A socket found in `inherited` (by service and socket name: lazyd itself
    was socket-activated) is used as it is instead of being bound.  All or
    nothing: if one socket cannot be bound, every socket bound so far is
    closed, the socket files created are removed, and BindError is raised.
    """
    inherited = inherited or {}
    bound: dict[str, list[socket.socket]] = {}
    try:
        for name, service in config.services.items():
            sockets = bound.setdefault(name, [])
            for sc in service.sockets:
                sock = inherited.get((name, sc.name))
                sockets.append(sock if sock is not None else bind_socket(sc, service=name))
    except BaseException:
        _close_all(bound)
        raise
    return bound


def release(config: Config, sockets: dict[str, list[socket.socket]]) -> None:
    """Close every socket and remove the Unix socket files lazyd created for them.

    Safe to call more than once. Which files lazyd created is recorded with
    each socket at bind time, so sockets that were inherited (or whose file has
    since been replaced) are closed but their files are left alone; `config`
    is taken for symmetry with `bind_all` and is not needed for that.
    """
    del config
    _close_all(sockets)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the original (soft, hard).

    lazyd holds every socket plus every held connection. Services should be
    started with the original soft limit, as systemd does: programs that use
    select() break on fds above 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # The kernel refuses a NOFILE limit above fs.nr_open, "unlimited" included.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft, hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
    return soft, hard


# The head of Linux's struct tcp_info (include/uapi/linux/tcp.h), which has
# only ever grown at the end:
#   offset  0  __u8  tcpi_state
#   offsets 1-7      six more __u8 fields and two bytes of bit fields
#   offsets 8-20 __u32 tcpi_rto, tcpi_ato, tcpi_snd_mss, tcpi_rcv_mss
#   offset 24  __u32 tcpi_unacked
#   offset 28  __u32 tcpi_sacked
# For a socket in LISTEN state tcp_get_info() puts sk_ack_backlog (connections
# completed and waiting for accept()) in tcpi_unacked and sk_max_ack_backlog
# (the effective backlog) in tcpi_sacked; `ss -l` shows the same as Recv-Q/Send-Q.
_TCP_INFO_HEAD = struct.Struct("=B23xII")
_TCP_LISTEN = 10  # enum in include/net/tcp_states.h


def accept_queue_length(sock: socket.socket) -> int | None:
    """How many connections wait in a listening TCP socket's accept queue.

    None for anything else. A UDP socket has no such count (FIONREAD gives the
    size of the first datagram only, SO_MEMINFO bytes with overhead), nor does
    a Unix stream listener short of sock_diag netlink.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_HEAD.size)
    if len(raw) < _TCP_INFO_HEAD.size:
        return None
    state, unacked, _backlog = _TCP_INFO_HEAD.unpack(raw)
    if state != _TCP_LISTEN:
        return None
    return int(unacked)


# --- the core -----------------------------------------------------------------


def _bind(sc: SocketConfig) -> socket.socket:
    addr = sc.listen
    path = addr.path if addr.is_unix and not addr.is_abstract else None
    # Resolve names before touching anything, so a typo costs no socket file.
    uid, gid = _owner_ids(sc) if path is not None else (-1, -1)
    if path is not None:
        _clear_stale(addr, path)
    sock = socket.socket(addr.family, addr.type)
    try:
        # Blocking, as systemd hands sockets over: O_NONBLOCK lives on the open
        # file description the service shares, so lazyd must not set it here.
        sock.setblocking(True)
        _set_options(sock, sc)
        try:
            sock.bind(addr.sockaddr())
        except OSError as exc:
            raise _CannotBind(_bind_failure(addr, exc)) from exc
        if path is not None:
            st = os.lstat(path)
            _created[sock] = (path, st.st_dev, st.st_ino)
            _apply_owner_and_mode(path, sc, uid, gid)
        if addr.is_stream:
            try:
                sock.listen(sc.backlog)
            except OSError as exc:
                raise _CannotBind(f"listen: {exc.strerror}") from exc
    except BaseException:
        _unlink_created(sock)
        sock.close()
        raise
    return sock


def _set_options(sock: socket.socket, sc: SocketConfig) -> None:
    addr = sc.listen
    try:
        if addr.kind is Kind.TCP:
            # A restart right after a crash must not meet "address in use" from
            # connections of the previous run lingering in TIME_WAIT. (Not on UDP:
            # there it would let a second process bind the same port.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sc.reuse_port and not addr.is_unix:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            # Set explicitly either way: the default comes from a sysctl.
            v6only = 0 if addr.dual_stack else 1
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    except OSError as exc:
        raise _CannotBind(f"setting socket options: {exc.strerror}") from exc


def _bind_failure(addr: Address, exc: OSError) -> str:
    if addr.is_unix and not addr.is_abstract and exc.errno in (errno.ENOENT, errno.ENOTDIR):
        assert addr.path is not None
        return f"directory {os.path.dirname(addr.path)} does not exist"
    return exc.strerror or str(exc)


def _clear_stale(addr: Address, path: str) -> None:
    """Remove a socket file nobody answers on; refuse anything else in the way."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # bind() will create it, or say the directory is missing
    except OSError as exc:
        raise _CannotBind(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise _CannotBind(f"{path} exists and is not a socket; it will not be replaced")
    if _answers(addr, path):
        raise _CannotBind(f"{path} is in use by another process")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _CannotBind(f"cannot remove stale socket file {path}: {exc.strerror}") from exc
    log.info("%s: replaced a stale socket file left by an earlier run", path)


def _answers(addr: Address, path: str) -> bool:
    """Whether a live socket is bound at `path`.

    Connecting is the only sound test: a file whose socket is gone refuses
    (ECONNREFUSED). Non-blocking, so a live listener with a full backlog says
    EAGAIN instead of holding us up; a live socket of the other type says
    EPROTOTYPE; a datagram socket connected to someone else says EPERM.
    """
    with socket.socket(socket.AF_UNIX, addr.type) as probe:
        probe.setblocking(False)
        err = probe.connect_ex(path)
    if err in (errno.ECONNREFUSED, errno.ENOENT):
        return False
    if err in (0, errno.EAGAIN, errno.EINPROGRESS, errno.EPROTOTYPE, errno.EPERM):
        return True
    raise _CannotBind(f"cannot tell whether {path} is in use: {os.strerror(err)}")


def _owner_ids(sc: SocketConfig) -> tuple[int, int]:
    uid = gid = -1
    if sc.owner is not None:
        try:
            uid = pwd.getpwnam(sc.owner).pw_uid
        except KeyError:
            raise _CannotBind(f"owner {sc.owner!r}: no such user") from None
    if sc.group is not None:
        try:
            gid = grp.getgrnam(sc.group).gr_gid
        except KeyError:
            raise _CannotBind(f"group {sc.group!r}: no such group") from None
    return uid, gid


def _apply_owner_and_mode(path: str, sc: SocketConfig, uid: int, gid: int) -> None:
    try:
        if uid != -1 or gid != -1:
            os.lchown(path, uid, gid)
        # After chown, which may clear mode bits; chmod also undoes the umask.
        os.chmod(path, sc.mode)
    except OSError as exc:
        raise _CannotBind(f"setting owner and mode of {path}: {exc.strerror}") from exc


def _unlink_created(sock: socket.socket) -> None:
    record = _created.pop(sock, None)
    if record is None:
        return
    path, dev, ino = record
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except PermissionError:
        # lazyd dropped its privileges and the directory is root's: the file
        # stays, and the next run replaces it as stale.
        pass
    except OSError as exc:
        log.warning("cannot remove socket file %s: %s", path, exc.strerror)


def needs_privilege(address: Address) -> bool:
    """Whether binding `address` takes root: an IP port below ip_unprivileged_port_start."""
    if address.is_unix or not address.port:
        return False
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            start = int(f.read())
    except (OSError, ValueError):
        start = 1024  # the kernel's default, and the rule before Linux 4.11
    return address.port < start


def release_socket(sock: socket.socket) -> None:
    """Close one socket and remove the Unix socket file lazyd created for it."""
    # Unlink first: a client then finds no file rather than a dead one.
    _unlink_created(sock)
    sock.close()


def _close_all(sockets: dict[str, list[socket.socket]]) -> None:
    for group in sockets.values():
        for sock in group:
            release_socket(sock)
