"""Whether anyone but root can change a path: owner, mode bits and POSIX ACLs.

lazyd, as root, reads its config file (on a reload) and creates Unix socket
files. Whoever can change that file, or any directory on the way to it, can
swap what root reads or acts on: a config naming a new command for `user:
root`, a symlink where a socket file is about to be chown'ed. So root acts
only on paths that no one else can change, and that is more than owner and
mode: a POSIX ACL (`setfacl -m u:nobody:rw`) grants write access that the
mode bits do not show, so the ACL is read and checked too.

A directory with the sticky bit (/tmp) may be writable by others as long as
root owns it: others can add entries there but cannot rename or remove
root's.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import struct
from dataclasses import dataclass

# The kernel's xattr format of an access ACL (include/uapi/linux/posix_acl_xattr.h):
# a little-endian version word (2), then entries of tag, permission bits and id.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_ACL_WRITE = 0x02


@dataclass(frozen=True)
class AclEntry:
    tag: int
    perm: int
    id: int


def read_acl(path: str) -> list[AclEntry]:
    """The access ACL of `path` (not following a final symlink); [] when it has none.

    Raises OSError if it cannot be read, ValueError if it is not in the
    kernel's format.
    """
    try:
        raw = os.getxattr(path, _ACL_XATTR, follow_symlinks=False)
    except OSError as exc:
        # ENODATA: no ACL beyond the mode bits. ENOTSUP: a file system without
        # ACLs (or a symlink, which has none), where only the mode bits count.
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    if len(raw) < _ACL_HEADER.size or (len(raw) - _ACL_HEADER.size) % _ACL_ENTRY.size:
        raise ValueError(f"{path}: an access ACL of {len(raw)} bytes is not in a known format")
    (version,) = _ACL_HEADER.unpack_from(raw)
    if version != _ACL_VERSION:
        raise ValueError(f"{path}: access ACL version {version} is not known")
    return [
        AclEntry(*_ACL_ENTRY.unpack_from(raw, offset))
        for offset in range(_ACL_HEADER.size, len(raw), _ACL_ENTRY.size)
    ]


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"group {grp.getgrgid(gid).gr_name}"
    except KeyError:
        return f"gid {gid}"


def other_writers(st: os.stat_result, acl: list[AclEntry]) -> list[str]:
    """Who besides root may write to a file or directory with this stat and ACL.

    Group write counts only for a group other than root's (gid 0). With an
    ACL, a named user's or group's entry and the owning group's are limited
    by the mask, as the kernel limits them.
    """
    who = []
    if st.st_uid != 0:
        who.append(f"its owner, {_user(st.st_uid)}")
    mask = next((e.perm for e in acl if e.tag == _MASK), None)

    def effective(entry: AclEntry) -> int:
        return entry.perm if mask is None else entry.perm & mask

    group_obj = next((e for e in acl if e.tag == _GROUP_OBJ), None)
    if group_obj is not None:
        # With a mask the mode's group bits show the mask, not the owning group.
        if effective(group_obj) & _ACL_WRITE and st.st_gid != 0:
            who.append(f"its {_group(st.st_gid)} (ACL)")
    elif st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        who.append(f"its {_group(st.st_gid)}")
    if st.st_mode & stat.S_IWOTH:
        who.append("every user")
    for entry in acl:
        if not effective(entry) & _ACL_WRITE or entry.id == 0:
            continue
        if entry.tag == _USER:
            who.append(f"{_user(entry.id)} (ACL)")
        elif entry.tag == _GROUP:
            who.append(f"{_group(entry.id)} (ACL)")
    return who


def who_else_can_change(path: str, *, directories_only: bool = False) -> str | None:
    """Why someone other than root can change `path` or a directory above it; None if no one.

    `directories_only` leaves `path` itself out (a socket file about to be
    created). Components that do not exist yet are skipped: whoever could
    create them is judged at their parent. A symlink on the way counts by its
    owner (its mode means nothing; replacing it takes its directory), and
    where it leads is judged too. The answer names the first component found
    that others can change, and who can: ``/run/app can be changed by a user
    other than root: its owner, user www-data (...)``.
    """
    path = os.path.abspath(path)
    problem = _chain(path, directories_only)
    resolved = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if problem is None and resolved != path:
        problem = _chain(resolved, directories_only)
    return problem


def _chain(path: str, directories_only: bool) -> str | None:
    current = path
    first = True
    while True:
        if not (first and directories_only):
            problem = _problem(current, is_directory=not first)
            if problem is not None:
                return problem
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current, first = parent, False


def _problem(path: str, *, is_directory: bool) -> str | None:
    try:
        st = os.lstat(path)
        acl = read_acl(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: cannot tell who can change it: {exc.strerror}"
    except ValueError as exc:
        return f"cannot tell who can change {exc}"
    if stat.S_ISLNK(st.st_mode):
        writers = [] if st.st_uid == 0 else [f"its owner, {_user(st.st_uid)}"]
    else:
        writers = other_writers(st, acl)
    if is_directory and st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
        return None  # others may add entries, but cannot rename or remove root's
    if not writers:
        return None
    return (
        f"{path} can be changed by a user other than root: {', '.join(writers)} "
        f"(owner uid {st.st_uid}, group gid {st.st_gid}, mode {stat.S_IMODE(st.st_mode):o}"
        f"{', an ACL' if acl else ''})"
    )
