"""Shared helpers: free ports, a real lazyd daemon run as a subprocess, proxies run in
the test's own event loop, bursts of clients, and the config oracle."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyd.config import Config, loads
from lazyd.errors import ConfigError
from lazyd.front.datagram import DatagramProxy
from lazyd.front.stream import StreamProxy
from lazyd.net.addresses import Address
from lazyd.runtime import control

# The repository (tests/ is one level down): conf/, benchmarks/ and lazyd/ sit there.
ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "tests" / "programs"
PY = sys.executable
# Every daemon the tests start treats a lifecycle event that does not fit its
# state as the bug it is (an error with a traceback in the log), not a line.
os.environ["LAZYD_STRICT"] = "1"


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's choice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether pid runs: a zombie waiting for init to reap it has been killed already."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False  # gone, or reaped while its stat file was being read (ESRCH)
    return state not in ("Z", "X")


async def wait_gone(pid: int) -> None:
    """Wait until `pid` (not our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def program(name: str, *args: object) -> str:
    """A YAML flow list running one of tests/programs with this Python."""
    parts = [PY, str(PROGRAMS / name), *map(str, args)]
    return "[" + ", ".join(f'"{p}"' for p in parts) + "]"


class LazydProcess:
    """A real `lazyd run` in a subprocess, with its stderr collected."""

    def __init__(self, process: trio.Process, control_path: str) -> None:
        self.process = process
        self.control_path = control_path
        self.lines: list[str] = []
        self._new_line = trio.Event()
        self.returncode: int | None = None

    async def _collect(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                if os.environ.get("LAZYD_TEST_ECHO"):
                    print("lazyd>", line, file=sys.stderr)
                self.lines.append(line)
            self._new_line.set()
            self._new_line = trio.Event()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self._new_line.set()

    async def wait_line(self, pattern: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until `count` lines of lazyd's stderr match `pattern`; return the last."""
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found[count - 1]
                if self.process.returncode is not None and self._new_line.is_set():
                    raise AssertionError(
                        f"lazyd exited ({self.process.returncode}) before a line matched "
                        f"{pattern!r}:\n" + "\n".join(self.lines)
                    )
                await self._new_line.wait()

    def log(self) -> str:
        return "\n".join(self.lines)

    async def status(self) -> dict[str, Any]:
        reply = await trio.to_thread.run_sync(control.request, self.control_path, "status")
        services: dict[str, Any] = reply["services"]
        return services

    async def wait_status(
        self, service: str, until: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0, **fields: object,
    ) -> dict[str, Any]:
        """Poll status until the service's row has these `fields` and satisfies `until`;
        return the row.  For counters and states lazyd logs no line for (a line, where
        there is one, is awaited with wait_line): status is the only view in."""
        with trio.fail_after(timeout):
            while True:
                svc: dict[str, Any] = (await self.status())[service]
                if all(svc[k] == v for k, v in fields.items()) and (until is None or until(svc)):
                    return svc
                await trio.sleep(0.02)

    async def wait_state(self, service: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll status until the service reaches a state."""
        return await self.wait_status(service, timeout=timeout, state=state)

    async def activate_until_idle(self, service: str, port: int, times: int) -> None:
        """`times` rounds of: one line to a serve_lines.py service that exits when idle,
        its answer, its ready line, and its exit."""
        for n in range(1, times + 1):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"hi\n")
                with trio.fail_after(10):
                    assert (await stream.receive_some(100)).endswith(b" hi\n")
            await self.wait_line(rf"^{service}: ready in", count=n)
            await self.wait_line(rf"^{service}: exited with status 0", count=n)

    async def stop(self, timeout: float = 15.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            self.returncode = await self.process.wait()
        return self.returncode


def _let_others_in(path: Path) -> None:
    """Let other users through the (root-only) pytest directories down to `path`.

    lazyd, started as root, runs as nobody once it has bound its sockets, and
    still reads its config on a reload and reaches Unix sockets in there.
    """
    for directory in [path, *path.parents]:
        if directory == Path(tempfile.gettempdir()) or directory == directory.parent:
            break
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@asynccontextmanager
async def run_lazyd(
    tmp_path: Path, config_text: str, *, expect_exit: int | None = 0,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[LazydProcess]:
    """Start `lazyd run` on this config and wait until it holds its sockets.
    `prefix` runs it through a wrapper command (such as prlimit); `env` adds to
    the environment it inherits."""
    control_path = str(tmp_path / "control.sock")
    config = tmp_path / "lazyd.yaml"
    config.write_text(f"control: unix:{control_path}\n{config_text}")
    _let_others_in(tmp_path)
    process = await trio.lowlevel.open_process(
        [*prefix, PY, "-m", "lazyd", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    lz = LazydProcess(process, control_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lz._collect)
        try:
            await lz.wait_line(r"^lazyd: holding \d+ sockets?")
            yield lz
            rc = await lz.stop()
            if expect_exit is not None:
                assert rc == expect_exit, lz.log()
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            nursery.cancel_scope.cancel()


async def exchange(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Connect over TCP, send, half-close, and read the whole answer."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        chunks = []
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks)


def proxy_service(name: str, command: str, listen: str, upstream: str, *extra: str) -> str:
    """The config lines of one proxy-mode service (run as root) with one socket."""
    lines = [
        f"  {name}:",
        "    mode: proxy",
        f"    command: {command}",
        "    user: root",
        *(f"    {e}" for e in extra),
        "    sockets:",
        f"      main: {{listen: '{listen}', upstream: '{upstream}'}}",
    ]
    return "\n".join(lines) + "\n"


async def burst(port: int, count: int) -> tuple[dict[int, bytes], list[BaseException]]:
    """`count` clients at once, each sending "request N\\n" and reading the whole answer:
    the answers by N, and the errors of those that got none."""
    answers: dict[int, bytes] = {}
    failures: list[BaseException] = []

    async def client(i: int) -> None:
        try:
            answers[i] = await exchange(port, b"request %d\n" % i)
        except OSError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(client, i)
    return answers, failures


class Recorder:
    """What a proxy (stream or datagram) told its runner: traffic seen, log lines."""

    def __init__(self) -> None:
        self.traffic = 0
        self.lines: list[str] = []
        self._changed = trio.Event()

    def on_traffic(self) -> None:
        self.traffic += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_traffic(self, count: int) -> None:
        while self.traffic < count:
            await self._changed.wait()


def yaml_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def port() -> int:
    return free_port()


def needs(*programs: str) -> pytest.MarkDecorator:
    """Skip a test, saying why, when a program it uses as a witness is missing
    (scripts/setup installs them as root)."""
    missing = [p for p in programs
               if not (os.access(p, os.X_OK) if p.startswith("/") else shutil.which(p))]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)}: run scripts/setup test as root"
    )


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test made or bound (lazyd's side); closed afterwards whatever happened."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


@asynccontextmanager
async def proxying(
    sock: socket.socket, upstream: Address, **options: Any
) -> AsyncIterator[tuple[Any, Recorder]]:
    """lazyd's proxy for `sock` (a StreamProxy for a listening stream socket, else a
    DatagramProxy) forwarding to `upstream`, run in the background of the test's own event
    loop, with a Recorder of what it reports; not ready until the test says so."""
    rec = Recorder()
    options.setdefault("queue_limit", 1024)
    cls = StreamProxy if sock.type == socket.SOCK_STREAM else DatagramProxy
    proxy = cls("svc", sock, upstream, on_traffic=rec.on_traffic, log=rec.lines.append,
                **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy, rec
        nursery.cancel_scope.cancel()


# Every line of a ConfigError starts with where the problem is: FILE:LINE:COL.
LOCATED = re.compile(r"^lazyd\.yaml:\d+:\d+: ")


def assert_config_or_located_problems(text: str, as_root: bool = False) -> None:
    """`text` loads into a Config, or raises a ConfigError whose every line is located."""
    try:
        config = loads(text, "lazyd.yaml", as_root=as_root)
    except ConfigError as exc:
        assert exc.problems, text
        for line in str(exc).split("\n"):
            assert LOCATED.match(line), (line, text)
    else:
        assert isinstance(config, Config)
