"""Dropping root after binding.

Started as root, lazyd binds every socket, starts its spawner (which stays
root: it is what starts services as their users), and then the daemon itself
becomes the top-level `user:` of the config: supplementary groups, gid and
uid, real, effective and saved, in every thread (glibc applies set*id(2) to
the whole process). The kernel then clears every capability, and leaves the
process non-dumpable, so that a service running as the same user cannot
ptrace it.

Afterwards the daemon can read nothing that only root can, and that includes
the Python interpreter's own library when it lives under a root-only home
directory: every module the daemon may still import later is imported before
the drop (`preload`).

With no `user:` in the config and no `lazyd` account, the daemon becomes a
uid of its own, as systemd's DynamicUser= does: one that no account, no
group and no running process has, from DYNAMIC_UIDS. No service can run as
it (a service must name an account), so no service can signal the daemon,
lower its limits or pass the control socket's peer check; it owns no file,
and the control socket stays root's.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import importlib
import os
import pwd
import secrets
from collections.abc import Callable
from dataclasses import dataclass

# The account lazyd drops to when the config names none, if the system has it.
from lazyd.config import DEFAULT_USER
from lazyd.errors import LazydError
from lazyd.logs import Level, log_at

# Else a uid of its own from here: the top of 65536-524287, which systemd
# leaves unused (below its container ranges, above its DynamicUser= range
# 61184-65519 and nobody), and which useradd does not hand out.
DYNAMIC_UIDS = range(0x70000, 0x80000)

# Modules imported lazily somewhere below the daemon (by the standard library,
# trio, or lazyd itself) once it runs, found by recording which modules were
# imported after the point where the daemon drops its privileges, across the
# whole test-suite (status, analyze, reload, metrics, proxying included): the
# IDNA codec, which socket.getaddrinfo() and trio use for a host name.
PRELOAD = ("encodings.idna",)
# Only with `metrics:`: prometheus-client is a few MB of an idle daemon.
PRELOAD_METRICS = ("lazyd.observe.metrics",)


@dataclass(frozen=True)
class User:
    """Who the daemon becomes."""

    name: str  # the account's name; for a uid of its own, the number
    uid: int
    gid: int
    groups: tuple[int, ...]
    dynamic: bool = False  # a uid of its own, that no account has


def daemon_user(configured: str | None, log: Callable[[str], None]) -> User | None:
    """The user the daemon drops to after binding; None when it stays as it is.

    Not root: nothing changes (a `user:` naming someone else is ignored, with
    a warning: only root can become another user). Root: `configured`, else
    DEFAULT_USER when it exists, else a uid of its own (`unused_uid`); `user:
    root` keeps root, with a warning.
    """
    if os.geteuid() != 0:
        own = _name(os.geteuid())
        if configured is not None and configured != own:
            log_at(log, Level.WARNING, f"lazyd: user: {configured} is ignored: lazyd runs as "
                   f"{own}, not as root, and keeps running as {own}")
        return None
    if configured == "root":
        log_at(log, Level.WARNING, "lazyd: user: root: the daemon keeps every privilege; "
               "name an unprivileged user to have it drop them after binding")
        return None
    name = configured
    if name is None:
        try:
            pwd.getpwnam(DEFAULT_USER)
            name = DEFAULT_USER
        except KeyError:
            uid = unused_uid()
            log(f"lazyd: no user: in the config and no {DEFAULT_USER} account: running as "
                f"uid {uid}, which no account, group or process has")
            return User(str(uid), uid, uid, (), dynamic=True)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise LazydError(f"user {name!r} does not exist") from None
    if entry.pw_uid == 0:
        return None  # another name for root: nothing to drop
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def unused_uid() -> int:
    """A uid from DYNAMIC_UIDS that no account, no group (as a gid) and no process has.

    Picked at random, so that two daemons started together are unlikely to
    pick the same one; each then sees the other's in /proc.
    """
    taken = _uids_in_use()
    taken.update(entry.pw_uid for entry in pwd.getpwall())
    taken.update(entry.gr_gid for entry in grp.getgrall())
    for _ in range(64):
        uid = secrets.choice(DYNAMIC_UIDS)
        # Asked one by one too: a directory service need not list every account.
        if uid not in taken and not _has_account(uid):
            return uid
    raise LazydError(f"found no uid in {DYNAMIC_UIDS.start}-{DYNAMIC_UIDS.stop - 1} that no "
                     "account or process has: create a lazyd account")


def _has_account(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _uids_in_use() -> set[int]:
    """Every uid and gid (real, effective, saved, file system) of every process."""
    ids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith(("Uid:", "Gid:")):
                        ids.update(int(n) for n in line.split()[1:])
        except OSError:
            continue  # a process that has just ended
    return ids


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def preload(*, metrics: bool) -> None:
    """Import every module the daemon may need once it can no longer read them."""
    for module in PRELOAD + (PRELOAD_METRICS if metrics else ()):
        importlib.import_module(module)


def drop(user: User) -> None:
    """Become `user` for good, in every thread; check that no privilege is left.

    Raises LazydError if any thread still has uid or gid 0 or a capability.
    """
    try:
        # The kernel clears permitted, effective and ambient capabilities on
        # the uid change below, but not the inheritable set: left there, it
        # would hand them back on an exec of a program with file capabilities.
        _clear_inheritable()
        os.setgroups(list(user.groups))
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
    except OSError as exc:
        raise LazydError(f"cannot become user {user.name}: {exc.strerror}") from None
    for problem in _leftovers():
        raise LazydError(f"after becoming user {user.name}: {problem}")


_CAP_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def clear_inheritable_capabilities() -> None:
    """Empty the inheritable capability set while the process has one thread
    (call it before trio starts any): then no thread keeps one past the drop."""
    try:
        _clear_inheritable()
    except OSError as exc:
        raise LazydError(f"cannot clear inheritable capabilities: {exc.strerror}") from None


def _clear_inheritable() -> None:
    """Empty the calling thread's inheritable capability set.

    capset(2) changes only the calling thread, and glibc has no call that
    reaches every thread, as it has for set*id: a thread started earlier
    (trio's worker threads) keeps its own set, which `_leftovers` then
    reports. Threads started afterwards inherit the empty set.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget: " + os.strerror(ctypes.get_errno()))
    if not (data[0].inheritable or data[1].inheritable):
        return
    for word in data:
        word.inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset: " + os.strerror(ctypes.get_errno()))


def _leftovers() -> list[str]:
    """What is still privileged in any thread of this process, per /proc."""
    problems = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError as exc:
        if exc.errno != errno.EACCES:
            raise
        tasks = [str(os.getpid())]  # non-dumpable: the directory is root's
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except FileNotFoundError:
            continue  # a thread that has just ended
        for key in ("Uid", "Gid"):
            if "0" in status[key].split():
                problems.append(f"thread {task} still has {key.lower()} 0")
        for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            if int(status[key], 16):
                held = status[key].strip()
                problems.append(f"thread {task} still has capabilities ({key} {held})")
    return problems
