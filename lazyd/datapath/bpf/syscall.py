"""bpf(2), pidfd_open(2) and pidfd_getfd(2) through ctypes.

Only the commands lazyd uses are here, each with its own slice of the kernel's
`union bpf_attr` (include/uapi/linux/bpf.h) as a ctypes structure: the kernel
reads at most the size it is given and requires nothing more, and zeroes the
rest of its own copy. Every failure raises OSError with the errno and a text
naming the command and what it was asked, e.g. ``bpf(BPF_MAP_CREATE sockhash):
[Errno 1] Operation not permitted``; a program the verifier rejects raises
VerifierError, which quotes the verifier's log.

Every fd returned is the caller's to close; the kernel makes them all
close-on-exec, so a service started later does not inherit them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}
# pidfd_getfd came after the syscall tables were unified: the same on every arch.
_SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Commands (enum bpf_cmd).
_MAP_CREATE = 0
_MAP_LOOKUP_ELEM = 1
_MAP_UPDATE_ELEM = 2
_MAP_DELETE_ELEM = 3
_PROG_LOAD = 5
_LINK_CREATE = 28

# Map types (enum bpf_map_type).
MAP_HASH = 1
MAP_ARRAY = 2
MAP_SOCKHASH = 18

# Program and attach types.
PROG_SK_LOOKUP = 30
ATTACH_SK_LOOKUP = 36

# Flags of BPF_MAP_UPDATE_ELEM.
ANY = 0  # create or replace
NOEXIST = 1  # create only
EXIST = 2  # replace only

_LOG_SIZE = 1 << 20


class VerifierError(OSError):
    """The verifier rejected a program; `log` holds what it said."""

    def __init__(self, err: int, what: str, log: str) -> None:
        self.log = log
        super().__init__(err, f"{what}: {os.strerror(err)}; the verifier said:\n{log}")


class _MapCreate(ctypes.Structure):
    _fields_ = (
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    )


class _Elem(ctypes.Structure):
    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("key", ctypes.c_uint64),  # __aligned_u64: ctypes pads map_fd to 8 bytes
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class _ProgLoad(ctypes.Structure):
    _fields_ = (
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    )


class _LinkCreate(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """One bpf() call; its non-negative result, or OSError naming `what`."""
    try:
        number = _SYS_BPF[platform.machine()]
    except KeyError:
        machine = platform.machine()
        raise OSError(errno.ENOSYS, f"bpf(): no syscall number known for {machine}") from None
    result = _libc.syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({what}): {os.strerror(err)}")
    return int(result)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str
) -> int:
    """A new map's fd (needs CAP_BPF, i.e. root here)."""
    attr = _MapCreate(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_name=name.encode()[:15],
    )
    return _bpf(_MAP_CREATE, attr, f"BPF_MAP_CREATE {name}")


def _elem(
    cmd: int, map_fd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None, flags: int,
    what: str,
) -> None:
    """One BPF_MAP_*_ELEM call; `value` is the caller's buffer (read or written)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    attr = _Elem(
        map_fd=map_fd,
        key=ctypes.addressof(key_buf),
        value=0 if value is None else ctypes.addressof(value),
        flags=flags,
    )
    _bpf(cmd, attr, what)


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    """Set key to value; works with the map fd alone, after any privilege drop."""
    buf = ctypes.create_string_buffer(value, len(value))
    _elem(_MAP_UPDATE_ELEM, map_fd, key, buf, flags, "BPF_MAP_UPDATE_ELEM")


def map_delete(map_fd: int, key: bytes) -> bool:
    """Remove key; False if it was not there."""
    try:
        _elem(_MAP_DELETE_ELEM, map_fd, key, None, 0, "BPF_MAP_DELETE_ELEM")
    except FileNotFoundError:
        return False
    return True


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under key, or None (a sockhash gives the socket's cookie)."""
    buf = ctypes.create_string_buffer(value_size)
    try:
        _elem(_MAP_LOOKUP_ELEM, map_fd, key, buf, 0, "BPF_MAP_LOOKUP_ELEM")
    except FileNotFoundError:
        return None
    return buf.raw


def prog_load(
    prog_type: int, insns: bytes, *, license: str, name: str, expected_attach_type: int = 0
) -> int:
    """A loaded program's fd (needs CAP_BPF and, for network programs, CAP_NET_ADMIN).

    The first attempt runs without a log, which is what a valid program needs;
    a rejected one is loaded again with the verifier's log on, so the error
    says why (the log of a failure is short; of a success, needlessly long).
    """
    if len(insns) % 8:
        raise ValueError(f"program of {len(insns)} bytes is not a whole number of instructions")
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = _ProgLoad(
            prog_type=prog_type,
            insn_cnt=len(insns) // 8,
            insns=ctypes.addressof(code),
            license=ctypes.addressof(lic),
            prog_name=name.encode()[:15],
            expected_attach_type=expected_attach_type,
        )
        if log is not None:
            attr.log_level = 1
            attr.log_size = len(log)
            attr.log_buf = ctypes.addressof(log)
        return _bpf(_PROG_LOAD, attr, f"BPF_PROG_LOAD {name}")

    try:
        return attempt(None)
    except OSError as first:
        # Only the verifier's verdicts are worth a second run; EPERM and the
        # like would fail the same way and say nothing more.
        if first.errno not in (errno.EACCES, errno.EINVAL, errno.E2BIG, errno.ENOSPC):
            raise
        log = ctypes.create_string_buffer(_LOG_SIZE)
        try:
            fd = attempt(log)
        except OSError as second:
            text = log.value.decode(errors="replace").strip()
            if not text:
                raise
            raise VerifierError(
                second.errno or first.errno or errno.EINVAL, f"bpf(BPF_PROG_LOAD {name})", text
            ) from None
        return fd  # accepted the second time: nothing to report


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A link's fd: the program runs while the link fd (or a copy) stays open."""
    attr = _LinkCreate(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type)
    return _bpf(_LINK_CREATE, attr, "BPF_LINK_CREATE")


def pidfd_open(pid: int) -> int:
    """A pidfd for pid: it names that very process, even after the pid is reused."""
    return os.pidfd_open(pid)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy, in this process, of fd `target_fd` of the process behind pidfd.

    Needs ptrace-level access to that process (root, or CAP_SYS_PTRACE). The
    copy is close-on-exec and refers to the same open file (the same socket).
    """
    result = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd(fd {target_fd}): {os.strerror(err)}")
    return int(result)


def take_fd(pid: int, target_fd: int) -> int:
    """A copy, in this process, of fd `target_fd` of process pid (root)."""
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, target_fd)
    finally:
        os.close(pidfd)
