"""The spawner: the small process that forks and execs lazyd's services.

Why a separate process: LISTEN_PID must equal the pid that execs the service,
so some code has to run between fork and exec, and in the daemon that forces
CPython to fork() the whole daemon (its page tables included) instead of
vfork()ing. This process is single-threaded and small, so its fork is cheap.
When lazyd runs as root and drops its privileges after binding, this process
is also what stays privileged; so it starts only the services it was told
about before the daemon dropped them, exactly as it was told then, checks
every field of every request, and answers anything else with an error instead
of failing. A daemon taken over after the drop can start and signal the
configured services, and nothing else.

It is started by `lazyd.backends.process.spawner.open_spawner` through
`lazyd.privileged.boot`, as ``python -I -S`` (no site, no environment,
nothing from the current directory on sys.path): it imports only the
standard library, `lazyd.privileged.handoff` and its own modules, and
not even `typing`, to stay small. Its fd 0 is one end of an AF_UNIX
SOCK_SEQPACKET socketpair, the daemon holds the other. What goes through it
is `lazyd.privileged.protocol`'s; the table of services is made of
`lazyd.privileged.entries`; a spawn's fds and variables are checked against
it by `lazyd.privileged.checks`; the forked child becomes the service in
`lazyd.privileged.child`. This module is the rest: the poll loop, the state
(the table, the children, the spawns in flight, a reload under way) and the
reaper. It is longer than most (about 420 lines) because they are one
thing: every handler reads and changes the same state between two polls,
and the order in which a spawn reply, an exit notice and a reap happen is
only visible when they sit together.

A reload reads the table anew from the config file with lazyd's own config
loader, in a fresh interpreter (`lazyd.privileged.read_table`), as this
process's user, so that the daemon never says what is to be run; as root,
only a file that only root can change (directories above it included) is
read. The table read takes effect with a commit.

A spawn's child calls setsid(2), gets /dev/null as stdin and one pipe as
stdout and stderr, its sockets at 3.., default signal dispositions, its
credentials, its workdir, its RLIMIT_NOFILE soft limit and LISTEN_PID (when
it has sockets), and nothing else open. It is answered once exec has
succeeded (or failed).

Exits: before reaping a service's main process, while its pid (and so its
process group id) is still reserved by the zombie, the spawner sends SIGKILL
to the process group: whatever the service left behind goes with it, and no
pid can have been reused in between. Then the daemon gets the exit notice.

Lifetime: the spawner outlives nothing. When the daemon's end closes (lazyd
exits, cleanly or not) it sends SIGKILL to the process group of every process
it started and still has, reaps them and exits. lazyd stops its services
properly (stop signal, then SIGKILL after stop_timeout) before closing it, so
normally nothing is left to kill. It runs in a session of its own, and
SIGINT, SIGTERM and SIGHUP have no effect on it: a Ctrl-C or a signal sent to
lazyd's process group must leave lazyd able to stop its services through the
spawner. Should it be killed all the same (SIGKILL), lazyd stops with an
error, and each service's main process gets SIGKILL as well (its parent-death
signal, PR_SET_PDEATHSIG), so that none outlives it unsupervised.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import resource
import select
import signal
import socket
import stat
import sys

from lazyd.privileged import protocol
from lazyd.privileged.checks import spawn_env
from lazyd.privileged.child import MAX_ERROR, Credentials, ForkError, fork_child, read_failure
from lazyd.privileged.entries import MAX_SERVICES, BrokenEntry, ContainerEntry
from lazyd.privileged.fields import ProtocolError
from lazyd.privileged.handoff import LISTEN_FDS_START
from lazyd.privileged.protocol import MAX_FDS, MAX_MESSAGE, received_fds
from lazyd.privileged.reloading import TableReader

TYPE_CHECKING = False  # not from typing, which this process would have to import
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from lazyd.privileged.entries import Entry

CONTROL_FD = 0
MAX_IN_FLIGHT = 64  # spawns whose exec is not confirmed yet
MAX_CHILDREN = 4096  # processes started and not yet reaped

# The only signals the spawner does not leave at their default. It handles
# them (with a no-op) rather than ignoring them, because exec resets handled
# signals to the default but keeps ignored ones ignored: so a child has no
# signal to reset before exec, which saves it time (see `child.run_child`).
_HANDLED = (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXEC_WAIT_MS = protocol.EXEC_WAIT_MS


class _Gone(Exception):
    """The daemon's end of the socket is closed."""


class _InFlight:
    """A child forked for a spawn request whose exec is not confirmed yet."""

    __slots__ = ("err_r", "out_r", "pid", "request_id")

    def __init__(self, request_id: int, pid: int, out_r: int, err_r: int) -> None:
        self.request_id = request_id
        self.pid = pid
        self.out_r = out_r
        self.err_r = err_r


class Spawnerd:
    """The spawner's state and its poll loop."""

    def __init__(self, control: socket.socket, exec_wait_ms: int = EXEC_WAIT_MS) -> None:
        self.control = control
        self.exec_wait_ms = exec_wait_ms
        # pid -> whether its exit is reported (true once the daemon was told its pid).
        self.children: dict[int, bool] = {}
        self.service_of: dict[int, str] = {}  # pid -> the service it was spawned for
        # Spawns whose exec is not confirmed yet: by pid, and those followed
        # from the poll loop (see EXEC_WAIT_MS) also by error pipe fd.
        self.in_flight_pids: dict[int, _InFlight] = {}
        self.in_flight: dict[int, _InFlight] = {}
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.nofile_hard = hard
        # No fd of ours is above the soft limit: every one was opened under it.
        self.fd_limit = soft if 0 <= soft < 2**31 else 2**31 - 1
        # Above every fd range a request can ask for if the limit allows, so
        # that no spawn needs a temporary copy of it (see `child.fork_child`).
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            high = fcntl.fcntl(self.devnull, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START + MAX_FDS)
            os.close(self.devnull)
            self.devnull = high
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.poller = select.poll()
        self.exec_poller = select.poll()
        self.poller.register(self.control.fileno(), select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        # The daemon: it started this process. Its notify sockets carry its pid.
        self.lazyd_pid = os.getppid()
        # Our credentials never change.
        self.own_groups = sorted(set(os.getgroups()))
        self.own_uids = os.getresuid()
        self.own_gids = os.getresgid()
        # What may be started: service name -> how. Once sealed, only a reload
        # (which reads `config` itself, as this process's user) changes it.
        self.table: dict[str, Entry] = {}
        self.sealed = False
        self.config: str | None = None  # the config file a reload reads
        self.path = os.defpath  # PATH for the table reader, as lazyd's own
        self.nofile_soft: int | None = None
        self.reading: TableReader | None = None  # the table reader of a reload under way
        self.pending: dict[str, Entry] | None = None  # read by a reload, not committed
        # Container operations run in threads of their own; what they say
        # wakes the poll loop (see lazyd.privileged.containers).  Set up at
        # the first one: the engine client (http.client, ssl) is megabytes of
        # a helper that never starts a container.
        self._containers: Any = None

    @property
    def containers(self) -> Any:
        """The container operations (a `lazyd.privileged.containers.Containers`)."""
        if self._containers is None:
            from lazyd.privileged.containers import Containers

            self._containers = Containers()
            self.poller.register(self._containers.wake_r, select.POLLIN)
        return self._containers

    def run(self) -> None:
        """Serve requests until the daemon's end closes; then kill what is left."""
        signal.set_wakeup_fd(self.wake_w)
        for sig in _HANDLED:
            signal.signal(sig, _on_signal)
        try:
            while True:
                for fd, _events in self.poller.poll():
                    if fd == self.wake_r:
                        while _read_some(self.wake_r):
                            pass
                        self.reap()
                    elif fd == self.control.fileno():
                        if not self.handle_request():
                            return
                    elif fd in self.in_flight:
                        self.confirm(self.in_flight[fd])
                    elif self.reading is not None and fd == self.reading.fd:
                        self.read_table(self.reading)
                    elif self._containers is not None and fd == self._containers.wake_r:
                        self.send_container_results()
        except _Gone:
            return
        finally:
            self.kill_all()

    # -- requests ----------------------------------------------------------

    def handle_request(self) -> bool:
        """Read and answer one request; False once the daemon's end is closed."""
        try:
            data, ancdata, flags, _ = self.control.recvmsg(
                MAX_MESSAGE,
                socket.CMSG_SPACE(MAX_FDS * protocol.FD_BYTES),
                socket.MSG_CMSG_CLOEXEC,
            )
        except (ConnectionResetError, BrokenPipeError):
            return False
        fds = received_fds(ancdata)
        if not data and not fds:
            return False  # EOF (lazyd never sends an empty message)
        request_id: int | None = None
        try:
            truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
            request = protocol.parse_request(data, len(fds), truncated=truncated)
            request_id = request.id
            if isinstance(request, protocol.Spawn):
                self.spawn(request, fds)  # answered once exec succeeds or fails
            elif isinstance(request, protocol.Signal):
                self.signal(request)
                self.send(protocol.ok_reply(request_id))
            elif isinstance(request, protocol.Define):
                self.define(request)
                self.send(protocol.ok_reply(request_id))
            elif isinstance(request, protocol.Container):
                # Answered from its thread, through send_container_results.
                self.containers.submit(request, self.table.get(request.service))
            elif isinstance(request, protocol.Reload):
                self.reload(request_id)  # answered once the table is read
            elif isinstance(request, protocol.Listener):
                self.listener(request)
            else:
                if self.pending is None:
                    raise ProtocolError("no table read by a reload to commit")
                self.table, self.pending = self.pending, None
                self.send(protocol.ok_reply(request_id))
        except _Gone:
            raise
        except ProtocolError as exc:
            reply_to = request_id if exc.request_id is None else exc.request_id
            self.fail(reply_to, protocol.REQUEST_STAGE, 0, str(exc))
        except Exception as exc:  # never crash on one request: say what went wrong
            self.fail(request_id, protocol.REQUEST_STAGE, 0, f"{type(exc).__name__}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def define(self, request: protocol.Define) -> None:
        """Add services to the table; with ``seal``, accept no more definitions."""
        if self.sealed:
            raise ProtocolError("the table of services is sealed; only a reload changes it")
        if len(self.table.keys() | request.services.keys()) > MAX_SERVICES:
            raise ProtocolError(f"more than {MAX_SERVICES} services")
        self.table.update(request.services)
        if request.config is not None:
            self.config = request.config
        if request.path is not None:
            self.path = request.path
        self.nofile_soft = request.nofile_soft
        self.sealed = request.seal

    def reload(self, request_id: int) -> None:
        """Start reading the table anew from the config file (`reloading.TableReader`)."""
        if self.config is None:
            raise ProtocolError("no config file to reload from")
        if self.reading is not None:
            # The daemon gave up waiting for it (a config on a hung mount):
            # this request replaces it.
            stale, self.reading = self.reading, None
            self.poller.unregister(stale.fd)
            stale.abandon()
            self.fail(stale.request_id, protocol.RELOAD_STAGE, 0, "replaced by a newer reload")
        self.pending = None
        self.reading = TableReader(
            request_id, self.config, self.nofile_soft, self.path, self.devnull
        )
        self.poller.register(self.reading.fd, select.POLLIN)

    def read_table(self, reading: TableReader) -> None:
        """The reader's output is readable: at its end, replace the table and reply."""
        if not reading.feed():
            return
        self.poller.unregister(reading.fd)
        os.close(reading.fd)
        self.reading = None  # the reader itself is reaped like any child
        table, reply = reading.answer()
        if table is not None:
            self.pending = table
        self.send(reply)

    def spawn(self, request: protocol.Spawn, fds: list[int]) -> None:
        """Fork a child for a spawn request (checked against the table) and wait briefly
        for its exec; the reply goes out from `confirm`."""
        name = request.service
        entry = self.table.get(name)
        if entry is None:
            raise ProtocolError(f"unknown service {name!r}")
        if len(fds) > MAX_FDS:
            raise ProtocolError(f"more than {MAX_FDS} fds")
        for number, fd in enumerate(fds, start=LISTEN_FDS_START):
            # A service is owed sockets only: not a file, pipe or directory
            # the daemon happens to hold, handed to a process that may be root.
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise ProtocolError(f"fd {number} is not a socket")
        if isinstance(entry, BrokenEntry):
            self.fail(request.id, "resolve", errno.ENOENT, entry.error)
            return
        if isinstance(entry, ContainerEntry):
            raise ProtocolError(f"service {name!r} is a container: it is not spawned")
        extra, fds = spawn_env(name, entry, request.env, fds, self.lazyd_pid)
        env = {**entry.env, **extra}
        if len(self.in_flight_pids) >= MAX_IN_FLIGHT:
            raise ProtocolError(f"more than {MAX_IN_FLIGHT} spawns in flight")
        if len(self.children) >= MAX_CHILDREN:
            raise ProtocolError(f"more than {MAX_CHILDREN} processes running")
        nofile: tuple[int, int] | None = None
        if entry.nofile_soft is not None:
            soft, hard = entry.nofile_soft, self.nofile_hard
            if hard != resource.RLIM_INFINITY and soft > hard:
                soft = hard  # a soft limit above the hard one would make setrlimit fail
            nofile = (soft, hard)
        # Only what differs from ours is changed (decided here, where it costs
        # less than in the child): an unprivileged spawner may still start a
        # service as its own user, which setgroups would refuse (EPERM).
        creds = Credentials(None, None, None)
        if entry.groups is not None and sorted(set(entry.groups)) != self.own_groups:
            creds.groups = entry.groups
        if entry.gid is not None and (entry.gid,) * 3 != self.own_gids:
            creds.gid = entry.gid
        if entry.uid is not None and (entry.uid,) * 3 != self.own_uids:
            creds.uid = entry.uid
        try:
            pid, out_r, err_r = fork_child(entry, env, creds, fds, self.devnull, self.fd_limit,
                                           nofile)
        except ForkError as exc:
            self.fail(request.id, "fork", exc.errno, os.strerror(exc.errno))
            return
        # Sleep until the child has exec'd (or failed), before any bookkeeping:
        # with one CPU, that lets the child run at once rather than after us.
        # It usually takes well under a millisecond.
        self.exec_poller.register(err_r, select.POLLIN)
        exec_done = self.exec_poller.poll(self.exec_wait_ms)
        self.exec_poller.unregister(err_r)
        self.children[pid] = False
        self.service_of[pid] = name
        spawned = _InFlight(request.id, pid, out_r, err_r)
        self.in_flight_pids[pid] = spawned
        if exec_done:
            self.confirm(spawned)
        else:
            self.in_flight[err_r] = spawned
            self.poller.register(err_r, select.POLLIN)

    def confirm(self, spawned: _InFlight) -> None:
        """The error pipe is readable: EOF means exec succeeded, bytes that it failed."""
        try:
            report = os.read(spawned.err_r, MAX_ERROR)
        except BlockingIOError:
            return  # spurious wakeup; the child still runs
        if self.in_flight.pop(spawned.err_r, None) is not None:
            self.poller.unregister(spawned.err_r)
        os.close(spawned.err_r)
        del self.in_flight_pids[spawned.pid]
        try:
            if report:
                stage, number, reason = read_failure(report)
                self.fail(spawned.request_id, stage, number, reason)
            else:
                self.send(protocol.spawned_reply(spawned.request_id, spawned.pid),
                          [spawned.out_r])
                if spawned.pid in self.children:
                    self.children[spawned.pid] = True
        finally:
            os.close(spawned.out_r)

    def signal(self, request: protocol.Signal) -> None:
        pid = request.pid
        # Only processes the daemon knows from us and that we have not reaped:
        # such a pid (and, since each leads its own group, that group id) cannot
        # belong to anyone else yet.
        if not self.children.get(pid, False):
            raise ProtocolError(f"pid {pid} is not a running process of this spawner")
        try:
            if request.group:
                os.killpg(pid, request.signal)
            else:
                os.kill(pid, request.signal)
        except OSError as exc:
            raise ProtocolError(f"pid {pid}: {os.strerror(exc.errno or 0)}") from None

    def listener(self, request: protocol.Listener) -> None:
        """Answer with a copy of a service's own listener (`lazyd.privileged.listeners`)."""
        # Imported at the first request: ctypes and the socket table's reader
        # are memory that a helper with no service on the kernel path never needs.
        from lazyd.privileged.listeners import take as take_listener

        running = self.children.get(request.pid, False)
        service = self.service_of.get(request.pid) if running else None
        entry = None if service is None else self.table.get(service)
        fd = take_listener(request, service, entry)
        try:
            self.send(protocol.listener_reply(request.id, request.socket), [fd])
        finally:
            os.close(fd)

    # -- children ----------------------------------------------------------

    def reap(self) -> None:
        """Reap every exited child; report the services' exits."""
        while True:
            try:
                # WNOWAIT: look, but leave the zombie, so that its pid stays reserved.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if pid in self.children:
                _quietly(os.killpg, pid, signal.SIGKILL)  # what the service left behind
            _, status = os.waitpid(pid, 0)
            if self.reading is not None:
                self.reading.reaped(pid)  # its output may still be unread
            spawned = self.in_flight_pids.get(pid)
            if spawned is not None:
                # The child is gone, so its error pipe is at EOF or holds its error:
                # the spawn reply goes out before the exit notice.
                self.confirm(spawned)
            self.service_of.pop(pid, None)
            if self.children.pop(pid, False):
                self.send(protocol.exited_notice(pid, os.waitstatus_to_exitcode(status)))

    def send_container_results(self) -> None:
        """Send what the container operations have to say (`Containers.drain`)."""
        for message, fds, sent in self.containers.drain():
            try:
                self.send(message, fds)
            finally:
                for fd in fds:
                    os.close(fd)
                if sent is not None:
                    sent.set()

    def kill_all(self) -> None:
        """SIGKILL every process group started here, and every container; reap them all."""
        if self._containers is not None:
            self._containers.close()
        for pid in self.children:
            _quietly(os.killpg, pid, signal.SIGKILL)
            _quietly(os.kill, pid, signal.SIGKILL)  # in case it had not called setsid yet
        for pid in list(self.children):
            _quietly(os.waitpid, pid, 0)
        self.children.clear()

    # -- replies -----------------------------------------------------------

    def fail(self, request_id: int | None, stage: str, errno: int, message: str) -> None:
        self.send(protocol.error_reply(request_id, stage, errno, message))

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            # Blocking: the daemon always reads; should it hang, so may we.
            self.control.sendmsg(
                [protocol.encode(message)], protocol.fds_ancillary(fds), socket.MSG_NOSIGNAL
            )
        except (BrokenPipeError, ConnectionResetError):
            raise _Gone() from None


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def _quietly(fn: Any, *args: Any) -> None:
    with contextlib.suppress(OSError):
        fn(*args)


def _on_signal(signum: int, frame: object) -> None:
    """Nothing to do here: SIGCHLD's byte on the wakeup fd wakes the poll loop,
    and SIGINT, SIGTERM and SIGHUP are not for the spawner (see the module's
    docstring)."""


def _setup_signals() -> None:
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            # (ValueError/OSError: one the C library keeps for itself.)
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
    # Whatever lazyd's thread had blocked is not inherited by the services.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def main(exec_wait_ms: int = EXEC_WAIT_MS) -> None:
    """Entry point: serve the socket at fd 0 until the daemon closes its end."""
    _setup_signals()
    # Keep 1 and 2 taken: should lazyd have started us with them closed, a
    # received socket landing there would get this process's stray output.
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    control = socket.socket(fileno=CONTROL_FD)
    if control.type != socket.SOCK_SEQPACKET or control.family != socket.AF_UNIX:
        sys.exit("lazyd spawner: fd 0 must be an AF_UNIX SOCK_SEQPACKET socket")
    control.set_inheritable(False)
    control.setblocking(True)
    # Everything allocated so far lives as long as we do: keep the collector
    # from walking (and so, in a fresh child, copying) the pages it sits on.
    gc.freeze()
    Spawnerd(control, exec_wait_ms).run()
    control.close()
