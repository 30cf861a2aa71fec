from __future__ import annotations

import array
import errno
import itertools
import json
import os
import pwd
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from lazyd import config as config_mod
from lazyd.backends.process.launch import relay_output, table
from lazyd.backends.process.spawner import (
    ServiceProcess,
    Spawner,
    SpawnError,
    current_spawner,
    open_spawner,
    spawner_command,
)
from lazyd.errors import LaunchError
from lazyd.privileged import child, protocol, spawnerd
from lazyd.privileged.handoff import lift_sources, socket_identity
from lazyd.readiness.notify import open_notify_socket
from lazyd.runtime.binding import bind_socket
from tests.conftest import free_port, wait_gone, yaml_quote

TIMEOUT = 5.0  # seconds; bounds every wait in these tests
PATH = "/usr/bin:/bin"
# Both ways a spawner follows an exec: waiting for it at once (the default),
# and from its poll loop (what happens when an exec takes longer).
EXEC_WAIT = pytest.mark.parametrize("exec_wait_ms", [spawnerd.EXEC_WAIT_MS, 0])


class Raw:
    """A spawner driven through its socket directly, as a misbehaving daemon could."""

    def __init__(self, sock: trio.socket.SocketType, process: trio.Process) -> None:
        self.sock = sock
        self.process = process
        self.exits: dict[int, int] = {}
        self._next_id = 100

    async def send(self, message: bytes | dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        ancdata = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        await self.sock.sendmsg([data], ancdata)

    async def receive(self) -> tuple[dict[str, Any], list[int]]:
        data, ancdata, _, _ = await self.sock.recvmsg(65536, socket.CMSG_SPACE(64))
        assert data, "the spawner closed its end"
        message: dict[str, Any] = json.loads(data)
        return message, protocol.received_fds(ancdata)

    async def reply(self, request_id: int | None) -> tuple[dict[str, Any], list[int]]:
        """The next reply to `request_id`; exit notices on the way are kept in `exits`."""
        while True:
            message, fds = await self.receive()
            if "exited" in message:
                self.exits[message["exited"]] = message["returncode"]
            elif message["id"] == request_id:
                return message, fds

    async def request(
        self, header: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        self._next_id += 1
        header = {"id": self._next_id, **header}
        await self.send(header, fds)
        return await self.reply(header["id"])

    async def start(
        self, argv: list[str], fds: Sequence[int] = (), **fields: Any
    ) -> tuple[dict[str, Any], list[int]]:
        """Define argv as a service of its own, handed exactly `fds` (the sockets
        among them, as they are), then spawn it: the spawn's reply."""
        name = f"svc{self._next_id}"
        sockets = [
            {"name": "s", **socket_identity(fd)}
            for fd in fds
            if stat.S_ISSOCK(os.fstat(fd).st_mode)
        ]
        services = {name: entry(argv, sockets=sockets, **fields)}
        reply, _ = await self.request({"op": "define", "services": services})
        assert reply.get("ok"), reply
        env = {"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": ":".join("s" * len(fds))}
        return await self.request({"op": "spawn", "service": name, "env": env if fds else {}}, fds)

    async def exit_of(self, pid: int) -> int:
        while pid not in self.exits:
            message, fds = await self.receive()
            assert not fds
            if "exited" in message:
                self.exits[message["exited"]] = message["returncode"]
        return self.exits[pid]


def entry(argv: list[str], **fields: Any) -> dict[str, Any]:
    """A table entry starting argv as is."""
    return {"executable": argv[0], "argv": argv, "env": {"PATH": PATH}, **fields}


_names = itertools.count()


async def start(
    spawner: Spawner, *, executable: str, argv: list[str], env: dict[str, str], **fields: Any
) -> ServiceProcess:
    """Define a service of its own in the spawner's (unsealed) table, and start it."""
    name = f"svc{next(_names)}"
    await spawner.define({name: {"executable": executable, "argv": argv, "env": env, **fields}})
    return await spawner.spawn(name)


@asynccontextmanager
async def raw_spawner(exec_wait_ms: int = spawnerd.EXEC_WAIT_MS) -> AsyncIterator[Raw]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        command = spawner_command(exec_wait_ms)
        process = await trio.lowlevel.open_process(command, stdin=theirs.fileno())
    raw = Raw(trio.socket.from_stdlib_socket(ours), process)
    try:
        yield raw
    finally:
        raw.sock.close()  # the spawner kills what it still has and exits
        with trio.CancelScope(shield=True):
            with trio.move_on_after(TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def read_all(fd: int) -> bytes:
    stream = trio.lowlevel.FdStream(fd)
    async with stream:
        chunks = []
        while chunk := await stream.receive_some():
            chunks.append(chunk)
    return b"".join(chunks)


async def test_spawn_exit_codes_and_signals() -> None:
    """A spawned process's exit status arrives; a signal gives the negative signal number."""
    with trio.fail_after(TIMEOUT):
        async with open_spawner() as spawner:
            exits = await start(
                spawner,
                executable="/bin/sh", argv=["sh", "-c", "exit 3"], env={"PATH": PATH}
            )
            sleeper = await start(
                spawner,
                executable="/bin/sleep", argv=["sleep", "60"], env={"PATH": PATH}
            )
            sleeper.send_signal(signal.SIGTERM)
            assert await exits.wait() == 3
            assert await sleeper.wait() == -signal.SIGTERM
            assert (exits.returncode, sleeper.returncode) == (3, -signal.SIGTERM)
            sleeper.send_signal(signal.SIGTERM)  # exited: nothing is sent, no error
            for process in (exits, sleeper):
                await process.stdout.aclose()


async def test_output_pipe_delivers_lines() -> None:
    """The output pipe carries stdout and stderr, in order, and ends when the process does."""
    with trio.fail_after(TIMEOUT):
        async with open_spawner() as spawner:
            process = await start(
                spawner,
                executable="/bin/sh",
                argv=["sh", "-c", "echo one; echo two >&2; echo three"],
                env={"PATH": PATH},
            )
            lines: list[str] = []
            async with process.stdout:
                await relay_output("svc", process.stdout, lines.append)
            assert await process.wait() == 0
    assert lines == ["svc: one", "svc: two", "svc: three"]


@pytest.mark.parametrize(
    ("fields", "stage", "code"),
    [
        ({"executable": "/nonexistent/lazyd-server"}, "exec", errno.ENOENT),
        ({"executable": "PLAIN"}, "exec", errno.EACCES),
        ({"workdir": "/nonexistent/dir"}, "chdir", errno.ENOENT),
    ],
)
async def test_exec_failure_reports_errno_and_stage(
    fields: dict[str, Any], stage: str, code: int, tmp_path: Path
) -> None:
    """A child that cannot exec reports the errno and the step that failed; no exit follows."""
    if fields.get("executable") == "PLAIN":  # a file without execute permission
        (tmp_path / "plain").write_text("#!/bin/sh\n")
        fields = {"executable": str(tmp_path / "plain")}
    with trio.fail_after(TIMEOUT):
        async with open_spawner() as spawner:
            args: dict[str, Any] = {"executable": "/bin/true", "argv": ["x"], "env": {}}
            with pytest.raises(SpawnError) as caught:
                await start(spawner, **(args | fields))
            assert (caught.value.stage, caught.value.errno) == (stage, code)
            assert str(caught.value) == os.strerror(code)
            # The spawner carries on.
            process = await start(spawner, **args)
            assert await process.wait() == 0
            await process.stdout.aclose()


@EXEC_WAIT
async def test_signal_only_processes_it_spawned(exec_wait_ms: int) -> None:
    """A signal request for a foreign or already reaped pid is refused; the process is untouched."""
    foreign = await trio.lowlevel.open_process(["/bin/sleep", "60"])
    try:
        with trio.fail_after(TIMEOUT):
            async with raw_spawner(exec_wait_ms) as raw:
                for sig, group in [(signal.SIGKILL, False), (signal.SIGKILL, True)]:
                    header = {"op": "signal", "pid": foreign.pid, "signal": sig, "group": group}
                    reply, _ = await raw.request(header)
                    assert "is not a running process of this spawner" in reply["error"]
                # Its own, once reaped, is foreign too.
                reply, [out] = await raw.start(["/bin/true"])
                os.close(out)
                assert await raw.exit_of(reply["pid"]) == 0
                header = {"op": "signal", "pid": reply["pid"], "signal": 15, "group": False}
                reply, _ = await raw.request(header)
                assert "error" in reply
                # And one of its own that runs is signalled.
                reply, [out] = await raw.start(["/bin/sleep", "60"])
                os.close(out)
                header = {"op": "signal", "pid": reply["pid"], "signal": 15, "group": False}
                assert (await raw.request(header))[0] == {"id": raw._next_id, "ok": True}
                assert await raw.exit_of(reply["pid"]) == -signal.SIGTERM
        assert foreign.poll() is None
    finally:
        foreign.kill()
        await foreign.wait()


def _define(service: dict[str, Any]) -> dict[str, Any]:
    return {"id": 1, "op": "define", "services": {"s": service}}


MALFORMED: list[bytes | dict[str, Any]] = [
    {"id": 1, "op": "spawn", "service": "nonexistent", "env": {}},
    {"id": 1, "op": "spawn", "service": "t", "env": {}, "executable": "/bin/sh"},
    {"id": 1, "op": "spawn", "service": "t", "env": {"PATH": "/tmp"}},
    {"id": 1, "op": "spawn", "service": "t", "env": {"LD_PRELOAD": "/tmp/x.so"}},
    {"id": 1, "op": "spawn", "service": "t", "env": {"LISTEN_FDS": "1"}},
    {"id": 1, "op": "spawn", "service": "t", "env": {"NOTIFY_SOCKET": "x"}},
    _define({"executable": "/bin/true", "argv": ["t"], "env": {"NOTIFY_SOCKET": "@x"}}),
    {"id": 1, "op": "define", "services": {"s": {"error": "x", "argv": ["t"]}}},
    {"id": 1, "op": "define", "services": {}, "seal": "yes"},
    {"id": 1, "op": "reload"},  # no config file was given

    b"not json",
    b"[1, 2]",
    b'{"op": "spawn"}',  # no id
    {"id": True, "op": "signal", "pid": 1, "signal": 9, "group": False},
    {"id": 1, "op": "exec"},
    _define({"executable": "true", "argv": ["true"], "env": {}}),
    _define({"executable": "/bin/true", "argv": [], "env": {}}),
    _define({"executable": "/bin/true", "argv": ["a\0b"], "env": {}}),
    _define({"executable": "/bin/true", "argv": ["t"], "env": {"A=B": "x"}}),
    _define({"executable": "/bin/true", "argv": ["t"], "env": {}, "uid": True}),
    _define({"executable": "/bin/true", "argv": ["t"], "env": {}, "uid": -1}),
    _define({"executable": "/bin/true", "argv": ["t"], "env": {}, "groups": 0}),
    _define({"executable": "/bin/true", "argv": ["t"], "env": {}, "shell": 1}),
    _define({"executable": "/bin/true", "argv": ["t"], "env": {}, "uid": 0}),
    _define({"executable": "/bin/true", "argv": ["t"], "env": {"LISTEN_PID": "1"}}),
    {"id": 1, "op": "signal", "pid": 1, "signal": 0, "group": False},
    {"id": 1, "op": "signal", "pid": 1, "signal": 9, "group": "yes"},
    b"[" * 50000 + b"]" * 10000,
    b" " * (protocol.MAX_MESSAGE + 1),
]


async def test_malformed_requests_get_error_replies() -> None:
    """Anything malformed gets an error reply, fds sent with it are closed, and work goes on."""
    ours, theirs = socket.socketpair()
    with trio.fail_after(TIMEOUT), ours, theirs:
        async with raw_spawner() as raw:
            reply, _ = await raw.request({"op": "define", "services": {"t": entry(["/bin/true"])}})
            assert reply == {"id": raw._next_id, "ok": True}
            for message in MALFORMED:
                await raw.send(message)
                reply, fds = await raw.receive()
                assert set(reply) == {"id", "error", "stage", "errno"}, message
                assert reply["stage"] == "request"
                assert not fds
            # A signal request with an fd attached: refused, and the fd not kept.
            await raw.send(
                {"id": 7, "op": "signal", "pid": 1, "signal": 9, "group": False}, [theirs.fileno()]
            )
            reply, _ = await raw.reply(7)
            assert reply["error"] == "request: signal takes no fds"
            theirs.close()
            ours.settimeout(TIMEOUT)
            assert ours.recv(1) == b""  # no copy of `theirs` is left open anywhere
            reply, [out] = await raw.start(["/bin/sh", "-c", "echo still here"])
            assert await read_all(out) == b"still here\n"
            assert await raw.exit_of(reply["pid"]) == 0


@EXEC_WAIT
async def test_failed_exec_gets_no_exit_notice(exec_wait_ms: int) -> None:
    """A spawn that fails is answered once, with its error; its child's exit is not reported."""
    with trio.fail_after(TIMEOUT):
        async with raw_spawner(exec_wait_ms) as raw:
            reply, fds = await raw.start(["/nonexistent/server"])
            assert (reply["stage"], reply["errno"], fds) == ("exec", errno.ENOENT, [])
            reply, [out] = await raw.start(["/bin/true"])
            os.close(out)
            assert await raw.exit_of(reply["pid"]) == 0
            assert list(raw.exits) == [reply["pid"]]


@EXEC_WAIT
async def test_closing_the_socket_kills_everything_and_the_spawner_exits(exec_wait_ms: int) -> None:
    """When the daemon's end closes, every process group it started dies and it exits 0."""
    with trio.fail_after(TIMEOUT):
        async with raw_spawner(exec_wait_ms) as raw:
            # The background sleep holds the output pipe too: EOF means both died.
            reply, [out] = await raw.start(
                ["/bin/sh", "-c", "sleep 60 & echo started; wait"]
            )
            stream = trio.lowlevel.FdStream(out)
            async with stream:
                assert await stream.receive_some() == b"started\n"
                raw.sock.close()
                assert await raw.process.wait() == 0
                while await stream.receive_some():
                    pass
            await wait_gone(reply["pid"])


async def test_leader_exit_kills_the_rest_of_its_group() -> None:
    """When a service's main process exits, what it left in its process group is killed."""
    with trio.fail_after(TIMEOUT):
        async with open_spawner() as spawner:
            process = await start(
                spawner,
                executable="/bin/sh",
                argv=["sh", "-c", "sleep 60 & echo started"],
                env={"PATH": PATH},
            )
            lines: list[str] = []
            async with process.stdout:
                # EOF: the sleep, which holds the pipe as well, is gone too.
                await relay_output("svc", process.stdout, lines.append)
            assert await process.wait() == 0
    assert lines == ["svc: started"]


async def test_cancelled_spawn_leaves_no_process() -> None:
    """A spawn whose caller is cancelled while it waits for the reply kills what it started."""
    with trio.fail_after(TIMEOUT):
        async with open_spawner() as spawner:
            sleeper = entry(["/bin/sleep", "60"])
            await spawner.define({"sleeper": sleeper})
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def start_it() -> None:
                        await spawner.spawn("sleeper")
                        raise AssertionError("the spawn was not cancelled")

                    nursery.start_soon(start_it)
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            assert scope.cancelled_caught
            # Requests are answered in order: once this one is, the cancelled
            # spawn's reply has been seen and its process sent SIGKILL.
            process = await start(spawner, executable="/bin/true", argv=["true"], env={})
            children = Path(f"/proc/{spawner.pid}/task/{spawner.pid}/children").read_text()
            for pid in {int(p) for p in children.split()} - {process.pid}:
                await wait_gone(pid)
            await process.wait()
            await process.stdout.aclose()


@pytest.mark.parametrize("user", [None, "nobody"])
async def test_losing_the_spawner_is_fatal(user: str | None) -> None:
    """If the spawner dies, LaunchError ends the block, wait() raises it, the services die."""
    waited: list[BaseException] = []
    process: ServiceProcess | None = None
    creds: dict[str, Any] = {}
    if user is not None:  # the parent-death signal must survive the change of user
        entry = pwd.getpwnam(user)
        groups = os.getgrouplist(user, entry.pw_gid)
        creds = {"uid": entry.pw_uid, "gid": entry.pw_gid, "groups": groups}

    async def wait_for(process: ServiceProcess) -> None:
        try:
            await process.wait()
        except LaunchError as exc:
            waited.append(exc)

    with trio.fail_after(TIMEOUT), pytest.raises(LaunchError, match="spawner exited"):
        async with open_spawner() as spawner, trio.open_nursery() as nursery:
            process = await start(
                spawner,
                executable="/bin/sleep", argv=["sleep", "60"], env={"PATH": PATH}, **creds
            )
            nursery.start_soon(wait_for, process)
            await trio.testing.wait_all_tasks_blocked()  # it waits in process.wait()
            os.kill(spawner.pid, signal.SIGKILL)
    assert process is not None
    await process.stdout.aclose()
    with trio.fail_after(TIMEOUT):
        await wait_gone(process.pid)
    assert [str(exc) for exc in waited] == [f"pid {process.pid}: lost with lazyd's spawner"]


async def test_a_sealed_table_takes_no_definitions() -> None:
    """Once sealed, the spawner starts only the services in its table, as the table says."""
    with trio.fail_after(TIMEOUT):
        async with raw_spawner() as raw:
            table = {"echo": entry(["/bin/echo", "from the table"])}
            reply, _ = await raw.request({"op": "define", "services": table, "seal": True})
            assert reply.get("ok"), reply
            forged = {"echo": entry(["/bin/sh", "-c", "echo forged"])}
            reply, _ = await raw.request({"op": "define", "services": forged})
            assert reply["error"] == (
                "request: the table of services is sealed; only a reload changes it"
            )
            reply, _ = await raw.request({"op": "spawn", "service": "sh", "env": {}})
            assert reply["error"] == "request: unknown service 'sh'"
            reply, [out] = await raw.request({"op": "spawn", "service": "echo", "env": {}})
            assert await read_all(out) == b"from the table\n"
            assert await raw.exit_of(reply["pid"]) == 0


async def test_a_table_larger_than_one_message_is_sent_in_parts() -> None:
    """A table too big for one message is defined in several, and sealed with the last."""
    padding = {"PATH": PATH, "PADDING": "x" * 1000}
    table = {f"svc{i}": entry(["/bin/echo", str(i)], env=padding) for i in range(300)}
    with trio.fail_after(TIMEOUT):
        async with open_spawner() as spawner:
            await spawner.define(table, seal=True)
            assert spawner.sealed
            process = await spawner.spawn("svc299")
            async with process.stdout:
                assert await process.stdout.receive_some() == b"299\n"
            assert await process.wait() == 0
            with pytest.raises(SpawnError, match="sealed"):
                await spawner.define({"svc0": entry(["/bin/sh"])})


async def test_reload_reads_the_table_from_the_config_file(tmp_path: Path) -> None:
    """A reload makes the spawner read the config file itself, taking effect on commit;
    a bad file changes nothing."""
    config = tmp_path / "lazyd.yaml"

    def write(command: str) -> None:
        config.write_text(
            f"services:\n  svc:\n    command: {command}\n    user: nobody\n    mode: proxy\n"
            "    sockets: {s: {listen: unix:/nonexistent/s.sock, upstream: unix:/nonexistent/u}}\n"
        )

    write("/bin/echo first")
    with trio.fail_after(TIMEOUT):
        async with open_spawner() as spawner:
            await spawner.define({}, config=str(config), path=PATH, seal=True)
            with pytest.raises(SpawnError, match="unknown service 'svc'"):
                await spawner.spawn("svc")
            assert await spawner.reload() == ["svc"]
            with pytest.raises(SpawnError, match="unknown service 'svc'"):
                await spawner.spawn("svc")  # read, not yet committed
            await spawner.commit()
            process = await spawner.spawn("svc")
            async with process.stdout:
                assert await process.stdout.receive_some() == b"first\n"
            assert await process.wait() == 0
            config.write_text("services: [")
            with pytest.raises(SpawnError) as caught:
                await spawner.reload()
            assert caught.value.stage == "reload"
            assert caught.value.problems[0].startswith(f"{config}:1:")
            with pytest.raises(SpawnError, match="no table read by a reload to commit"):
                await spawner.commit()
            write("/bin/echo second")
            assert await spawner.reload() == ["svc"]
            await spawner.commit()
            process = await spawner.spawn("svc")
            async with process.stdout:
                assert await process.stdout.receive_some() == b"second\n"
            assert await process.wait() == 0


async def test_a_reload_replaces_one_that_hangs(tmp_path: Path) -> None:
    """A reload whose reader hangs (a config nobody writes) is replaced by the next one."""
    config = tmp_path / "lazyd.yaml"
    os.mkfifo(config)  # opening it for reading blocks: a config on a hung mount
    with trio.fail_after(TIMEOUT):
        async with raw_spawner() as raw:
            header = {"op": "define", "services": {}, "config": str(config), "seal": True}
            assert (await raw.request(header))[0].get("ok")
            await raw.send({"id": 1, "op": "reload"})
            config.unlink()
            config.write_text(
                "services:\n  svc:\n    command: /bin/true\n    user: nobody\n"
                "    sockets: {s: unix:/nonexistent/s.sock}\n"
            )
            await raw.send({"id": 2, "op": "reload"})
            reply, _ = await raw.reply(1)
            assert reply["error"] == "reload: replaced by a newer reload"
            reply, _ = await raw.reply(2)
            assert reply == {"id": 2, "ok": True, "services": ["svc"]}


async def test_current_spawner() -> None:
    """Inside open_spawner, current_spawner() is that spawner; outside there is none."""
    async with open_spawner() as spawner:
        assert current_spawner() is spawner
    with pytest.raises(RuntimeError):
        current_spawner()


# -- the child's fd arrangement ------------------------------------------------


def _fd_report() -> dict[str, Any]:
    found = {}
    for fd in range(256):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        found[fd] = st
    return {
        "open": sorted(found),
        "ino": {fd: st.st_ino for fd, st in found.items()},
        "chr": {fd: stat.S_ISCHR(st.st_mode) for fd, st in found.items()},
    }


@pytest.mark.parametrize("sources", [[4, 3], [1, 3, 0], [5, 2, 4, 2], [6, 3], [], [0]])
def test_child_fds_with_sources_in_the_range_and_at_stdio(
    tmp_path: Path, sources: list[int]
) -> None:
    """Sockets land on 3.., /dev/null on 0, the output pipe on 1 and 2, all else closed."""
    files = {}
    for number in sorted(set(sources)):
        path = tmp_path / f"f{number}"
        path.write_text(str(number))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        files[number] = (os.dup2(fd, 200 + number, inheritable=False), os.fstat(fd).st_ino)
        os.close(fd)
    out_r, out_w = os.pipe()
    pipe_ino = os.fstat(out_w).st_ino
    end = 3 + len(sources)
    squatter = next((n for n in range(3, end) if n not in sources), None)
    result_r, result_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    high = {"devnull": 150, "out_w": 151, "keep": 152}
    try:
        for name, fd in (("devnull", devnull), ("out_w", out_w), ("keep", result_w)):
            os.dup2(fd, high[name], inheritable=False)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                for number, (fd, _) in files.items():
                    os.dup2(fd, number)
                if squatter is not None:  # something else in the range is overwritten
                    os.dup2(high["devnull"], squatter)
                # As the spawner does: the sources are lifted above the range
                # before the fork, then the child places them.
                lifted = lift_sources(sources, [])
                child.prepare_child_fds(
                    lifted, high["devnull"], high["out_w"], high["keep"], 1024
                )
                os.write(high["keep"], json.dumps(_fd_report()).encode())
            finally:
                os._exit(0)
        os.close(result_w)
        result_w = -1
        for fd in high.values():
            os.close(fd)
        data = b""
        while chunk := os.read(result_r, 65536):
            data += chunk
        os.waitpid(pid, 0)
    finally:
        for fd in (out_r, out_w, result_r, result_w, devnull, *(f for f, _ in files.values())):
            if fd >= 0:
                os.close(fd)
    report = json.loads(data)
    assert report["open"] == [*range(end), high["keep"]]
    assert report["chr"]["0"] is True  # /dev/null
    assert report["ino"]["1"] == report["ino"]["2"] == pipe_ino
    for i, number in enumerate(sources):
        assert report["ino"][str(3 + i)] == files[number][1]


# What a spawned service reports about its fds: every open one (probed with
# fstat, which opens nothing itself), the inode of each, and its LISTEN_* variables.
_FD_PROBE = (
    "import json, os, sys\n"
    "found = {}\n"
    "for fd in range(1024):\n"
    "    try:\n"
    "        found[fd] = os.fstat(fd).st_ino\n"
    "    except OSError:\n"
    "        pass\n"
    "env = {k: os.environ.get(k) for k in ('LISTEN_FDS', 'LISTEN_PID')}\n"
    "print(json.dumps({'fds': found, 'env': env, 'pid': os.getpid()}))\n"
)


@pytest.mark.parametrize("count", [1, 3, 6])
async def test_a_service_gets_fds_0_to_2_and_its_sockets_at_3_and_nothing_else(
    count: int,
) -> None:
    """Whatever numbers the sockets arrive at in the helper (they land among its own
    fds, often inside 3..3+n-1), the service finds exactly 0, 1, 2 and its n sockets
    at 3.. in order, LISTEN_PID its own pid; no copy the helper made on the way is open."""
    sockets = []
    try:
        for i in range(count):
            kind = (socket.SOCK_STREAM, socket.SOCK_DGRAM)[i % 2]
            sock = socket.socket(socket.AF_INET, kind)
            sock.bind(("127.0.0.1", 0))
            if kind == socket.SOCK_STREAM:
                sock.listen()
            sockets.append(sock)
        inodes = [os.fstat(sock.fileno()).st_ino for sock in sockets]
        with trio.fail_after(TIMEOUT):
            async with raw_spawner() as raw:
                argv = [sys.executable, "-S", "-I", "-c", _FD_PROBE]
                reply, [out] = await raw.start(argv, [sock.fileno() for sock in sockets])
                report = json.loads(await read_all(out))
                assert await raw.exit_of(reply["pid"]) == 0
    finally:
        for sock in sockets:
            sock.close()
    fds = {int(fd): ino for fd, ino in report["fds"].items()}
    assert sorted(fds) == [*range(3 + count)]
    assert [fds[3 + i] for i in range(count)] == inodes
    assert report["env"] == {"LISTEN_FDS": str(count), "LISTEN_PID": str(reply["pid"])}
    assert report["pid"] == reply["pid"]


async def test_a_spawn_passes_sockets_only() -> None:
    """An fd that is not a socket (a pipe the daemon holds) is refused, and nothing starts."""
    read_end, write_end = os.pipe()
    try:
        with trio.fail_after(TIMEOUT):
            async with raw_spawner() as raw:
                reply, fds = await raw.start(["/bin/true"], [read_end])
                assert (reply["error"], fds) == ("request: fd 3 is not a socket", [])
                with socket.socket() as sock:
                    reply, [out] = await raw.start(["/bin/true"], [sock.fileno()])
                os.close(out)
                assert await raw.exit_of(reply["pid"]) == 0
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("owned", ["file", "directory"])
async def test_root_reloads_only_a_config_only_root_can_change(tmp_path: Path, owned: str) -> None:
    """As root, a reload refuses a config that lazyd's user (or anyone else) could rewrite."""
    nobody = pwd.getpwnam("nobody")
    directory = tmp_path / "etc"
    directory.mkdir()
    config = directory / "lazyd.yaml"
    config.write_text(
        "services:\n  svc:\n    command: /bin/true\n    user: nobody\n"
        "    sockets: {s: unix:/nonexistent/s.sock}\n"
    )
    with trio.fail_after(TIMEOUT):
        async with open_spawner() as spawner:
            await spawner.define({}, config=str(config), path=PATH, seal=True)
            assert await spawner.reload() == ["svc"]
            os.chown(config if owned == "file" else directory, nobody.pw_uid, nobody.pw_gid)
            with pytest.raises(SpawnError) as caught:
                await spawner.reload()
            assert caught.value.stage == "reload"
            changeable = config if owned == "file" else directory
            assert f"{changeable} can be changed by a user other than root" in (
                caught.value.problems[0]
            )
            os.chown(changeable, 0, 0)
            changeable.chmod(0o666)
            with pytest.raises(SpawnError, match="config has errors"):
                await spawner.reload()


# --- A daemon taken over after the drop ------------------------------------------------
#
# The spawner's table comes from a real config; the requests are what a daemon
# running attacker's code could send through the same socket.

_SHOW = (  # what a service was given; "fd4" if anything beyond its one socket
    'echo "$NOTIFY_SOCKET|$LISTEN_FDS|$LISTEN_FDNAMES"; '
    "if [ -e /proc/self/fd/4 ]; then echo fd4; fi"
)


def _taken_over_config(tmp_path: Path) -> Any:
    """A config with a ready: notify service, a plain pass one and a proxied one."""
    ports = [free_port() for _ in range(4)]
    show = yaml_quote(_SHOW)
    path = tmp_path / "lazyd.yaml"
    path.write_text(
        "services:\n"
        f"  notifier:\n    command: [/bin/sh, -c, {show}]\n    user: root\n"
        f"    ready: notify\n    sockets: {{http: 'tcp://127.0.0.1:{ports[0]}'}}\n"
        f"  plain:\n    command: [/bin/sh, -c, {show}]\n    user: root\n"
        f"    sockets: {{http: 'tcp://127.0.0.1:{ports[1]}'}}\n"
        f"  proxied:\n    command: [/bin/sh, -c, {show}]\n    user: root\n    mode: proxy\n"
        f"    sockets: {{http: {{listen: 'tcp://127.0.0.1:{ports[2]}', "
        f"upstream: 'tcp://127.0.0.1:{ports[3]}'}}}}\n"
    )
    return config_mod.load(str(path))


async def _output(process: ServiceProcess) -> str:
    async with process.stdout:
        chunks = []
        while chunk := await process.stdout.receive_some():
            chunks.append(chunk)
    assert await process.wait() == 0
    return b"".join(chunks).decode()


async def test_a_taken_over_daemon_starts_only_what_the_table_says(tmp_path: Path) -> None:
    """Forged NOTIFY_SOCKETs, fds and fd names are refused, each saying why; the
    configured starts still work, and the notify socket's proof is not passed on."""
    config = _taken_over_config(tmp_path)
    bound = {
        name: bind_socket(service.sockets[0], service=name)
        for name, service in config.services.items()
    }
    plain, notifier, proxied = bound["plain"], bound["notifier"], bound["proxied"]
    one = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))  # a stand-in for /run/systemd/notify
    client = socket.create_connection(plain.getsockname())
    accepted, _ = plain.accept()
    with (
        trio.fail_after(TIMEOUT), client, accepted, systemd,
        open_notify_socket("notifier") as ours, open_notify_socket("notifier") as twin,
        open_notify_socket("plain") as others,
    ):
        async with open_spawner() as spawner:
            await spawner.define(table(config), seal=True)
            forged: list[tuple[str, dict[str, str], list[int], int | None, str]] = [
                ("plain", {**one, "NOTIFY_SOCKET": "/run/systemd/notify"}, [plain.fileno()],
                 systemd.fileno(), "service 'plain' is not ready: notify; NOTIFY_SOCKET cannot"),
                ("notifier", {**one, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                 [notifier.fileno()], systemd.fileno(), "is not lazyd's notify socket for "
                 f"'notifier' (@lazyd/{os.getpid()}/notifier/XXXXXXXX)"),
                ("notifier", {**one, "NOTIFY_SOCKET": others.address}, [notifier.fileno()],
                 others.fileno(), "is not lazyd's notify socket for 'notifier'"),
                ("notifier", {**one, "NOTIFY_SOCKET": ours.address}, [notifier.fileno()],
                 twin.fileno(), f"the socket sent with NOTIFY_SOCKET is AF_UNIX/SOCK_DGRAM "
                 f"'{twin.address}', not bound to {ours.address}"),
                ("notifier", {"NOTIFY_SOCKET": ours.address}, [], None,
                 "NOTIFY_SOCKET comes with the notify socket itself"),
                ("plain", one, [notifier.fileno()], None,
                 f"fd 3 (http) is AF_INET/SOCK_STREAM 127.0.0.1:{notifier.getsockname()[1]} "
                 f"listening, not the configured AF_INET/SOCK_STREAM 127.0.0.1:"
                 f"{plain.getsockname()[1]} listening"),
                ("plain", one, [accepted.fileno()], None,
                 f"fd 3 (http) is AF_INET/SOCK_STREAM 127.0.0.1:{plain.getsockname()[1]} "
                 "connected, not the configured"),
                ("plain", {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "admin"}, [plain.fileno()], None,
                 "LISTEN_FDS and LISTEN_FDNAMES must be 1 and 'http', as the table says"),
                ("plain", {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:http"},
                 [plain.fileno(), plain.fileno()], None,
                 "service 'plain' takes its 1 configured sockets (http), but 2 fds were sent"),
                ("proxied", one, [proxied.fileno()], None,
                 "service 'proxied' is handed no sockets (it binds its own), but 1 fds were sent"),
                ("plain", {}, [], None, "service 'plain' takes its 1 configured sockets"),
            ]
            for service, env, fds, notify_fd, message in forged:
                with pytest.raises(SpawnError) as caught:
                    await spawner.spawn(service, env=env, fds=fds, notify_fd=notify_fd)
                assert caught.value.stage == "request"
                assert message in str(caught.value), (service, env)
            # What the daemon itself asks for still works.
            process = await spawner.spawn(
                "notifier", env={**one, "NOTIFY_SOCKET": ours.address}, fds=[notifier.fileno()],
                notify_fd=ours.fileno(),
            )
            assert await _output(process) == f"{ours.address}|1|http\n"
            process = await spawner.spawn("plain", env=one, fds=[plain.fileno()])
            assert await _output(process) == "|1|http\n"
            assert await _output(await spawner.spawn("proxied")) == "||\n"
    for sock in bound.values():
        sock.close()
