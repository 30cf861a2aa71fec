"""A reload in the helper: the table reader it runs, and what that printed.

A reload reads the table anew from the config file, not from the daemon:
after the drop, what the daemon says about commands and users is not to be
trusted.  `TableReader` runs `lazyd.privileged.read_table` (a fresh, isolated
interpreter with lazyd's config loader) with the helper's own credentials,
collects what it prints (MAX_TABLE bytes at most) and checks it as strictly
as any request (`lazyd.privileged.protocol.parse_table_answer`).  The helper's
poll loop feeds it; the reader process is reaped like any child.

Standard library only, and not even `typing` (see `lazyd.privileged`).
"""

from __future__ import annotations

import contextlib
import os
import signal

from lazyd.privileged import protocol, read_table
from lazyd.privileged.fields import ProtocolError

TYPE_CHECKING = False  # not from typing, which the helper would have to import
if TYPE_CHECKING:
    from typing import Any

    from lazyd.privileged.entries import Entry


class TableReader:
    """A table reader started by a reload, and what it printed so far."""

    __slots__ = ("data", "fd", "pid", "request_id")

    def __init__(
        self, request_id: int, config: str, nofile_soft: int | None, path: str, stdin: int
    ) -> None:
        """Start the reader of `config` (PATH `path`, `stdin` as its fd 0); its
        output is at `fd`, to be read when the poll loop says so."""
        argv = read_table.command(config, nofile_soft)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, write_fd, 1)]
            # DOCKER_HOST, as lazyd had it: a container's default engine.
            env = {"PATH": path, **{k: v for k, v in os.environ.items() if k == "DOCKER_HOST"}}
            self.pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.request_id = request_id
        self.fd = read_fd
        self.data = b""

    def feed(self) -> bool:
        """Read what the reader printed; True once it is all there (or too much)."""
        try:
            chunk = os.read(self.fd, 4096)
        except BlockingIOError:
            return False
        self.data += chunk
        return not chunk or len(self.data) > protocol.MAX_TABLE

    def reaped(self, pid: int) -> None:
        """`pid` was reaped: if it was the reader, its pid is free for anyone now."""
        if pid == self.pid:
            self.pid = 0

    def abandon(self) -> None:
        """Stop reading; kill the reader if it still runs (a config on a hung mount)."""
        os.close(self.fd)
        if self.pid:  # not reaped yet: the pid is still the reader's
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def answer(self) -> tuple[dict[str, Entry] | None, dict[str, Any]]:
        """Once fed: the table read (None when there is none) and the reply to the reload."""
        try:
            table, problems = protocol.parse_table_answer(self.data)
        except ProtocolError as exc:
            reply = protocol.error_reply(self.request_id, protocol.RELOAD_STAGE, 0, str(exc))
            return None, reply
        if problems is not None:
            return None, protocol.error_reply(self.request_id, protocol.RELOAD_STAGE, 0,
                                              "the config has errors", problems)
        return table, protocol.reloaded_reply(self.request_id, list(table))
