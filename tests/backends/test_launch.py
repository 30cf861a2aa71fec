from __future__ import annotations

import grp
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyd.backends.process.launch import MAX_LINE, LaunchSpec, open_service_process, relay_output
from lazyd.backends.process.spawner import ServiceProcess, Spawner, open_spawner
from lazyd.errors import LaunchError
from lazyd.readiness.notify import open_notify_socket

TIMEOUT = 5.0  # seconds; bounds every wait in these tests
SOCKET_PROXYD = "/lib/systemd/systemd-socket-proxyd"

# Reports what a service finds at start: its environment exactly as exec'd
# (/proc/self/environ, before Python adds anything), its fds, credentials, limits.
REPORT = r"""
import fcntl, json, os, resource, socket, sys

def fd_info(fd):
    info = {"ino": os.fstat(fd).st_ino, "blocking": os.get_blocking(fd),
            "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)}
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return info
    try:
        info["type"] = int(s.type)
        info["name"] = list(s.getsockname())
    finally:
        s.detach()
    return info

open_fds = []
for fd in range(256):
    try:
        os.fstat(fd)
    except OSError:
        continue
    open_fds.append(fd)
with open("/proc/self/environ", "rb") as f:
    environ = dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if item)
with open("/proc/self/status") as f:
    status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
print(json.dumps({
    "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
    "environ": environ, "open_fds": open_fds,
    "fds": {fd: fd_info(fd) for fd in open_fds if fd >= 3},
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
    "groups": sorted(os.getgroups()), "cwd": os.getcwd(),
    "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    "sigblk": int(status["SigBlk"], 16),
}), flush=True)
"""


@pytest.fixture
async def spawner() -> AsyncIterator[Spawner]:
    async with open_spawner() as spawner:
        yield spawner


@asynccontextmanager
async def started(
    spawner: Spawner, spec: LaunchSpec
) -> AsyncIterator[tuple[ServiceProcess, list[str]]]:
    """Start `spec`, relay its output into a list; kill its group and reap it at the end."""
    lines: list[str] = []
    process = await open_service_process(spec, spawner)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_output, spec.name, process.stdout, lines.append)
            try:
                yield process, lines
            finally:
                # Lets the relay reach EOF, so the nursery can finish.
                process.signal_group(signal.SIGKILL)
    finally:
        with trio.CancelScope(shield=True):
            process.signal_group(signal.SIGKILL)
            await process.wait()
            await process.stdout.aclose()


async def run_to_end(spawner: Spawner, spec: LaunchSpec) -> tuple[int, list[str]]:
    """Start `spec`, wait for it to exit; its exit status and its relayed lines."""
    with trio.fail_after(TIMEOUT):
        async with started(spawner, spec) as (process, lines):
            status = await process.wait()
            # The relay reaches EOF once every holder of the pipe is gone.
        return status, lines


async def report(spawner: Spawner, spec: LaunchSpec) -> dict[str, Any]:
    status, lines = await run_to_end(spawner, spec)
    assert status == 0, lines
    [line] = lines
    prefix = f"{spec.name}: "
    assert line.startswith(prefix)
    result: dict[str, Any] = json.loads(line.removeprefix(prefix))
    return result


@pytest.fixture
def report_program(tmp_path: Path) -> str:
    path = tmp_path / "report.py"
    path.write_text(REPORT)
    return str(path)


async def test_sockets_environment_and_fds(
    report_program: str, monkeypatch: pytest.MonkeyPatch, spawner: Spawner
) -> None:
    """Sockets at 3, 4, 5 with LISTEN_*, no other fd (not the notify socket), a clean env."""
    monkeypatch.setenv("LAZYD_TEST_MARKER", "must not leak")
    http = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    https = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    quic = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    notify = open_notify_socket("blog")
    with http, https, quic, notify:
        for sock in (http, https, quic):
            sock.bind(("127.0.0.1", 0))
        http.listen()
        https.listen()
        spec = LaunchSpec(
            name="blog",
            command=[sys.executable, report_program],
            fds=[http.fileno(), https.fileno(), quic.fileno()],
            fd_names=["http", "https", "quic"],
            environment={"GREETING": "hello"},
            path="/usr/bin:/bin",
            notify_socket=notify,
        )
        got = await report(spawner, spec)
        expected = {3: http, 4: https, 5: quic}
        for fd, sock in expected.items():
            info = got["fds"][str(fd)]
            assert info["ino"] == os.fstat(sock.fileno()).st_ino
            assert info["name"] == list(sock.getsockname())
            assert info["type"] == sock.type
            assert info["blocking"] is True
            assert info["cloexec"] is False
    assert got["environ"] == {
        "PATH": "/usr/bin:/bin",
        "GREETING": "hello",
        "LISTEN_FDS": "3",
        "LISTEN_FDNAMES": "http:https:quic",
        "LISTEN_PID": str(got["pid"]),
        "NOTIFY_SOCKET": notify.address,
    }
    assert got["open_fds"] == [0, 1, 2, 3, 4, 5]
    assert got["pgid"] == got["sid"] == got["pid"]
    assert got["sigblk"] == 0


async def test_pid_is_the_process_that_execs(report_program: str, spawner: Spawner) -> None:
    """LISTEN_PID equals the pid lazyd got back, i.e. the very process that exec'd."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        spec = LaunchSpec(
            name="svc",
            command=[sys.executable, report_program],
            fds=[sock.fileno()],
            fd_names=["only"],
        )
        with trio.fail_after(TIMEOUT):
            async with started(spawner, spec) as (process, lines):
                await process.wait()
    [line] = lines
    got = json.loads(line.removeprefix("svc: "))
    assert got["pid"] == process.pid
    assert got["environ"]["LISTEN_PID"] == str(process.pid)


async def test_without_sockets_no_listen_variables(report_program: str, spawner: Spawner) -> None:
    """No sockets: no LISTEN_* variables, only fds 0-2; PATH defaults to lazyd's own."""
    got = await report(spawner, LaunchSpec(name="svc", command=[sys.executable, report_program]))
    assert got["environ"] == {"PATH": os.environ.get("PATH", os.defpath)}
    assert got["open_fds"] == [0, 1, 2]


async def test_runs_as_nobody(spawner: Spawner) -> None:
    """With user nobody: nobody's uid, nogroup's gid, and only nobody's supplementary groups."""
    # sys.executable lives under /root here, out of nobody's reach: use the
    # system's interpreter and pass the program inline.
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that nobody may run")
    nobody = pwd.getpwnam("nobody")
    spec = LaunchSpec(name="svc", command=[python, "-c", REPORT], user="nobody", workdir="/")
    got = await report(spawner, spec)
    assert got["uid"] == got["euid"] == nobody.pw_uid
    assert got["gid"] == got["egid"] == grp.getgrnam("nogroup").gr_gid == nobody.pw_gid
    assert got["groups"] == sorted(os.getgrouplist("nobody", nobody.pw_gid))


async def test_workdir(report_program: str, tmp_path: Path, spawner: Spawner) -> None:
    """The service starts in its configured workdir."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    got = await report(
        spawner,
        LaunchSpec(name="svc", command=[sys.executable, report_program], workdir=str(workdir)),
    )
    assert got["cwd"] == str(workdir)


async def test_relative_command_is_found_in_the_workdir(tmp_path: Path, spawner: Spawner) -> None:
    """A command with a slash is relative to the workdir, as execvp after chdir would see it."""
    (tmp_path / "hello.sh").write_text("#!/bin/sh\necho hi from $PWD\n")
    (tmp_path / "hello.sh").chmod(0o755)
    status, lines = await run_to_end(
        spawner, LaunchSpec(name="svc", command=["./hello.sh"], workdir=str(tmp_path))
    )
    assert (status, lines) == (0, [f"svc: hi from {tmp_path}"])


async def test_command_found_in_the_services_path(tmp_path: Path, spawner: Spawner) -> None:
    """A bare command name is looked up in the service's PATH, not lazyd's."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "lazyd-test-greeter").write_text("#!/bin/sh\necho greetings\n")
    (bindir / "lazyd-test-greeter").chmod(0o755)
    status, lines = await run_to_end(
        spawner,
        LaunchSpec(name="svc", command=["lazyd-test-greeter"], path=f"{bindir}:/usr/bin:/bin"),
    )
    assert (status, lines) == (0, ["svc: greetings"])


async def test_nofile_soft_limit_restored(report_program: str, spawner: Spawner) -> None:
    """The service gets the RLIMIT_NOFILE soft limit it is given, under lazyd's hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    got = await report(
        spawner, LaunchSpec(name="svc", command=[sys.executable, report_program], nofile_soft=256)
    )
    assert got["nofile"] == [256, hard]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (
            LaunchSpec(name="web", command=["lazyd-no-such-command"], path="/usr/bin:/bin"),
            "not found in PATH=/usr/bin:/bin",
        ),
        (
            LaunchSpec(name="web", command=["/nonexistent/lazyd-server", "--flag"]),
            "No such file or directory",
        ),
        (LaunchSpec(name="web", command=["/bin/true"], user="lazyd-no-such-user"), "unknown user"),
        (
            LaunchSpec(name="web", command=["/bin/true"], workdir="/nonexistent/dir"),
            "workdir /nonexistent/dir: No such file or directory",
        ),
    ],
)
async def test_start_failures(spec: LaunchSpec, reason: str, spawner: Spawner) -> None:
    """A command that cannot start gives LaunchError 'NAME: cannot start CMD: reason'."""
    with trio.fail_after(TIMEOUT), pytest.raises(LaunchError) as caught:
        await open_service_process(spec, spawner)
    assert str(caught.value).startswith(f"{spec.name}: cannot start {spec.command[0]}: {reason}")


async def test_non_executable_file(tmp_path: Path, spawner: Spawner) -> None:
    """A file without execute permission gives LaunchError with 'Permission denied'."""
    plain = tmp_path / "server"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    with trio.fail_after(TIMEOUT), pytest.raises(LaunchError) as caught:
        await open_service_process(LaunchSpec(name="web", command=[str(plain)]), spawner)
    assert str(caught.value) == f"web: cannot start {plain}: Permission denied"


OUTPUT = r"""
import os
os.write(1, b"hello\n")
os.write(2, b"oops on stderr\n")
os.write(1, b"x" * 40000 + b"\n")
os.write(1, b"tail without newline")
"""


async def test_output_is_prefixed_and_long_lines_split(tmp_path: Path, spawner: Spawner) -> None:
    """stdout and stderr arrive in order, prefixed; a long line is split; the last one is kept."""
    program = tmp_path / "output.py"
    program.write_text(OUTPUT)
    status, lines = await run_to_end(
        spawner, LaunchSpec(name="chatty", command=[sys.executable, str(program)])
    )
    assert status == 0
    rest = 40000 - 2 * MAX_LINE
    assert lines == [
        "chatty: hello",
        "chatty: oops on stderr",
        "chatty: " + "x" * MAX_LINE,
        "chatty: " + "x" * MAX_LINE,
        "chatty: " + "x" * rest,
        "chatty: tail without newline",
    ]


class ChunkStream(trio.abc.ReceiveStream):
    """A receive stream that yields the given chunks, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_relay_splits_across_chunks_and_characters() -> None:
    """Lines split over chunks are joined; a split never cuts a UTF-8 character; CRLF ends lines."""
    long_line = "a" * (MAX_LINE - 1) + "é" + "b"  # the é straddles the limit
    data = ("one\r\ntw" + "o\n" + long_line + "\n" + "\xff-free").encode()
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    lines: list[str] = []
    await relay_output("svc", ChunkStream(chunks), lines.append)
    assert lines == [
        "svc: one",
        "svc: two",
        "svc: " + "a" * (MAX_LINE - 1),
        "svc: éb",
        "svc: \xff-free",
    ]


async def test_relay_replaces_invalid_utf8() -> None:
    """Bytes that are not UTF-8 are replaced, not fatal."""
    lines: list[str] = []
    await relay_output("svc", ChunkStream([b"bad \xff byte\n"]), lines.append)
    assert lines == ["svc: bad \ufffd byte"]


async def test_signal_group_reaches_the_whole_group(spawner: Spawner) -> None:
    """signal_group stops the service and what it started; a gone group is no error."""
    spec = LaunchSpec(
        name="svc", command=["/bin/sh", "-c", "sleep 60 & echo started; wait"], path="/usr/bin:/bin"
    )
    lines: list[str] = []
    first_line = trio.Event()
    relayed = trio.Event()

    def collect(line: str) -> None:
        lines.append(line)
        first_line.set()

    process = await open_service_process(spec, spawner)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def relay() -> None:
                    await relay_output("svc", process.stdout, collect)
                    relayed.set()

                nursery.start_soon(relay)
                await first_line.wait()
                assert lines == ["svc: started"]
                process.signal_group(signal.SIGTERM)
                # sleep holds the output pipe too: EOF means both are gone.
                await relayed.wait()
                assert await process.wait() == -signal.SIGTERM
        process.signal_group(signal.SIGTERM)  # reaped and gone: no error
    finally:
        with trio.CancelScope(shield=True):
            process.signal_group(signal.SIGKILL)
            await process.wait()
            await process.stdout.aclose()


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def test_systemd_socket_proxyd_accepts_our_handoff(spawner: Spawner) -> None:
    """systemd-socket-proxyd, strict about LISTEN_PID and LISTEN_FDS, serves our socket."""
    if not os.access(SOCKET_PROXYD, os.X_OK):
        pytest.skip("systemd-socket-proxyd is not installed")
    with trio.fail_after(TIMEOUT), socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        async with trio.open_nursery() as nursery:
            echo_listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            echo_port = echo_listeners[0].socket.getsockname()[1]
            spec = LaunchSpec(
                name="proxy",
                command=[SOCKET_PROXYD, f"127.0.0.1:{echo_port}"],
                fds=[listener.fileno()],
                fd_names=["proxy"],
            )
            async with started(spawner, spec) as (process, lines):
                client = await trio.open_tcp_stream(*listener.getsockname())
                async with client:
                    await client.send_all(b"through systemd's proxy")
                    received = b""
                    while len(received) < len(b"through systemd's proxy"):
                        chunk = await client.receive_some()
                        assert chunk, lines
                        received += chunk
                assert received == b"through systemd's proxy"
                assert process.returncode is None, lines
            nursery.cancel_scope.cancel()


def test_spec_lists_no_sockets_by_default() -> None:
    """A LaunchSpec without sockets passes none and no names."""
    spec = LaunchSpec(name="svc", command=["true"])
    assert (tuple(spec.fds), tuple(spec.fd_names), dict(spec.environment)) == ((), (), {})


async def test_many_sockets_with_holes_in_the_range(report_program: str, spawner: Spawner) -> None:
    """With free fds inside 3..3+N-1 in lazyd, all N sockets still arrive in order."""
    count = 24
    dummies = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        # Free numbers below the sockets, inside the target range: where
        # subprocess's pipes would otherwise be allocated.
        for fd in dummies:
            os.close(fd)
        dummies = []
        got = await report(
            spawner,
            LaunchSpec(
                name="svc",
                command=[sys.executable, report_program],
                fds=[s.fileno() for s in sockets],
                fd_names=[f"s{i}" for i in range(count)],
            ),
        )
        assert got["open_fds"] == list(range(3 + count))
        for i, sock in enumerate(sockets):
            assert got["fds"][str(3 + i)]["name"] == list(sock.getsockname())
        assert got["environ"]["LISTEN_FDS"] == str(count)
    finally:
        for fd in dummies:
            os.close(fd)
        for sock in sockets:
            sock.close()


async def test_socket_held_at_fd_0(report_program: str, spawner: Spawner) -> None:
    """A socket that lazyd holds at fd 0 (started with stdin closed) still arrives at fd 3."""
    saved_stdin = os.dup(0)
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            os.dup2(sock.fileno(), 0)
            got = await report(
                spawner,
                LaunchSpec(
                    name="svc",
                    command=[sys.executable, report_program],
                    fds=[0],
                    fd_names=["zero"],
                ),
            )
            assert got["fds"]["3"]["name"] == list(sock.getsockname())
    finally:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)
