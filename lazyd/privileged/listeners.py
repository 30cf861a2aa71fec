"""Taking a service's own listening socket, for the kernel data path (root).

Once a proxied service on the kernel path is ready, the daemon steers new
connections into the socket the service listens on (`lazyd.datapath.kernel`).
It cannot take that socket itself (it runs as another user, and reading
another process's fds needs ptrace-level access), so it asks this helper,
which may hand it over only under what its sealed table says:

- the pid is one this helper started and reported, and has not reaped (so
  the pid cannot belong to anyone else yet), or a process of its session
  (each service leads its own session, so a forking server's worker counts:
  its session id is the service's pid, which stays reserved until reaped);
- that process's service has a ``steer`` entry for the socket
  (`lazyd.privileged.entries`): only services whose config asks for the
  kernel path, and only their listener on the configured upstream address,
  found through the kernel's socket table (`lazyd.datapath.bpf.diag`), never
  an address the daemon names;
- what is taken is checked to be that very socket (its inode) after the
  process was pinned with a pidfd, so a recycled fd number or pid yields an
  error, not some other file.

The daemon gets a copy of a socket the service itself offers to every client
of the upstream address, which the daemon reaches anyway: it learns nothing
and gains no access it did not have.  It puts the socket in the steering map
and closes its copy at once.

Standard library only (and `lazyd.datapath.bpf.diag`, which is too), and not
even `typing` (see `lazyd.privileged`).
"""

from __future__ import annotations

import contextlib
import os

from lazyd.datapath.bpf import diag, syscall
from lazyd.privileged.entries import ProcessEntry
from lazyd.privileged.fields import ProtocolError

TYPE_CHECKING = False  # not from typing, which the helper would have to import
if TYPE_CHECKING:
    from lazyd.privileged.entries import Entry
    from lazyd.privileged.protocol import Listener

# A service's session, searched for the listener: its main process first,
# then at most this many others (a pre-forking server's workers).
MAX_SESSION = 256


def take(request: Listener, service: str | None, entry: Entry | None) -> int:
    """A copy of the listener `request` asks for (close-on-exec, the caller's to
    close); `service` and `entry` are those of the process `request.pid`, None
    when this helper has no running process of that pid. Raises ProtocolError."""
    pid = request.pid
    if service is None:
        raise ProtocolError(f"pid {pid} is not a running process of this spawner")
    if not isinstance(entry, ProcessEntry):
        raise ProtocolError(f"service {service!r} is not a process in the table")
    address = entry.steer.get(request.socket)
    if address is None:
        raise ProtocolError(f"service {service!r} does not use the kernel data path for "
                            f"socket {request.socket!r}")
    inode = diag.listening_inode((address[0], address[1]))
    where = f"{address[0]}:{address[1]}"
    if inode is None:
        raise ProtocolError(f"nothing listens on {where}")
    for candidate in [pid, *_session(pid)]:
        fd = _take_from(candidate, pid, inode)
        if fd is not None:
            return fd
    raise ProtocolError(f"no process of service {service!r} holds the socket listening on {where}")


def _take_from(candidate: int, session: int, inode: int) -> int | None:
    """The socket `inode` from `candidate`'s fds, if it has it and is (still) in `session`."""
    try:
        pidfd = syscall.pidfd_open(candidate)
    except OSError:
        return None  # gone meanwhile
    try:
        # Pinned now: if it is still in the session, it is that process.
        if candidate != session and _session_of(candidate) != session:
            return None
        try:
            fd = diag.fd_of_inode(candidate, inode)
        except PermissionError:
            return None  # not a process of ours after all (another namespace's, say)
        return None if fd is None else diag.take_socket(pidfd, fd, inode)
    finally:
        os.close(pidfd)


def _session(leader: int) -> list[int]:
    """Other processes whose session is `leader`'s (at most MAX_SESSION)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != leader and _session_of(int(name)) == leader:
            found.append(int(name))
            if len(found) >= MAX_SESSION:
                break
    return found


def _session_of(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open(f"/proc/{pid}/stat", "rb") as f:
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and ')'.
        return int(f.read().rsplit(b")", 1)[1].split()[3])
    return None
