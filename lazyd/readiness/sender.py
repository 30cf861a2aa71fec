"""Who is believed on a service's notify socket.

Any local process can write to the socket (an abstract name has no file
mode), so a message counts only if its sender (SCM_CREDENTIALS) is the
service's main process or one of its descendants, as systemd's
NotifyAccess=all does.  `MAINPID=` may move the main process, but only to a
pid inside the service, unless root says so: MAINPID=1 would make every
process on the machine "one of the service's" and let any local user send
READY=1 for it.  What is ignored is logged once per sender (for the first 64
senders), then at most once per 10 s, so no sender, however many pids it
uses, can flood the log.
"""

from __future__ import annotations

from collections.abc import Callable

from lazyd.logs import ThrottledLog
from lazyd.readiness.notify import NotifyMessage, belongs_to

# Senders named one by one in the log before the rest are only counted.
NAMED_SENDERS = 64


class SenderPolicy:
    """Decides, message by message, what one service's notify socket believes."""

    def __init__(self, name: str, log: Callable[[str], None]) -> None:
        self.name = name
        self.main_pid: int | None = None  # set by the runner at each start
        self._log = log
        self._warned: set[int] = set()
        self._junk = ThrottledLog(log)
        self._foreign = ThrottledLog(log)

    def malformed(self, reason: str) -> None:
        self._junk.say(f"{self.name}: ignoring malformed notify message: {reason}",
                       "more ignored")

    def believe(self, message: NotifyMessage) -> bool:
        """Whether `message` comes from the service; follows a MAINPID= it may give."""
        main = self.main_pid
        if main is None or not belongs_to(message.pid, main):
            if message.pid not in self._warned:
                line = (f"{self.name}: ignoring notify message from pid {message.pid}, "
                        "which is not one of the service's processes")
                if len(self._warned) < NAMED_SENDERS:
                    self._warned.add(message.pid)
                    self._log(line)
                else:
                    self._foreign.say(line, "more ignored")
            return False
        if message.mainpid is not None and message.mainpid != main:
            if message.uid == 0 or belongs_to(message.mainpid, main):
                self.main_pid = message.mainpid
            else:
                self._foreign.say(f"{self.name}: ignoring MAINPID={message.mainpid}, which is "
                                  "not one of the service's processes", "more ignored")
        return True
