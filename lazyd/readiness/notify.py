"""The receiving end of sd_notify(3): how a `ready: notify` service says it is ready.

Each such service gets its own abstract AF_UNIX datagram socket, named in its
NOTIFY_SOCKET as ``@lazyd/<lazyd pid>/<service>/<8 random hex>``.  Abstract, so
there is no file to clean up and no file mode to keep a service running as
another user out.  The socket has SO_PASSCRED on, so the kernel attaches the
sender's pid, uid and gid to every datagram; the caller then believes a message
only if `belongs_to(message.pid, main_pid)`.

One datagram is one message of newline-separated ``KEY=VALUE`` assignments.
Understood: READY=1, STATUS=..., STOPPING=1, MAINPID=..., BARRIER=1.  Other keys
are kept in `fields` and otherwise ignored.  Every file descriptor that comes
with a message is closed at once, whatever the message says (off the event
loop: see lazyd/rights.py, since anyone can send to an abstract socket):

- BARRIER=1 (sd_notify_barrier(3), and `systemd-notify`, which sends one after
  every message unless given --no-block): the sender waits until the fd it
  passed is closed on our side, so closing it at once is the whole answer and
  is what systemd does.  If we kept it, systemd-notify 252 would wait 5 s and
  exit 1 ("Failed to invoke barrier: Connection timed out").
- FDSTORE=1 and anything else: lazyd keeps no fd store, and a kept fd would
  be a leak.

What `systemd-notify` 252 really sends (found by experiment, run from
``sh -c 'systemd-notify --ready --status="warming up"'``):

1. ``READY=1\\nSTATUS=warming up`` with SCM_CREDENTIALS naming its *parent*
   (the shell), not itself: it calls sd_pid_notify(getppid(), ...) so that
   the message counts for the process that ran it.  Sending another pid's
   credentials needs CAP_SYS_ADMIN, so this happens only when it runs as root;
   as any other user the kernel refuses and libsystemd resends with its own pid.
   Either way the pid is the shell or a child of it, so `belongs_to` holds.
2. ``BARRIER=1`` from its own pid, with one fd (a pipe's write end).

Malformed datagrams (too long, not UTF-8, a NUL byte, a line without '=', an
empty key, a MAINPID that is not a pid, no credentials, more than 16 fds) make
`NotifySocket.receive` raise `NotifyError`.  The socket stays usable: the
caller logs the error and calls `receive` again.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType

import trio

from lazyd.net.rights import (
    MAX_PENDING,
    RIGHTS_SPACE,
    close_received,
    pending_closes,
    received_fds,
    wait_for_room,
)
from lazyd.privileged.handoff import NOTIFY_TOKEN_LENGTH, notify_socket_name

# systemd accepts at most PIPE_BUF bytes per notification; so do we.
NOTIFY_MAX_BYTES = 4096
# Senders pass one fd (BARRIER=1); more is a malformed message.  There is room
# for as many as a message can carry all the same: the kernel drops the fds
# that do not fit inside our recvmsg, and dropping the last reference to one
# can block (see lazyd/rights.py).
NOTIFY_MAX_FDS = 16

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_ANCILLARY_SPACE = socket.CMSG_SPACE(_UCRED.size) + RIGHTS_SPACE

# /proc walks stop here: a real process tree is never this deep, and a bound
# keeps a walk racing with pid reuse from going on for ever.
_MAX_ANCESTRY = 1024


class NotifyError(ValueError):
    """A notify datagram that lazyd cannot use; the socket still works.

    `pid` is the sender's pid when the kernel told us, else None.
    """

    def __init__(self, reason: str, pid: int | None = None) -> None:
        self.reason = reason
        self.pid = pid
        super().__init__(reason if pid is None else f"{reason} (from pid {pid})")


def parse_notify(data: bytes) -> dict[str, str]:
    """Parse one notify datagram into its assignments.

    Lines are separated by '\\n' (and '\\r', as systemd does); empty lines are
    ignored; a key assigned twice keeps its last value.  Raises ValueError
    for data that is not UTF-8, holds a NUL byte, has a non-empty line without
    '=' or a line with an empty key.
    """
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"contains a NUL byte at offset {nul}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (bad byte at offset {exc.start})") from None
    fields: dict[str, str] = {}
    for number, line in enumerate(re.split(r"[\r\n]", text), start=1):
        if not line:
            continue
        key, equals, value = line.partition("=")
        if not equals:
            raise ValueError(f"line {number} is not KEY=VALUE: {line[:40]!r}")
        if not key:
            raise ValueError(f"line {number} has an empty key: {line[:40]!r}")
        fields[key] = value
    return fields


def _parse_pid(text: str) -> int | None:
    # Decimal digits only: int() would also take "+5", " 5" and "5_0".
    if not (text.isascii() and text.isdigit()):
        return None
    pid = int(text)
    return pid if 0 < pid < 2**31 else None


@dataclass(frozen=True)
class NotifyMessage:
    """One notify datagram with the sender's credentials (from the kernel)."""

    pid: int
    uid: int
    gid: int
    fields: Mapping[str, str]

    @property
    def ready(self) -> bool:
        """READY=1: the service finished starting."""
        return self.fields.get("READY") == "1"

    @property
    def stopping(self) -> bool:
        """STOPPING=1: the service is shutting down of its own accord."""
        return self.fields.get("STOPPING") == "1"

    @property
    def status(self) -> str | None:
        """STATUS=...: free text for `lazyd status`; "" clears it; None if not sent."""
        return self.fields.get("STATUS")

    @property
    def mainpid(self) -> int | None:
        """MAINPID=...: the service's new main pid, or None if absent or not a pid.

        Never raises.  `NotifySocket.receive` refuses a message whose MAINPID is
        present but not a pid, so on a received message None means "absent".
        """
        value = self.fields.get("MAINPID")
        return None if value is None else _parse_pid(value)


class NotifySocket:
    """A bound notify socket for one service; see `open_notify_socket`.

    Close it with `close()` or use it as a context manager.  Call `receive` from
    one place at a time.
    """

    def __init__(self, sock: socket.socket, address: str) -> None:
        self._sock = sock
        self.address = address  # the NOTIFY_SOCKET value, with its leading '@'

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fileno(self) -> int:
        """The socket's fd: shown to the spawner as proof that the address is lazyd's."""
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() == -1

    def close(self) -> None:
        """Close the socket; a caller blocked in `receive` gets trio.ClosedResourceError."""
        if self.closed:
            return
        # Outside trio.run this raises RuntimeError, and nobody can be waiting.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    def _recvmsg(self) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
        # MSG_CMSG_CLOEXEC: a process spawned in the moment before the fds are
        # closed must not inherit them.
        data, ancillary, flags, _ = self._sock.recvmsg(
            NOTIFY_MAX_BYTES, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
        )
        return data, ancillary, flags

    async def receive(self) -> NotifyMessage:
        """Wait for the next datagram and return it as a message.

        Raises NotifyError for a malformed datagram (the socket stays usable:
        log it and call again), trio.ClosedResourceError once closed.  Any fds
        that came with the datagram are handed to closer threads before this
        returns or raises, and closed there at once (or as soon as the kernel
        lets a close end: never on the event loop).  Check
        `belongs_to(message.pid, ...)` straight away: the sender may exit, and
        its pid be reused, at any moment after sending.
        """
        while True:
            if self.closed:
                raise trio.ClosedResourceError("the notify socket was closed")
            # Waiting first means every call passes through a trio checkpoint.
            await trio.lowlevel.wait_readable(self._sock)
            if pending_closes() >= MAX_PENDING:
                # Fds received earlier are still being closed (a close that
                # blocks): take no more until they stop piling up.
                await trio.to_thread.run_sync(wait_for_room, abandon_on_cancel=True)
            try:
                # In a worker thread: whatever the kernel drops inside this
                # call, it drops there, not on the event loop.
                data, ancillary, flags = await trio.to_thread.run_sync(self._recvmsg)
            except BlockingIOError:
                continue  # someone else took it, or a spurious wakeup
            except OSError:
                if self.closed:  # closed while the thread was on its way
                    raise trio.ClosedResourceError("the notify socket was closed") from None
                raise
            break
        fds, credentials = _take_ancillary(ancillary)
        pid = credentials[0] if credentials is not None else None
        if flags & socket.MSG_TRUNC:
            raise NotifyError(f"datagram longer than {NOTIFY_MAX_BYTES} bytes", pid)
        if fds > NOTIFY_MAX_FDS or flags & socket.MSG_CTRUNC:
            raise NotifyError(f"more than {NOTIFY_MAX_FDS} file descriptors attached", pid)
        # pid 0: the kernel could not name the sender (another pid namespace).
        if credentials is None or credentials[0] <= 0:
            raise NotifyError("no sender credentials", None)
        try:
            fields = parse_notify(data)
        except ValueError as exc:
            raise NotifyError(str(exc), pid) from None
        if "MAINPID" in fields and _parse_pid(fields["MAINPID"]) is None:
            # The whole message is refused rather than half-believed: a sender
            # that gets its main pid wrong should be told so in the log.
            raise NotifyError(f"MAINPID is not a pid: {fields['MAINPID'][:40]!r}", pid)
        return NotifyMessage(
            pid=credentials[0],
            uid=credentials[1],
            gid=credentials[2],
            fields=MappingProxyType(fields),
        )


def _take_ancillary(
    ancillary: list[tuple[int, int, bytes]],
) -> tuple[int, tuple[int, int, int] | None]:
    """Hand every fd passed in `ancillary` to the closers; return how many
    there were, and the credentials, if any."""
    fds = received_fds(ancillary)
    close_received(fds)
    credentials: tuple[int, int, int] | None = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and (
            len(payload) >= _UCRED.size
        ):
            pid, uid, gid = _UCRED.unpack_from(payload)
            credentials = (pid, uid, gid)
    return len(fds), credentials


def open_notify_socket(service: str) -> NotifySocket:
    """Bind a fresh abstract notify socket for `service`, with SO_PASSCRED on.

    Characters outside ``A-Za-z0-9._:+-`` in the service name become '_' in
    the socket name, and the name is cut to fit the 107 bytes of sun_path.
    """
    name = notify_socket_name(service, os.getpid(), secrets.token_hex(NOTIFY_TOKEN_LENGTH // 2))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        # Before bind: a datagram can arrive the moment the name exists, and
        # the kernel attaches credentials only if the option is on by then.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind("\0" + name)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return NotifySocket(sock, "@" + name)


def _read_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of `pid` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:  # ENOENT, or ESRCH for a process that died mid-read
        return None
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and
    # parentheses of its own, but the kernel ends it with the last ')'.
    closing = raw.rfind(b")")
    fields = raw[closing + 1 :].split()
    if closing < 0 or len(fields) < 4:
        return None
    try:
        return int(fields[1]), int(fields[3])
    except ValueError:
        return None


def belongs_to(pid: int, main_pid: int) -> bool:
    """Whether `pid` is the service's main process or one of its own.

    True if `pid` is `main_pid`, a descendant of it (walking PPid in
    /proc/<pid>/stat), or in the session `main_pid` leads (lazyd starts every
    service with start_new_session, so this catches a daemonised grandchild
    that was reparented to init but kept the session).

    A pid that no longer exists is False: a sender that exited before we
    looked cannot be verified (systemd has the same race).  Call this as
    soon as the message is received.  Root can forge SCM_CREDENTIALS, so a
    service running as root can speak for any pid; that is no worse than
    what root can do anyway.
    """
    if pid <= 0 or main_pid <= 0:
        return False
    if pid == main_pid:
        return True
    stat = _read_stat(pid)
    if stat is None:
        return False
    parent, session = stat
    if session == main_pid:
        return True
    for _ in range(_MAX_ANCESTRY):
        if parent == main_pid:
            return True
        if parent <= 1:  # init (or the kernel's pid 0): the chain ends here
            return False
        stat = _read_stat(parent)
        if stat is None:
            return False
        parent = stat[0]
    return False
