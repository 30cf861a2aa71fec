"""The helper's container operations: start, stop, kill, inspect and run the
healthcheck of the containers its table names, and follow what becomes of
the ones it started (their events and their output).

The engine socket is root-equivalent, so only this helper talks to it, and
only about the container of a ``container`` entry of its sealed table (the
request names a service, never a container): a taken-over daemon can start
and stop the configured containers and nothing else; it cannot create,
exec, pull or remove anything, nor reach a container or an engine the table
does not name (`lazyd.backends.container.engine` cannot even say those).

Why threads: the helper's poll loop forks and signals processes, and must
never wait for an engine (a remote one may take seconds to answer, or
never).  Each operation runs in a thread of its own, with the blocking
client; what it has to say goes into a queue, and a byte on a pipe wakes the
poll loop, which sends it (only the poll loop writes to the daemon's socket,
so messages never interleave).  A start's thread then follows the
container's events until it dies, and a second thread, started once the
first has inspected the container (whether it has a TTY), copies its output
(demultiplexed) into a socket whose other end the start's reply carried to
the daemon.  At most MAX_OPERATIONS threads run at once; past that a
request is refused.  The forked children of spawns copy only the thread
that forks (fork(2) duplicates the calling thread alone), and a child runs
no Python code that a lock of another thread could block.

Standard library only, and not even `typing` (see `lazyd.privileged`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time

from lazyd.backends.container.engine import TLS, Engine, EngineError
from lazyd.privileged import protocol
from lazyd.privileged.entries import ContainerEntry
from lazyd.privileged.fields import ProtocolError

TYPE_CHECKING = False  # not from typing, which the helper would have to import
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from lazyd.privileged.entries import Entry

MAX_OPERATIONS = 256  # engine threads at once (a start takes two while its container runs)
EXIT_WAIT = 5.0  # seconds the helper gives its last kills when the daemon is gone
SENT_WAIT = 1.0  # seconds a start's thread waits for its reply to be sent, at most
ENGINE_STAGE = "engine"  # the stage of an error reply the engine caused
_DIED = ("die", "died")  # what Docker and Podman call a container's end in their events


class _Run:
    """A container this helper started and still follows."""

    __slots__ = ("engine", "entry", "events", "output", "over", "service")

    def __init__(self, service: str, engine: Engine, entry: ContainerEntry,
                 output: socket.socket) -> None:
        self.service = service
        self.engine = engine
        self.entry = entry
        self.output = output  # the helper's end of the output socket
        self.events: Any = None  # the followed events, once open
        self.over = False


class Containers:
    """The container operations under way, and what they have to say."""

    def __init__(self) -> None:
        self.wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._results: queue.SimpleQueue[
            tuple[dict[str, Any], list[int], threading.Event | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._engines: dict[tuple[str, Any], Engine] = {}
        self._runs: dict[int, _Run] = {}  # start request id -> what it started
        self._closing = False

    # -- the poll loop's side ------------------------------------------------

    def submit(self, request: protocol.Container, entry: Entry | None) -> None:
        """Run `request` in a thread of its own; its reply comes out of `drain`.
        Raises ProtocolError for a request the table does not allow."""
        name = request.service
        if request.action in ("stop", "kill"):
            # What was started is what is stopped, even if a reload has since
            # removed its service or named another container for it.
            with self._lock:
                live = [run.entry for run in self._runs.values() if run.service == name]
            entry = live[-1] if live else entry
        if entry is None:
            raise ProtocolError(f"unknown service {name!r}")
        if not isinstance(entry, ContainerEntry):
            raise ProtocolError(f"service {name!r} is not a container")
        try:
            engine = self._engine(entry)
        except EngineError as exc:
            self._put(protocol.error_reply(request.id, ENGINE_STAGE, 0, str(exc)))
            self._wake()
            return
        self._thread(self._operate, request, entry, engine, threads=2 if
                     request.action == "start" else 1)

    def drain(self) -> list[tuple[dict[str, Any], list[int], threading.Event | None]]:
        """What the threads have to say, in order: (message, fds to send with it
        and then close, an event to set once it is sent or cannot be)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._results.get_nowait())
        return out

    def close(self) -> None:
        """The daemon is gone: SIGKILL every container started here and still
        running (EXIT_WAIT seconds at most, all at once), stop following."""
        with self._lock:
            self._closing = True
            runs = [run for run in self._runs.values() if not run.over]
        killers = []
        for run in runs:
            killer = threading.Thread(target=_quietly_kill, args=(run,), daemon=True)
            killer.start()
            killers.append(killer)
        deadline = time.monotonic() + EXIT_WAIT
        for killer in killers:
            killer.join(max(0.0, deadline - time.monotonic()))
        for run in runs:
            _stop_following(run)

    # -- the threads ---------------------------------------------------------

    def _operate(self, request: protocol.Container, entry: ContainerEntry, engine: Engine) -> None:
        name = entry.container
        try:
            if request.action == "start":
                self._start(request.id, request.service, entry, engine)
                return
            if request.action == "stop":
                assert request.timeout is not None
                engine.stop(name, request.timeout)
                reply = protocol.ok_reply(request.id)
            elif request.action == "kill":
                assert request.signal is not None
                engine.kill(name, request.signal)
                reply = protocol.ok_reply(request.id)
            elif request.action == "inspect":
                reply = protocol.container_reply(request.id, engine.inspect(name))
            else:
                health = engine.healthcheck(name)
                reply = protocol.container_reply(request.id, {"health": health})
        except EngineError as exc:
            reply = protocol.error_reply(request.id, ENGINE_STAGE, 0, str(exc))
        self._put(reply)

    def _start(self, request_id: int, service: str, entry: ContainerEntry,
               engine: Engine) -> None:
        """Start the container; reply with its output socket; follow it until it dies."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        name = entry.container
        since = time.time()  # its output from this start on, not a previous run's
        try:
            engine.start(name)
        except EngineError as exc:
            ours.close()
            theirs.close()
            self._done()  # the output's thread, counted at submit, will not run
            self._put(protocol.error_reply(request_id, ENGINE_STAGE, 0, str(exc)))
            return
        # The reply goes first: the start's time is the engine's answer, and
        # what the follower learns (its id, its death) comes after it. This
        # thread waits until the poll loop has sent it: following, it would
        # hold the GIL that the poll loop needs to send it (until its first
        # wait for the engine), and the daemon would learn of the start ~1 ms
        # late.
        sent = threading.Event()
        self._put(protocol.container_reply(request_id, {"state": "running"}), [theirs.detach()],
                  sent)
        sent.wait(SENT_WAIT)
        run = _Run(service, engine, entry, ours)
        with self._lock:
            self._runs[request_id] = run
        self._follow(request_id, run, since)

    def _follow(self, request_id: int, run: _Run, since: float) -> None:
        """Notices of what becomes of a started container, until it has died;
        and, once it is inspected, the thread that copies its output."""
        name = run.entry.container
        info: dict[str, Any] = {"state": "running"}
        copying = False
        try:
            events = run.engine.events(name)
            with self._lock:
                run.events = events
                closing = self._closing
            if closing:
                events.close()
            # Opened after the start (so that the start waits for nothing
            # else): a death in between shows in the inspection instead.
            info = run.engine.inspect(name)
            # The output is followed from here, not from its own start: this
            # inspection says whether it has a TTY, and one inspection, not
            # two, competes with the container's own start for the CPU. Its
            # output since the start is not lost (`since`). The thread
            # counted for the output at submit time is this one.
            threading.Thread(target=self._copy_output, args=(run, since, info["tty"]),
                             daemon=True).start()
            copying = True
            if not info["running"]:
                self._over(request_id, run, info, info["exit_code"])
                return
            self._put(protocol.container_notice(request_id, info, None))
            for event in events:
                if event["action"] in _DIED:
                    code = event["exit_code"]
                    if code is None:
                        info = run.engine.inspect(name)
                        code = info["exit_code"]
                    self._over(request_id, run, {**info, "state": "exited"}, code)
                    return
            raise EngineError(f"engine {run.engine.address}: stopped following {name!r}")
        except EngineError as exc:
            self._over(request_id, run, info, None, str(exc))
        finally:
            if not copying:
                run.output.close()
                self._done()  # the output's thread, counted at submit, will not run
            run.over = True

    def _over(self, request_id: int, run: _Run, info: dict[str, Any], code: int | None,
              error: str | None = None) -> None:
        with self._lock:
            self._runs.pop(request_id, None)
        self._put(protocol.container_notice(request_id, info, code, error))

    def _copy_output(self, run: _Run, since: float, tty: bool) -> None:
        """The container's output, as it comes, into the socket the daemon reads."""
        try:
            with (contextlib.suppress(EngineError, OSError),
                  run.engine.logs(run.entry.container, since=since, tty=tty) as logs):
                for _stream, data in logs:
                    # MSG_NOSIGNAL: the helper leaves SIGPIPE at its default,
                    # which would end it if the daemon has closed its end.
                    run.output.sendall(data, socket.MSG_NOSIGNAL)
        finally:
            run.output.close()
            self._done()

    # -- plumbing ------------------------------------------------------------

    def _engine(self, entry: ContainerEntry) -> Engine:
        tls = entry.tls
        key = (entry.engine, None if tls is None else (tls["ca"], tls["cert"], tls["key"]))
        engine = self._engines.get(key)
        if engine is None:
            client = None if tls is None else TLS(tls["ca"], tls["cert"], tls["key"])
            engine = self._engines[key] = Engine(entry.engine, client)
        return engine

    def _thread(self, target: Any, *args: Any, threads: int) -> None:
        with self._lock:
            if self._threads + threads > MAX_OPERATIONS:
                raise ProtocolError(f"more than {MAX_OPERATIONS} engine operations at once")
            self._threads += threads

        def run() -> None:
            try:
                target(*args)
            finally:
                self._done()

        threading.Thread(target=run, daemon=True).start()

    def _done(self) -> None:
        with self._lock:
            self._threads -= 1

    def _put(self, message: dict[str, Any], fds: Sequence[int] = (),
             sent: threading.Event | None = None) -> None:
        self._results.put((message, list(fds), sent))
        self._wake()

    def _wake(self) -> None:
        # A full pipe already holds a wake-up the poll loop has not read.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"!")


def _quietly_kill(run: _Run) -> None:
    with contextlib.suppress(EngineError):
        run.engine.kill(run.entry.container, "SIGKILL")


def _stop_following(run: _Run) -> None:
    events = run.events
    if events is not None:
        events.close()
    with contextlib.suppress(OSError):
        run.output.shutdown(socket.SHUT_RDWR)
