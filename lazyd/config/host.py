"""The checks of a config against the machine it is for: users, groups, programs, directories.

Everything the loader asks of this machine goes through a `Host`, passed to
`lazyd.config.loads()`.  `Machine` is the real one; which of its checks apply
is stated once, by how it is made:

- `Machine.current()`: as this process is (root or not), seeing every program;
- `Machine(as_root=...)`: the same, with root's rules on or off (`lazyd check`
  as another user, tests);
- `Machine.after_privilege_drop()`: the daemon re-reading its config on a
  reload, after it dropped to its unprivileged user.  Root's rules still
  apply (root's helper acts on the result), but programs are not looked up:
  the daemon may no longer see them, and the helper, which can, reads the
  config itself before starting anything.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lazyd.config.ownership import who_else_can_change


class Host(Protocol):
    """What the loader asks of the machine; each check raises ValueError or returns a problem."""

    @property
    def as_root(self) -> bool:
        """Whether root acts on what is read: then each service must name its user, socket
        files go only where no one else can swap them, and no service may run as the user
        the daemon drops to (unless allow_shared_user says so)."""
        ...

    def user(self, name: str) -> str:
        """The account's name; ValueError if there is no such user."""
        ...

    def group(self, name: str) -> str:
        """The group's name; ValueError if there is no such group."""
        ...

    def primary_group(self, user: str) -> str | None:
        """The name of `user`'s primary group (None: its gid has no name)."""
        ...

    def uid(self, user: str) -> int | None:
        """`user`'s uid, None if there is no such account."""
        ...

    def workdir(self, path: str) -> str:
        """`path` if it can be a service's working directory; ValueError saying why not."""
        ...

    def program_problem(self, words: Sequence[str], search: str, workdir: str | None) -> str | None:
        """What keeps the command's program from being executed, or None if nothing does."""
        ...

    def socket_directory_problem(self, socket_path: str) -> str | None:
        """Why root must not create a socket file at `socket_path`, or None."""
        ...


@dataclass(frozen=True)
class Machine:
    """This machine, through pwd, grp, stat and PATH; see the module docstring."""

    as_root: bool
    find_programs: bool = True

    @classmethod
    def current(cls) -> Machine:
        """As this process is: root's rules apply when it runs as root."""
        return cls(as_root=os.geteuid() == 0)

    @classmethod
    def after_privilege_drop(cls) -> Machine:
        """The daemon's view after dropping root: root's rules, no program look-ups."""
        return cls(as_root=True, find_programs=False)

    def user(self, name: str) -> str:
        try:
            return pwd.getpwnam(name).pw_name
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise ValueError(f"unknown user {name!r}") from None

    def group(self, name: str) -> str:
        try:
            return grp.getgrnam(name).gr_name
        except (KeyError, ValueError):
            raise ValueError(f"unknown group {name!r}") from None

    def primary_group(self, user: str) -> str | None:
        try:
            return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
        except KeyError:  # a gid without a name: the launcher uses the gid
            return None

    def uid(self, user: str) -> int | None:
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError:
            return None

    def workdir(self, path: str) -> str:
        if not os.path.isabs(path):
            raise ValueError(f"expected an absolute path, got {path!r}")
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except FileNotFoundError:
            raise ValueError(f"{path!r} does not exist") from None
        except PermissionError:
            # A daemon that dropped its privileges may not see into it; the
            # spawner, which does, reads the config itself before using it.
            return path
        except OSError as exc:
            raise ValueError(f"{path!r}: {exc.strerror}") from None
        if not is_dir:
            raise ValueError(f"{path!r} is not a directory")
        return path

    def program_problem(self, words: Sequence[str], search: str, workdir: str | None) -> str | None:
        if not self.find_programs:
            return None
        if not words:
            return "the command is empty"
        program = words[0]
        try:
            if "/" not in program:
                found = shutil.which(program, path=search) is not None
            else:
                # A relative path is relative to workdir, where the service is started.
                full = os.path.join(workdir or os.getcwd(), program)
                if os.path.exists(full) and not (os.path.isfile(full) and os.access(full, os.X_OK)):
                    return f"command is not an executable file: {program!r}"
                found = os.path.exists(full)
        except ValueError:  # a name the OS cannot look up at all (a NUL, a lone surrogate)
            found = False
        return None if found else f"command not found: {program!r}"

    def socket_directory_problem(self, socket_path: str) -> str | None:
        # As root, a socket file goes only where no one else can swap it
        # (`lazyd.config.ownership`).
        if not self.as_root:
            return None
        if problem := who_else_can_change(socket_path, directories_only=True):
            return (f"{problem}: lazyd, as root, creates socket files only in directories that "
                    "only root can change (or root's sticky ones, such as /tmp), as anyone who "
                    "can rename files there can swap the socket file for a symlink")
        return None
