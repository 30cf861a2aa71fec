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

Nothing here follows a symlink someone could have planted. Between bind()
and setting the file's owner and mode, whoever can write to the directory
could swap the new socket file for a symlink to /etc/shadow; changing owner
or mode by path would then change the shadow file. So the file is created
with its mode already (as tight as configured, never looser), then opened
without following a symlink, checked to be the very file the socket is bound
to (the kernel says which, through sock_diag), and changed only through that
open file. The config check (as root) keeps such directories out anyway.
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


def bind_socket(
    sc: SocketConfig, *, service: str | None = None, ids: tuple[int, int] | None = None
) -> socket.socket:
    """Bind (and, for stream kinds, listen on) one configured socket.

    The socket is blocking and close-on-exec; TCP sockets have SO_REUSEADDR,
    SO_REUSEPORT is set on IP sockets when `sc.reuse_port`, and IPv6 sockets
    take IPv4 too only for a dual-stack address. A Unix socket file gets
    `sc.mode` and, when given, `sc.owner` / `sc.group`; `ids` (uid, gid, -1
    for unchanged) gives numeric ones instead, for an account that may have
    no name.

    Raises BindError naming the socket (``services.SERVICE.sockets.NAME`` when
    `service` is given) and its address.
    """
    try:
        return _bind(sc, ids)
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


def _bind(sc: SocketConfig, ids: tuple[int, int] | None = None) -> socket.socket:
    addr = sc.listen
    path = addr.path if addr.is_unix and not addr.is_abstract else None
    # Resolve names before touching anything, so a typo costs no socket file.
    uid, gid = (ids or _owner_ids(sc)) if path is not None else (-1, -1)
    if path is not None:
        _clear_stale(addr, path)
    sock = socket.socket(addr.family, addr.type)
    try:
        # Blocking, as systemd hands sockets over: O_NONBLOCK lives on the open
        # file description the service shares, so lazyd must not set it here.
        sock.setblocking(True)
        _set_options(sock, sc)
        if path is not None:
            # Linux creates the file with the mode of the socket's own inode,
            # less the umask (unix_bind): so it is born no looser than `sc.mode`,
            # and nobody the mode keeps out can connect before it is final.
            os.fchmod(sock.fileno(), sc.mode & 0o777)
        try:
            sock.bind(addr.sockaddr())
        except OSError as exc:
            raise _CannotBind(_bind_failure(addr, exc)) from exc
        if path is not None:
            _finish_file(sock, path, sc.mode, uid, gid)
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


def _finish_file(sock: socket.socket, path: str, mode: int, uid: int, gid: int) -> None:
    """Give the file `sock` was just bound to its owner and exact mode, and record it.

    The file at `path` is opened without following a symlink and changed only
    through that fd, and only once it is known to be the file the socket is
    bound to: whatever else someone may have put at `path` is left as it is.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _CannotBind(f"{path} went away right after bind: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        try:
            bound = bound_file(sock)
        except OSError as exc:
            raise _CannotBind(f"cannot tell whether {path} is the socket's file "
                              f"(sock_diag): {exc.strerror}") from exc
        # The kernel reports 32 bits of the inode number.
        if not stat.S_ISSOCK(st.st_mode) or bound != (st.st_dev, st.st_ino & 0xFFFFFFFF):
            raise _CannotBind(f"{path} was replaced by another file right after bind; "
                              "its owner and mode are left alone")
        _created[sock] = (path, st.st_dev, st.st_ino)
        # An O_PATH fd takes neither fchown nor fchmod; its /proc/self/fd link
        # leads to exactly the inode it holds, whatever happens to `path`.
        through = f"/proc/self/fd/{fd}"
        try:
            if uid != -1 or gid != -1:
                os.chown(through, uid, gid)
            # After chown, which may clear mode bits; chmod also undoes the umask.
            os.chmod(through, mode)
        except OSError as exc:
            raise _CannotBind(f"setting owner and mode of {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


# sock_diag for AF_UNIX (include/uapi/linux/unix_diag.h): ask for one socket,
# by the inode number of its socket (fstat of the fd), with UDIAG_SHOW_VFS,
# and the answer carries UNIX_DIAG_VFS: the inode and device of its file.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_UDIAG_SHOW_VFS = 0x02
_UNIX_DIAG_VFS = 1
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")  # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG_SIZE = 16  # family, type, state, pad, ino, cookie[2]
_ATTR = struct.Struct("=HH")  # length, type
_NO_COOKIE = 0xFFFFFFFF


def bound_file(sock: socket.socket) -> tuple[int, int] | None:
    """(st_dev, st_ino & 0xFFFFFFFF) of the file a Unix socket is bound to, per the kernel.

    None when it is bound to no file (abstract, unbound). The socket's
    address alone cannot tell: it is a path, and the file there may have
    been replaced since.
    """
    sock_ino = os.fstat(sock.fileno()).st_ino
    request = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, sock_ino, _UDIAG_SHOW_VFS,
                                  _NO_COOKIE, _NO_COOKIE)
    header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as netlink:
        netlink.sendto(header + request, (0, 0))
        answer = netlink.recv(8192)
    length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(answer)
    if kind == _NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", answer, _NLMSG_HEADER.size)
        raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
    offset = _NLMSG_HEADER.size + _UNIX_DIAG_MSG_SIZE
    while offset + _ATTR.size <= min(length, len(answer)):
        attr_length, attr_type = _ATTR.unpack_from(answer, offset)
        if attr_length < _ATTR.size:
            break
        if attr_type == _UNIX_DIAG_VFS:
            ino, dev = struct.unpack_from("=II", answer, offset + _ATTR.size)
            # The kernel's dev_t: 12 bits of major above 20 bits of minor.
            return os.makedev(dev >> 20, dev & 0xFFFFF), ino
        offset += (attr_length + 3) & ~3
    return None


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
