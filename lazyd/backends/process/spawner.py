"""The daemon's side of the spawner: start it, ask it to spawn and to signal.

`lazyd.privileged.spawnerd` is the process that forks and execs services (its docstring
explains why it exists); `lazyd.privileged.protocol` is what goes between the two,
built and checked with the same functions on both sides. `open_spawner` starts it and
makes it the current one for everything started inside (`current_spawner`).
`Spawner.define` tells it which services it may start and how (sealed before
lazyd drops its privileges), `Spawner.reload` and `commit` make it re-read
that from the config file; `Spawner.spawn` names a service and returns a
`ServiceProcess`, which lazyd waits for, reads and signals much like a
`trio.Process`; `Spawner.take_listener` gets a copy of a service's own
listening socket for the kernel data path (`lazyd.privileged.listeners`).

One reader task routes the spawner's messages: spawn replies to the caller
waiting for them, exit notices to their `ServiceProcess`. Sending never
waits: a request goes straight into the socket (non-blocking; the messages
are small and the spawner answers at once). Should the socket buffer ever be
full, requests wait in order in a bounded outbox that a writer task flushes;
a spawner that stops reading for MAX_OUTBOX messages is treated as lost.
That keeps `send_signal` and `signal_group` synchronous, which is what the
lifecycle layer needs: it signals while handling an event.

Losing the spawner (it exited, or stopped reading) is fatal: lazyd can then
neither start nor stop anything, so the reader raises LaunchError, which ends
`open_spawner`'s body; waiting spawns and `ServiceProcess.wait` raise it too,
and `open_spawner` raises it once. The services' main processes die with the
spawner (see `lazyd.privileged.spawnerd`).
"""

from __future__ import annotations

import array
import contextvars
import functools
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from lazyd.errors import LaunchError
from lazyd.privileged import protocol
from lazyd.privileged.fields import ProtocolError

MAX_SPAWNS_WAITING = 32  # spawn requests awaiting their reply; more wait their turn
MAX_OUTBOX = 1024  # requests waiting for room in the socket buffer
EXIT_TIMEOUT = 5.0  # seconds the spawner gets to kill what is left and exit

# Replies carry at most one fd; room for a few more, so extra ones are seen (and closed).
_ANCILLARY = socket.CMSG_SPACE(4 * array.array("i").itemsize)


_current: contextvars.ContextVar[Spawner] = contextvars.ContextVar("lazyd_spawner")


class SpawnError(Exception):
    """The spawner could not start a process.

    `stage` names the step that failed ("exec", "chdir", "setuid", "fork",
    "resolve", "request", "reload", ...); `errno` is its errno, 0 when there is
    none. The message is the reason alone, e.g. "No such file or directory".
    """

    def __init__(self, reason: str, stage: str, errno: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.errno = errno
        self.problems: list[str] = []  # a reload's: the config's problems


class ServiceProcess:
    """A process started by the spawner; it leads its own session and process group.

    `stdout` carries its stdout and stderr; the owner closes it. `wait()`
    returns the exit status (negative: killed by that signal). The signal
    methods queue a request to the spawner and return at once; once the
    process is known to have exited they do nothing (its group was already
    sent SIGKILL by the spawner when it reaped it).
    """

    def __init__(self, spawner: Spawner, pid: int, stdout_fd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = trio.lowlevel.FdStream(stdout_fd)
        self._spawner = spawner
        self._exited = trio.Event()

    async def wait(self) -> int:
        """Wait until the process has exited; its exit status."""
        await self._exited.wait()
        if self.returncode is None:
            raise LaunchError(f"pid {self.pid}: lost with lazyd's spawner")
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the process itself."""
        if not self._exited.is_set():
            self._spawner._signal(self.pid, sig, group=False)

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the process's whole group: the service and what it started."""
        if not self._exited.is_set():
            self._spawner._signal(self.pid, sig, group=True)

    def _exit(self, returncode: int | None) -> None:
        self.returncode = returncode
        self._exited.set()


class ContainerRun:
    """A container started by the spawner (`Spawner.start_container`).

    `output` carries its output (both streams, demultiplexed); the owner
    closes it. `wait()` returns once it has died, with its exit status; `id`,
    `state` and `health` are what the engine said of it last.
    """

    def __init__(self, service: str, start_id: int, output_fd: int) -> None:
        self.service = service
        self.start_id = start_id
        self.output = trio.lowlevel.FdStream(output_fd)
        self.id: str | None = None
        self.state: str | None = "running"
        self.health: str | None = None
        self.returncode: int | None = None
        self.error: str | None = None  # why it can no longer be followed
        self._over = trio.Event()

    @property
    def over(self) -> bool:
        return self._over.is_set()

    async def wait(self) -> int:
        """Wait until the container has died; its exit status. Raises LaunchError
        when it can no longer be followed (the engine or the spawner went away)."""
        await self._over.wait()
        if self.returncode is None:
            raise LaunchError(self.error or f"{self.service}: lost with lazyd's spawner")
        return self.returncode

    def _notice(self, notice: protocol.ContainerNotice) -> None:
        info = notice.container
        self.id = info.id or self.id
        self.state = info.state or self.state
        self.health = info.health or self.health
        if notice.over:
            self.returncode, self.error = notice.returncode, notice.error
            self._over.set()

    def _lost(self, why: str) -> None:
        self.error = why
        self._over.set()


class _Reply:
    """What a spawn request is waiting for."""

    __slots__ = ("abandoned", "container", "done", "error", "fd", "message", "process",
                 "run")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.container: str | None = None  # a container start's service
        self.run: ContainerRun | None = None  # what a container start started
        self.process: ServiceProcess | None = None
        self.fd: int | None = None  # a listener request's socket
        self.error: SpawnError | None = None
        self.message: protocol.Reply | None = None
        self.abandoned = False  # the caller was cancelled: kill what comes

    @property
    def services(self) -> list[str]:
        """A reload's: the services in the table it read."""
        done = self.message
        return (done.services or []) if isinstance(done, protocol.Done) else []


class Spawner:
    """A running spawner process, from the daemon's side. Made by `open_spawner`."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.pid = pid  # the spawner process's
        self._sock = sock
        self._next_id = 0
        self._waiting: dict[int, _Reply] = {}
        self._processes: dict[int, ServiceProcess] = {}
        self._runs: dict[int, ContainerRun] = {}  # container starts, by their request id
        self._outbox: deque[tuple[bytes, list[int]]] = deque()
        self._outbox_ready = trio.Event()
        self._slots = trio.Semaphore(MAX_SPAWNS_WAITING)
        self._lost: str | None = None  # why it can no longer be used
        self.sealed = False  # its table of services takes no more definitions

    async def define(
        self,
        services: Mapping[str, Mapping[str, Any]],
        *,
        config: str | None = None,
        path: str | None = None,
        nofile_soft: int | None = None,
        seal: bool = False,
    ) -> None:
        """Tell the spawner which services it may start, and how (see `launch.entry`).

        Entries are added to what it knows. `seal`: accept no definitions
        after these; from then on only `reload` changes the table, by reading
        `config` itself (with `path` as PATH and `nofile_soft` for each
        service). A big table goes in several messages, sealed with the last.
        Raises SpawnError when the spawner refuses it.
        """
        names = list(services)
        first = 0
        while True:
            # As many entries as fit in one message.
            last = len(names)
            while True:
                chunk = {name: services[name] for name in names[first:last]}
                build = functools.partial(
                    protocol.define_request, services=chunk, config=config, path=path,
                    nofile_soft=nofile_soft, seal=seal and last == len(names),
                )
                # (Room for the id, which is not known yet.)
                size = len(protocol.encode(build(0)))
                if size + 64 <= protocol.MAX_MESSAGE or last - first <= 1:
                    break
                last = first + max(1, (last - first) // 2)
            await self._request(build)
            if last >= len(names):
                self.sealed = self.sealed or seal
                return
            first = last

    async def reload(self) -> list[str]:
        """Make the spawner read its table anew from the config file; the services in it.

        The table read takes effect with `commit`. Raises SpawnError (stage
        "reload", with the config's `problems`) when the file has errors or
        the reader failed.
        """
        reply = await self._request(protocol.reload_request)
        return list(reply.services)

    async def commit(self) -> None:
        """Replace the spawner's table with the one its last `reload` read."""
        await self._request(protocol.commit_request)

    async def spawn(
        self,
        service: str,
        *,
        env: Mapping[str, str] | None = None,
        fds: Sequence[int] = (),
        notify_fd: int | None = None,
    ) -> ServiceProcess:
        """Start `service` as its table entry says; return once it has exec'd.

        `env` adds LISTEN_FDS and LISTEN_FDNAMES (which must describe `fds`,
        as the table does) and NOTIFY_SOCKET, nothing else; LISTEN_PID is set
        by the child. `fds` land at 3, 4, ... in order. With NOTIFY_SOCKET,
        `notify_fd` is the notify socket itself, shown to the spawner (not to
        the service) as proof that the address is lazyd's own. Raises
        SpawnError when the process could not be started.
        """
        build = functools.partial(protocol.spawn_request, service=service, env=env or {})
        sent = [*fds] if notify_fd is None else [*fds, notify_fd]
        if len(sent) > protocol.MAX_FDS:
            raise SpawnError(f"more than {protocol.MAX_FDS} sockets", protocol.REQUEST_STAGE, 0)
        reply = await self._request(build, sent)
        assert reply.process is not None
        return reply.process

    async def take_listener(self, pid: int, socket_name: str) -> int:
        """A copy of the listening socket that service process `pid` binds for its
        socket `socket_name` (for the kernel data path: `lazyd.privileged.listeners`
        says which, and why only then); the caller closes it. Raises SpawnError
        saying why not (stage "request")."""
        build = functools.partial(protocol.listener_request, pid=pid, socket_name=socket_name)
        reply = await self._request(build)
        assert reply.fd is not None
        return reply.fd

    async def start_container(self, service: str) -> ContainerRun:
        """Start `service`'s container (a ``container`` entry of the table);
        return once its engine has answered. Raises SpawnError (stage "engine"
        with the engine's words, or "request") when it could not be started."""
        build = functools.partial(protocol.container_request, service=service, action="start")
        reply = await self._request(build, container=service)
        assert reply.run is not None
        return reply.run

    async def container(
        self, service: str, action: str, *, timeout: int | None = None, sig: int | None = None
    ) -> protocol.ContainerInfo | None:
        """Have the spawner `action` (stop, kill, inspect, health) `service`'s
        container; what the engine said of it (inspect, health). Raises SpawnError."""
        build = functools.partial(protocol.container_request, service=service, action=action,
                                  timeout=timeout, sig=sig)
        reply = await self._request(build)
        message = reply.message
        return message.container if isinstance(message, protocol.ContainerDone) else None

    def container_soon(
        self, service: str, action: str, *, timeout: int | None = None, sig: int | None = None
    ) -> None:
        """`container` without waiting for the reply (stop and kill from a
        signal: what becomes of it shows in the container's notices)."""
        if self._lost is None:
            self._send(protocol.container_request(self._new_id(), service, action,
                                                  timeout=timeout, sig=sig))

    async def _request(
        self, build: Callable[[int], dict[str, Any]], fds: Sequence[int] = (),
        container: str | None = None,
    ) -> _Reply:
        """Send the request `build` makes for a new id and wait for its reply; raise
        SpawnError for an error reply."""
        try:
            # Not `async with`: acquire() yields to the scheduler even when a
            # slot is free, and a start should not wait for other tasks to run.
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            request_id = self._new_id()
            header = build(request_id)
            reply = _Reply()
            reply.container = container
            self._waiting[request_id] = reply
            sent = False
            try:
                self._send(header, fds)
                sent = True
                await reply.done.wait()
            except BaseException:
                if not sent:
                    self._waiting.pop(request_id, None)
                elif reply.process is not None:
                    # Started, but nobody is left to own it.
                    reply.process.signal_group(signal.SIGKILL)
                    reply.process.stdout.close()
                elif reply.fd is not None:
                    os.close(reply.fd)
                elif reply.run is not None:
                    self._abandon(reply.run)
                else:
                    reply.abandoned = True
                raise
        finally:
            self._slots.release()
        if reply.error is not None:
            raise reply.error
        return reply

    # -- sending -------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _signal(self, pid: int, sig: int, *, group: bool) -> None:
        if self._lost is not None:
            return  # nothing can be signalled any more; wait() says why
        self._send(protocol.signal_request(self._new_id(), pid, sig, group=group))

    def _send(self, header: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self._lost is not None:
            raise SpawnError(self._lost, "spawner", 0)
        data = protocol.encode(header)
        if len(data) > protocol.MAX_MESSAGE:
            raise SpawnError(
                f"command line and environment exceed {protocol.MAX_MESSAGE} bytes",
                protocol.REQUEST_STAGE, 0,
            )
        if not self._outbox:  # else it would overtake what waits there
            try:
                self._sendmsg(data, fds)
                return
            except BlockingIOError:
                pass
        if len(self._outbox) >= MAX_OUTBOX:
            self._lose("lazyd's spawner stopped reading requests")
            raise LaunchError("lazyd's spawner stopped reading requests")
        # Copies: the caller may close its fds before the message leaves.
        self._outbox.append((data, [os.dup(fd) for fd in fds]))
        self._outbox_ready.set()

    def _sendmsg(self, data: bytes, fds: Sequence[int]) -> None:
        try:
            self._sock.sendmsg([data], protocol.fds_ancillary(fds), socket.MSG_NOSIGNAL)
        except BlockingIOError:
            raise
        except OSError as exc:
            self._lose(f"lazyd's spawner is gone ({os.strerror(exc.errno or 0)})")
            raise LaunchError(f"lazyd's spawner is gone ({os.strerror(exc.errno or 0)})") from None

    async def _run_writer(self) -> None:
        """Flush the outbox, in order, whenever the socket has room."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            while self._outbox:
                data, fds = self._outbox[0]
                await trio.lowlevel.wait_writable(self._sock)
                try:
                    self._sendmsg(data, fds)
                except BlockingIOError:
                    continue
                self._outbox.popleft()
                for fd in fds:
                    os.close(fd)

    # -- receiving -----------------------------------------------------------

    async def _run_reader(self) -> None:
        """Route every message from the spawner until it goes away (fatal)."""
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                data, ancdata, _flags, _ = self._sock.recvmsg(
                    protocol.MAX_MESSAGE, _ANCILLARY, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
            except OSError as exc:
                data, ancdata = b"", []
                self._lose(f"lazyd's spawner is gone ({os.strerror(exc.errno or 0)})")
            fds = protocol.received_fds(ancdata)
            try:
                if not data:
                    self._lose("lazyd's spawner exited")
                    raise LaunchError(self._lost or "lazyd's spawner exited")
                try:
                    message = protocol.parse_reply(data)
                except ProtocolError as exc:
                    # The helper is lazyd's own: a message it should not send
                    # means it cannot be relied on any more.
                    self._lose(f"lazyd's spawner sent a malformed message ({exc})")
                    raise LaunchError(self._lost or "lazyd's spawner is lost") from None
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            self._route(message, fds)

    def _abandon(self, run: ContainerRun) -> None:
        """A container started for a caller that is gone: kill it."""
        run.output.close()
        if not run.over:
            self.container_soon(run.service, "kill", sig=signal.SIGKILL)

    def _route(self, message: protocol.Reply, fds: list[int]) -> None:
        if isinstance(message, protocol.ContainerNotice):
            for fd in fds:
                os.close(fd)
            run = self._runs.get(message.start)
            if run is not None:
                run._notice(message)
                if run.over:
                    del self._runs[message.start]
            return
        if isinstance(message, protocol.Exited):
            process = self._processes.pop(message.pid, None)
            if process is not None:
                process._exit(message.returncode)
            for fd in fds:
                os.close(fd)
            return
        reply = self._waiting.pop(-1 if message.id is None else message.id, None)
        if reply is None:
            # A signal's reply. Its only possible error is a process that has
            # just exited: its exit notice is on the way.
            for fd in fds:
                os.close(fd)
            return
        reply.message = message
        if isinstance(message, protocol.ContainerDone) and reply.container and len(fds) == 1:
            run = ContainerRun(reply.container, message.id, fds[0])
            run.id, run.state = message.container.id, message.container.state
            if reply.abandoned:
                self._abandon(run)
            else:
                reply.run = self._runs[message.id] = run
        elif isinstance(message, protocol.Spawned) and len(fds) == 1:
            if reply.abandoned:
                os.close(fds[0])
                self._signal(message.pid, signal.SIGKILL, group=True)
            else:
                process = ServiceProcess(self, message.pid, fds[0])
                reply.process = self._processes[message.pid] = process
        elif isinstance(message, protocol.Done | protocol.ContainerDone) and not reply.container:
            for fd in fds:
                os.close(fd)
        elif isinstance(message, protocol.Taken) and len(fds) == 1:
            if reply.abandoned:
                os.close(fds[0])
            else:
                reply.fd = fds[0]
        elif isinstance(message, protocol.Taken):
            for fd in fds:
                os.close(fd)
            reply.error = SpawnError("the listener came without its fd", "spawner", 0)
        else:
            for fd in fds:
                os.close(fd)
            if isinstance(message, protocol.Failed):
                reply.error = SpawnError(message.reason, message.stage, message.errno)
                reply.error.problems = message.problems
            elif reply.container is not None:
                # Started, but its output socket did not come with it.
                self.container_soon(reply.container, "kill", sig=signal.SIGKILL)
                reply.error = SpawnError("the container's output socket did not come with "
                                         "its start", "spawner", 0)
            else:
                # Started, but its output pipe did not come with it (lazyd out
                # of fds): nobody can own it.
                assert isinstance(message, protocol.Spawned)
                self._signal(message.pid, signal.SIGKILL, group=True)
                reply.error = SpawnError(f"pid {message.pid} came without its output pipe",
                                         "spawner", 0)
        reply.done.set()

    # -- the end ---------------------------------------------------------------

    def _lose(self, why: str) -> None:
        """From now on every request fails with `why`; wake everyone waiting."""
        if self._lost is not None:
            return
        self._lost = why
        for reply in self._waiting.values():
            reply.error = SpawnError(why, "spawner", 0)
            reply.done.set()
        self._waiting.clear()
        for process in self._processes.values():
            process._exit(None)
        self._processes.clear()
        for run in self._runs.values():
            run._lost(why)
        self._runs.clear()
        for _, fds in self._outbox:
            for fd in fds:
                os.close(fd)
        self._outbox.clear()

    def _close(self) -> None:
        self._lose("lazyd's spawner is closed")
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


def spawner_command(exec_wait_ms: int = protocol.EXEC_WAIT_MS) -> list[str]:
    """The command that runs the spawner, with this interpreter and this copy of lazyd.

    `exec_wait_ms`: how long it waits for one exec before it serves other
    requests meanwhile (see `lazyd.privileged.protocol.EXEC_WAIT_MS`). The
    interpreter runs no site and takes nothing from the environment or the
    current directory (`lazyd.privileged.boot` explains, and checks it).
    """
    # The helper's entry point, by path: the daemon never imports the helper.
    boot = os.path.join(os.path.dirname(os.path.abspath(protocol.__file__)), "boot.py")
    return [sys.executable, "-I", "-S", boot, str(exec_wait_ms)]


@asynccontextmanager
async def open_spawner() -> AsyncIterator[Spawner]:
    """Start a spawner; it is `current_spawner()` inside the block.

    On leaving the block lazyd's end of the socket is closed, upon which the
    spawner sends SIGKILL to the process group of every process it still
    has and exits; this waits for that (EXIT_TIMEOUT at most, then kills it).
    Stop the services first: this is the backstop, not the way to stop them.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # Its fd 0 is the socket. Its stdout and stderr are lazyd's, for a
        # traceback should it ever fail; it writes nothing otherwise.
        # A session of its own: signals meant for lazyd's process group (a
        # terminal's Ctrl-C, a killpg) must not take the spawner with them, or
        # lazyd could no longer stop its services.  If lazyd dies, the spawner
        # sees its end of the socket close and kills the services itself.
        process = await trio.lowlevel.open_process(
            spawner_command(),
            stdin=theirs.fileno(),
            # DOCKER_HOST alone: a reload's table reader resolves a container
            # service's default engine as lazyd did (see its `engine`).
            env={key: os.environ[key] for key in ("DOCKER_HOST",) if key in os.environ},
            close_fds=True,
            start_new_session=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    spawner = Spawner(ours, process.pid)
    token = _current.set(spawner)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spawner._run_reader)
            nursery.start_soon(spawner._run_writer)
            try:
                yield spawner
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Losing the spawner makes every waiting task fail with LaunchError:
        # say it once, as the one error it is, rather than as a tree of them.
        _, rest = group.split(LaunchError)
        if spawner._lost is None or rest is not None:
            raise
        raise LaunchError(spawner._lost) from None
    finally:
        _current.reset(token)
        spawner._close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(EXIT_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def current_spawner() -> Spawner:
    """The spawner of the innermost `open_spawner` block this task runs in."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("no spawner is running (see open_spawner)") from None
