"""A seeded random walk against one real daemon: it never dies and keeps its promises.

Each walk starts one `lazyd run` (real processes, real sockets) and takes a
few dozen random steps, chosen from a seed: configs that add, remove and change
services (pass and proxy; TCP, Unix, UDP; every kind of `ready`; idle
timeouts; restart policies; `requires`), applied by SIGHUP or `lazyd reload`;
configs with errors (refused, and nothing changes); traffic to random
services (bursts of short connections, long-lived connections, datagrams);
SIGKILL of service processes; services that crash at start or never get ready
(tests/programs/chaos_service.py does what its argv says).

The walk keeps its own model of the config in force, so it knows what each
client may see. After every step:
- the daemon is alive and `status --json` answers within 2 s, naming exactly
  the services of the config in force;
- every request was answered correctly, or refused/closed where the model
  allows it: at once when the proxy service is `failed`, within its
  start_timeout when its start fails; never left hanging past that;
- no traceback in lazyd's log.
At the end the walk goes back to the config it started with, waits until
nothing runs, and lazyd's open fds and trio tasks must be what they were in
that same state at the start; SIGTERM must end it with status 0 and leave no
process behind.

A failure prints the seed, the numbered steps and the tail of lazyd's log.
The suite runs a few fixed seeds; `make chaos` walks seed after seed for
CHAOS_SECONDS (default 600), and CHAOS_SEED=N replays one walk.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyd.datapath.bpf import supported
from lazyd.errors import ControlError
from lazyd.runtime import control
from tests.conftest import PROGRAMS, PY, LazydProcess, free_port, program, run_lazyd

HOST = "127.0.0.1"
CHAOS = PROGRAMS / "chaos_service.py"
# A service run as nobody needs an interpreter nobody can reach (the test's
# own may live under /root).
NOBODY_PY = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")

# Honest timeouts for a loaded 2-core machine: a Python service takes a few
# hundred ms to start, more under load.
SLACK = 3.0  # on top of a service's own timeouts
AT_ONCE = 1.5  # "refused or closed at once"
STATUS_WITHIN = 2.0
STEADY_TIMEOUT = 20.0  # for the quiet moments at the start and the end
OK_START_TIMEOUT = 8.0  # start_timeout of services that do get ready
HANG_START_TIMEOUT = 1.0  # start_timeout of services that never get ready
STOP_TIMEOUT = 2.0
MAX_SERVICES = 5

SUITE_SEEDS = (1, 2, 3)
SUITE_STEPS = 20
LONG_STEPS = 80  # per walk under `make chaos`

TRACEBACK = re.compile(r"Traceback|Exception Group")


class Violation(AssertionError):
    """A promise the walk saw broken."""


# --- The model: what the config in force says ----------------------------------


@dataclass
class Sock:
    """One socket of a service: where clients go, and (proxy) where the service listens."""

    key: str
    kind: str  # tcp | unix | udp
    port: int = 0
    path: str = ""
    up_port: int = 0
    up_path: str = ""

    @property
    def stream(self) -> bool:
        return self.kind != "udp"

    def listen(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"{self.kind}://{HOST}:{self.port}"

    def upstream(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.up_path}"
        return f"{self.kind}://{HOST}:{self.up_port}"

    def service_arg(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.up_path}"
        return f"{self.kind}:{HOST}:{self.up_port}"


@dataclass
class Svc:
    """One service as the walk configured it."""

    name: str
    serial: int
    mode: str  # pass | proxy
    behavior: str  # ok | crash | hang
    ready: str  # started | connect | notify | delay
    restart: str
    start_limit: int
    interval: float
    idle: float | None  # proxy: idle_timeout; pass: the service exits when idle this long
    delay: float  # the service's own start-up time
    user: str
    requires: list[str]
    sockets: list[Sock]
    fixed: bool = False  # the anchor: never changed or removed
    datapath: str = ""  # proxy mode: the datapath key, if the walk sets it
    # Bumped whenever lazyd may end this service's connections (changed, killed).
    epoch: int = 0
    killed_at: int = -1  # the step that last SIGKILLed it

    @property
    def start_timeout(self) -> float:
        return HANG_START_TIMEOUT if self.behavior == "hang" else OK_START_TIMEOUT

    def answer_bound(self) -> float:
        """How long a client may wait for its answer (or its refusal) at most."""
        return self.start_timeout + self.delay + SLACK

    def describe(self) -> str:
        socks = ",".join(f"{s.kind}" for s in self.sockets)
        extra = f" requires={self.requires}" if self.requires else ""
        idle = f" idle={self.idle:g}" if self.idle is not None else ""
        if self.datapath and self.mode == "proxy":
            idle += f" datapath={self.datapath}"
        return (f"{self.name} {self.mode} {self.behavior} ready={self.ready} "
                f"restart={self.restart} limit={self.start_limit}/{self.interval:g}s "
                f"delay={self.delay:g}{idle} user={self.user} [{socks}]{extra}")


def _yaml_list(parts: list[str]) -> str:
    return "[" + ", ".join(f'"{p}"' for p in parts) + "]"


def render(services: dict[str, Svc], mark: str, inject: dict[str, list[str]] | None = None,
           extra: str = "") -> str:
    """The services: part of a config file for this model (with optional damage)."""
    inject = inject or {}
    lines = ["services:"]
    for svc in services.values():
        python = NOBODY_PY if svc.user == "nobody" and NOBODY_PY else PY
        argv = [python, str(CHAOS), svc.name, mark]
        if svc.mode == "pass":
            argv += ["--listen", "fds"]
        else:
            for sock in svc.sockets:
                argv += ["--listen", sock.service_arg()]
        if svc.delay:
            argv += ["--delay", f"{svc.delay:g}"]
        if svc.behavior != "ok":
            argv.append(f"--{svc.behavior}")
        if svc.ready == "notify":
            argv.append("--notify")
        if svc.mode == "pass" and svc.idle is not None:
            argv += ["--idle-exit", f"{svc.idle:g}"]
        lines += [
            f"  {svc.name}:",
            f"    command: {_yaml_list(argv)}",
            f"    mode: {svc.mode}",
            f"    user: {svc.user}",
            "    ready: " + ("{delay: 1500ms}" if svc.ready == "delay" else svc.ready),
            f"    restart: {svc.restart}",
            f"    start_limit: {svc.start_limit}",
            f"    start_limit_interval: {svc.interval:g}s",
            f"    start_timeout: {svc.start_timeout:g}s",
            f"    stop_timeout: {STOP_TIMEOUT:g}s",
        ]
        if svc.mode == "proxy" and svc.idle is not None:
            lines.append(f"    idle_timeout: {svc.idle:g}s")
        if svc.mode == "proxy" and svc.datapath:
            lines.append(f"    datapath: {svc.datapath}")
        if svc.requires:
            lines.append(f"    requires: [{', '.join(svc.requires)}]")
        lines += inject.get(svc.name, [])
        lines.append("    sockets:")
        for sock in svc.sockets:
            if svc.mode == "pass":
                lines.append(f"      {sock.key}: '{sock.listen()}'")
            else:
                lines.append(f"      {sock.key}: {{listen: '{sock.listen()}', "
                             f"upstream: '{sock.upstream()}'}}")
    return "\n".join(lines) + "\n" + extra


# --- What a client saw ---------------------------------------------------------


@dataclass
class Seen:
    kind: str  # answer | refused | closed | hang
    data: bytes = b""
    after: float = 0.0  # seconds from the first try

    def __str__(self) -> str:
        text = f"{self.kind} after {self.after:.2f} s"
        return text + (f" {self.data[:60]!r}" if self.data else "")


async def _open_stream(sock: Sock) -> trio.SocketStream:
    if sock.kind == "unix":
        return await trio.open_unix_socket(sock.path)
    return await trio.open_tcp_stream(HOST, sock.port)


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


async def stream_request(sock: Sock, line: bytes, bound: float) -> Seen:
    """One short connection: send a line, read its answer, within `bound` seconds."""
    began = trio.current_time()

    def seen(kind: str, data: bytes = b"") -> Seen:
        return Seen(kind, data, trio.current_time() - began)

    with trio.move_on_after(bound):
        try:
            stream = await _open_stream(sock)
        except OSError:
            return seen("refused")
        async with stream:
            try:
                await stream.send_all(line)
                return seen("answer", await _read_line(stream))
            except EOFError as eof:
                return seen("closed", eof.args[0])
            except (trio.BrokenResourceError, OSError):
                return seen("closed")
    return seen("hang")


async def datagram_request(sock: Sock, data: bytes, bound: float) -> Seen:
    began = trio.current_time()
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        await udp.bind((HOST, 0))
        await udp.connect((HOST, sock.port))
        with trio.move_on_after(bound):
            try:
                await udp.send(data)
                answer = await udp.recv(65536)
            except OSError:  # ICMP port unreachable: nothing listens
                return Seen("refused", after=trio.current_time() - began)
            return Seen("answer", answer, trio.current_time() - began)
    return Seen("hang", after=trio.current_time() - began)


def _correct(svc_name: str, line: bytes, answer: bytes) -> bool:
    head, _, rest = answer.partition(b" ")
    pid, _, echoed = rest.partition(b" ")
    return head == svc_name.encode() and pid.isdigit() and echoed == line


@dataclass
class Long:
    """A long-lived connection, opened to a service that answered on it."""

    svc: str
    sock: Sock
    stream: trio.SocketStream
    epoch: int
    number: int
    exchanges: int = 0


# --- lazyd from outside ----------------------------------------------------------


def _fd_kinds(pid: int) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        kind = re.sub(r":\[\d+\]$", "", target)
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def _processes(mark: str, session: int) -> list[str]:
    """Processes still alive that the walk started (its mark in their argv) or
    that are in lazyd's session."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            continue
        if mark.encode() in cmdline.split(b"\0") or int(fields[3]) == session:
            argv = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry}: {argv}")
    return found


@dataclass
class Snapshot:
    fds: dict[str, int]
    tasks: int

    @property
    def total(self) -> int:
        return sum(self.fds.values())


# --- The walk ------------------------------------------------------------------


@dataclass
class Figures:
    walks: int = 0
    steps: int = 0
    operations: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    kernel_walks: int = 0  # walks with services on the kernel data path
    steered_starts: int = 0  # starts after which new connections were steered
    failures: list[str] = field(default_factory=list)


class Walk:
    def __init__(self, seed: int, steps: int, tmp_path: Path, figures: Figures) -> None:
        self.seed = seed
        self.total_steps = steps
        self.rng = random.Random(seed)
        # Half the walks put their proxy services on the kernel data path
        # where they can (`auto`: TCP ones are steered once warm), the
        # anchor on it for certain.  Drawn apart from the walk's own numbers,
        # so that a seed walks the same steps either way.
        self.kernel = supported() is None and random.Random(f"kernel {seed}").random() < 0.5
        self.tmp = tmp_path
        self.figures = figures
        self.socks_dir = tmp_path / "s"
        self.mark = f"chaos-mark-{os.getpid()}-{id(self)}-{seed}"
        self.services: dict[str, Svc] = {}
        self.removed: list[Svc] = []  # removed by the last config step
        self.longs: list[Long] = []
        self.steps: list[str] = []
        self.serial = 0
        self.used_ports: set[int] = set()
        self.lz: LazydProcess | None = None
        self.header = ""
        # Held bound for the whole walk: a config naming it cannot be applied.
        self.blocker = socket.socket()
        self.blocker.bind((HOST, 0))
        self.blocker.listen(1)

    # -- building services --------------------------------------------------

    def _port(self, kind: int = socket.SOCK_STREAM) -> int:
        while True:
            port = free_port(kind)
            if port not in self.used_ports:
                self.used_ports.add(port)
                return port

    def _sock(self, key: str, kind: str, name: str) -> Sock:
        sock = Sock(key, kind)
        self.serial += 1
        if kind == "unix":
            sock.path = str(self.socks_dir / f"{name}-{self.serial}.sock")
            sock.up_path = str(self.socks_dir / f"{name}-{self.serial}.up")
        else:
            kind_ = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
            sock.port, sock.up_port = self._port(kind_), self._port(kind_)
        return sock

    def _fit_ready(self, svc: Svc) -> None:
        """A readiness that makes sense for this mode, behaviour and sockets."""
        rng = self.rng
        if svc.mode == "pass":
            choices = ["started", "started", "notify", "delay"]
        elif any(not s.stream for s in svc.sockets):
            # `connect` probes stream upstreams only, and after a fixed delay
            # a service slow to start on a loaded machine would not listen
            # yet: lazyd would rightly forward into nothing.
            choices = ["notify"]
        else:
            choices = ["connect", "connect", "notify"]
        if svc.behavior == "hang":
            # "Never ready" only means something where lazyd waits for a sign.
            choices = [c for c in choices if c in ("notify", "connect")]
        if svc.ready not in choices:
            svc.ready = rng.choice(choices)
        if svc.ready == "delay":
            svc.delay = 0.0  # ready after 1.5 s: the service must listen by then

    def new_service(self) -> Svc:
        rng = self.rng
        self.serial += 1
        name = f"s{self.serial}"
        mode = rng.choice(["pass", "proxy"])
        if mode == "pass":
            kinds = rng.sample(["tcp", "unix", "udp"], rng.choice([1, 1, 2]))
        else:
            kinds = [rng.choice(["tcp", "tcp", "unix", "udp"])]
        sockets = [self._sock(f"k{i}", kind, name) for i, kind in enumerate(kinds)]
        older = [s.name for s in self.services.values()]
        svc = Svc(
            name=name, serial=self.serial, mode=mode,
            behavior=rng.choices(["ok", "crash", "hang"], [6, 2, 1])[0],
            ready="", restart=rng.choice(["no", "on-failure", "always"]),
            start_limit=rng.choice([2, 3, 5]), interval=rng.choice([2.0, 2.0, 5.0, 30.0]),
            idle=rng.choice([None, 0.5, 2.0]), delay=rng.choice([0.0, 0.0, 0.0, 0.3]),
            user=rng.choice(["root", "root", "nobody"]) if NOBODY_PY else "root",
            requires=rng.sample(older, 1) if older and rng.random() < 0.3 else [],
            sockets=sockets, datapath="auto" if self.kernel else "",
        )
        self._fit_ready(svc)
        return svc

    def change(self, svc: Svc) -> str:
        """Change one or two things about a service; say what."""
        rng = self.rng
        said = []
        for _ in range(rng.choice([1, 1, 2])):
            what = rng.choice(["behavior", "ready", "restart", "idle", "delay", "socket",
                               "mode", "requires", "user"])
            if what == "behavior":
                svc.behavior = rng.choice(["ok", "ok", "crash", "hang"])
            elif what == "ready":
                svc.ready = ""
            elif what == "restart":
                svc.restart = rng.choice(["no", "on-failure", "always"])
                svc.start_limit = rng.choice([2, 3, 5])
                svc.interval = rng.choice([2.0, 5.0, 30.0])
            elif what == "idle":
                svc.idle = rng.choice([None, 0.5, 2.0])
            elif what == "delay":
                svc.delay = rng.choice([0.0, 0.3])
            elif what == "socket":
                i = rng.randrange(len(svc.sockets))
                old = svc.sockets[i]
                kind = old.kind if svc.mode == "proxy" else rng.choice(["tcp", "unix", "udp"])
                if svc.mode == "pass" and any(s.kind == kind for j, s in enumerate(svc.sockets)
                                              if j != i):
                    kind = old.kind
                svc.sockets[i] = self._sock(old.key, kind, svc.name)
            elif what == "mode":
                svc.mode = "proxy" if svc.mode == "pass" else "pass"
                if svc.mode == "proxy":
                    svc.sockets = svc.sockets[:1]  # one socket each, as the walk adds them
            elif what == "requires":
                older = [s.name for s in self.services.values() if s.serial < svc.serial]
                svc.requires = rng.sample(older, 1) if older and not svc.requires else []
            elif what == "user":
                svc.user = "nobody" if svc.user == "root" and NOBODY_PY else "root"
            said.append(what)
        self._fit_ready(svc)
        svc.epoch += 1
        return "+".join(said)

    # -- talking to lazyd -------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.tmp / "lazyd.yaml"

    def write(self, text: str) -> None:
        # Atomically: lazyd's spawner and daemon both read it on a reload.
        temp = self.config_path.with_suffix(".new")
        temp.write_text(f"{self.header}\n{text}")
        temp.chmod(0o644)
        temp.replace(self.config_path)

    async def status(self) -> dict[str, Any]:
        assert self.lz is not None
        try:
            with trio.fail_after(STATUS_WITHIN):
                reply = await trio.to_thread.run_sync(
                    control.request, self.lz.control_path, "status", abandon_on_cancel=True
                )
        except trio.TooSlowError:
            raise Violation(f"status did not answer within {STATUS_WITHIN:g} s") from None
        except ControlError as exc:
            raise Violation(f"status failed: {exc}") from None
        return reply

    async def reload(self, how: str) -> bool:
        """Apply the file by SIGHUP or `lazyd reload`; whether lazyd took it."""
        lz = self.lz
        assert lz is not None
        done = re.compile(r"^lazyd: (reloaded |reload failed)")
        before = sum(1 for line in lz.lines if done.search(line))
        if how == "sighup":
            lz.process.send_signal(signal.SIGHUP)
            try:
                line = await lz.wait_line(done.pattern, timeout=20, count=before + 1)
            except trio.TooSlowError:
                raise Violation("SIGHUP: no 'reloaded' or 'reload failed' within 20 s") from None
            except AssertionError:
                raise Violation(f"lazyd exited ({lz.process.returncode}) on SIGHUP") from None
            return "reloaded" in line
        with trio.fail_after(30):
            result = await trio.run_process(
                [PY, "-m", "lazyd", "reload", "--control", lz.control_path],
                capture_stdout=True, capture_stderr=True, check=False,
            )
        if result.returncode not in (0, 1):
            raise Violation(f"lazyd reload exited {result.returncode}: {result.stderr!r}")
        return result.returncode == 0

    async def apply(self, how: str | None = None) -> None:
        """Write the model's config and apply it: lazyd must take it."""
        self.write(render(self.services, self.mark))
        how = how or self.rng.choice(["sighup", "sighup", "cli"])
        if not await self.reload(how):
            said = [line for line in self.lz_lines() if "reload" in line][-5:]
            raise Violation(f"a valid config was refused ({how}): {said}")

    def lz_lines(self) -> list[str]:
        assert self.lz is not None
        return self.lz.lines

    # -- invariants -------------------------------------------------------------

    async def check(self) -> dict[str, Any]:
        """The promises that hold after every step; the status they were read from."""
        assert self.lz is not None
        if self.lz.process.returncode is not None:
            raise Violation(f"lazyd exited with status {self.lz.process.returncode}")
        reply = await self.status()
        names = set(reply["services"])
        if names != set(self.services):
            raise Violation(f"status names {sorted(names)}, the config in force "
                            f"{sorted(self.services)}")
        self.check_log()
        return reply

    def check_log(self) -> None:
        for line in self.lz_lines():
            if TRACEBACK.search(line):
                raise Violation(f"lazyd's log has a traceback: {line}")

    def judge(self, svc: Svc, sock: Sock, line: bytes, seen: Seen,
              before: dict[str, Any], after: dict[str, Any]) -> None:
        """Whether what a client saw is what the model allows."""
        what = f"{svc.name} {sock.kind} {line.strip().decode()}: {seen}"
        states = {before.get("state"), after.get("state")}
        failed = "failed" in states
        # A start that failed while the client waited (the service's own
        # doing: a crash, a kill, a start limit reached).
        start_failed = (after.get("activations", 0) > before.get("activations", 0)
                        and after.get("last_outcome") in ("failed", "timed out"))
        if seen.kind == "answer":
            if not _correct(svc.name, line, seen.data):
                raise Violation(f"wrong answer: {what}")
            return
        if svc.mode == "proxy":
            if sock.stream and failed and before.get("state") == "failed" \
                    and seen.after > AT_ONCE and after.get("state") == "failed":
                raise Violation(f"a failed proxy service did not refuse at once: {what}")
            if seen.kind == "hang" and sock.stream:
                raise Violation(f"left hanging past {svc.answer_bound():g} s: {what}")
            if svc.behavior != "ok" or failed or start_failed:
                return
            if (sock.stream and seen.kind in ("refused", "closed") and before.get("steering")
                    and svc.killed_at == len(self.steps) - 1):
                # On the kernel data path lazyd is out of the way: a client
                # that reaches a steered service's listener while the
                # process dies is reset (or, as the listener closes,
                # refused), as it would be without lazyd.  Steering still
                # on when the request went out, right after the SIGKILL,
                # is that instant (README: the kernel data path).
                return
            if seen.kind == "hang" and not sock.stream:
                raise Violation(f"datagram unanswered within {svc.answer_bound():g} s: {what}")
            raise Violation(f"a ready service's client was {seen.kind}: {what}")
        # Pass mode: the kernel holds what the service does not take; a
        # service that fails leaves its clients waiting there, as designed.
        if svc.behavior != "ok" or failed or start_failed:
            return
        raise Violation(f"a pass-mode service that works did not answer: {what}")

    # -- the operations -----------------------------------------------------------

    def step(self, text: str) -> None:
        self.steps.append(f"{len(self.steps) + 1:3d}. {text}")

    def _count(self, op: str) -> None:
        self.figures.operations[op] = self.figures.operations.get(op, 0) + 1

    async def op_add(self) -> None:
        svc = self.new_service()
        self.services[svc.name] = svc
        how = self.rng.choice(["sighup", "sighup", "cli"])
        self.step(f"add {svc.describe()} ({how})")
        await self.apply(how)

    async def op_remove(self) -> None:
        name = self.rng.choice([n for n, s in self.services.items() if not s.fixed])
        gone = self.services.pop(name)
        for svc in self.services.values():
            if name in svc.requires:
                svc.requires.remove(name)
                svc.epoch += 1
        self.removed.append(gone)
        how = self.rng.choice(["sighup", "sighup", "cli"])
        self.step(f"remove {name} ({how})")
        await self.apply(how)

    async def op_change(self) -> None:
        name = self.rng.choice([n for n, s in self.services.items() if not s.fixed])
        svc = self.services[name]
        before = svc.describe()
        old_sockets = list(svc.sockets)
        what = self.change(svc)
        self.removed += [replace(svc, sockets=[s]) for s in old_sockets if s not in svc.sockets]
        how = self.rng.choice(["sighup", "sighup", "cli"])
        self.step(f"change {name} {what}: {before} -> {svc.describe()} ({how})")
        await self.apply(how)

    async def op_bad_config(self) -> None:
        rng = self.rng
        names = [n for n, s in self.services.items() if not s.fixed] or list(self.services)
        target = rng.choice(names)
        kinds = ["unknown key", "bad duration", "unknown requires", "taken port",
                 "claimed address", "missing command"]
        if any(s.mode == "pass" for s in self.services.values()):
            kinds.append("idle_timeout in pass mode")
        kind = rng.choice(kinds)
        inject: dict[str, list[str]] = {}
        extra = ""
        if kind == "unknown key":
            inject[target] = ["    comand: oops"]
        elif kind == "bad duration":
            inject[target] = ["    flow_timeout: 5 parsecs"]
        elif kind == "unknown requires":
            services = {n: replace(s, requires=[*s.requires, "nosuch"]) if n == target else s
                        for n, s in self.services.items()}
            text = render(services, self.mark)
            inject = {}
        elif kind == "idle_timeout in pass mode":
            target = rng.choice([n for n, s in self.services.items() if s.mode == "pass"])
            inject[target] = ["    idle_timeout: 1s"]
        elif kind == "taken port":
            port = self.blocker.getsockname()[1]
            extra = (f"  bad:\n    command: {program('chaos_service.py', 'bad', self.mark)}\n"
                     f"    user: root\n    sockets:\n      main: tcp://{HOST}:{port}\n")
        elif kind == "claimed address":
            sock = self.services[target].sockets[0]
            extra = (f"  bad:\n    command: {program('chaos_service.py', 'bad', self.mark)}\n"
                     f"    user: root\n    sockets:\n      main: '{sock.listen()}'\n")
        elif kind == "missing command":
            extra = "  bad:\n    user: root\n    sockets:\n      main: tcp://127.0.0.1:1\n"
        if kind != "unknown requires":
            text = render(self.services, self.mark, inject, extra)
        self.write(text)
        how = rng.choice(["sighup", "sighup", "cli"])
        self.step(f"bad config: {kind} ({target}) ({how})")
        if await self.reload(how):
            raise Violation(f"a config with an error ({kind}) was taken")

    def _targets(self, stream: bool | None = None) -> list[tuple[Svc, Sock]]:
        return [(svc, sock) for svc in self.services.values() for sock in svc.sockets
                if stream is None or sock.stream == stream]

    async def _request(self, svc: Svc, sock: Sock, tag: str,
                       before: dict[str, Any], results: list[tuple[Svc, Sock, bytes, Seen,
                                                                  dict[str, Any]]]) -> None:
        line = f"{tag} {self.rng.randbytes(8).hex()}\n".encode()
        bound = svc.answer_bound()
        if before.get("state") == "failed" and svc.mode == "proxy":
            bound = AT_ONCE + SLACK  # must be refused at once; judged below
        elif svc.mode == "pass" and (svc.behavior != "ok" or before.get("state") == "failed"):
            # The kernel holds it, as designed; nothing to wait for.
            bound = AT_ONCE
        if sock.stream:
            seen = await stream_request(sock, line, bound)
        else:
            seen = await datagram_request(sock, line, bound)
        results.append((svc, sock, line, seen, before))

    async def op_burst(self) -> None:
        targets = self._targets()
        svc, sock = self.rng.choice(targets)
        count = self.rng.choice([1, 1, 3, 8]) if sock.stream else self.rng.choice([1, 3])
        tag = f"b{len(self.steps) + 1}"
        self.step(f"burst of {count} to {svc.name}.{sock.key} ({sock.kind})")
        await self._traffic([(svc, sock)] * count, tag)

    async def op_spread(self) -> None:
        """One request to every socket of every service at once."""
        targets = self._targets()
        self.step(f"one request to each of {len(targets)} sockets")
        await self._traffic(targets, f"a{len(self.steps) + 1}")

    async def _traffic(self, targets: list[tuple[Svc, Sock]], tag: str) -> None:
        before = (await self.status())["services"]
        results: list[tuple[Svc, Sock, bytes, Seen, dict[str, Any]]] = []
        async with trio.open_nursery() as nursery:
            for i, (svc, sock) in enumerate(targets):
                nursery.start_soon(self._request, svc, sock, f"{tag}-{i}",
                                   before.get(svc.name, {}), results)
        after = (await self.status())["services"]
        self.figures.requests += len(results)
        outcomes = sorted(f"{s.name}.{k.key}:{seen.kind}" for s, k, _, seen, _ in results)
        self.steps[-1] += f" -> {' '.join(outcomes)}"
        for svc, sock, line, seen, was in results:
            self.judge(svc, sock, line, seen, was, after.get(svc.name, {}))
        # `requires`: a service that traffic started started what it requires.
        for svc, _, _, seen, was in results:
            if seen.kind != "answer" or was.get("state") != "idle":
                continue
            for name in svc.requires:
                dep_before, dep_after = before.get(name, {}), after.get(name, {})
                # A dependency at its start limit is not started: it goes to
                # `failed` instead (its start limit counts every start).
                if (dep_before.get("state") == "idle"
                        and dep_after.get("state") != "failed"
                        and dep_after.get("activations") == dep_before.get("activations")):
                    raise Violation(f"{svc.name} started, but not {name}, which it requires")

    async def op_removed(self) -> None:
        """Clients of sockets a reload just closed: refused or closed at once."""
        gone = self.removed[-4:]
        self.step(f"requests to removed sockets of {[s.name for s in gone]}")
        for svc in gone:
            for sock in svc.sockets:
                if sock.stream and not any(sock.listen() == s.listen()
                                           for _, s in self._targets()):
                    line = f"gone-{len(self.steps)}\n".encode()
                    # Its process may still be stopping (stop_timeout) and answer.
                    seen = await stream_request(sock, line, STOP_TIMEOUT + SLACK)
                    self.steps[-1] += f" {svc.name}.{sock.key}:{seen.kind}"
                    if seen.kind == "hang":
                        raise Violation(f"a removed socket left its client hanging: "
                                        f"{svc.name} {sock.listen()}: {seen}")
                    if seen.kind == "answer" and not _correct(svc.name, line, seen.data):
                        raise Violation(f"wrong answer from a removed socket: {seen}")
        self.removed.clear()

    async def op_open_long(self) -> None:
        choices = [(svc, sock) for svc, sock in self._targets(stream=True)
                   if svc.behavior == "ok"]
        if not choices or len(self.longs) >= 6:
            self.step("open a long-lived connection: none to open")
            return
        svc, sock = self.rng.choice(choices)
        self.step(f"open a long-lived connection to {svc.name}.{sock.key} ({sock.kind})")
        before = (await self.status())["services"].get(svc.name, {})
        line = f"long-{len(self.steps)}-0\n".encode()
        began = trio.current_time()
        stream: trio.SocketStream | None = None
        seen = Seen("hang")
        with trio.move_on_after(svc.answer_bound()):
            try:
                stream = await _open_stream(sock)
                await stream.send_all(line)
                seen = Seen("answer", await _read_line(stream), trio.current_time() - began)
            except OSError:
                seen = Seen("refused", after=trio.current_time() - began)
            except (EOFError, trio.BrokenResourceError):
                seen = Seen("closed", after=trio.current_time() - began)
        self.steps[-1] += f" -> {seen.kind}"
        after = (await self.status())["services"].get(svc.name, {})
        if seen.kind == "answer" and _correct(svc.name, line, seen.data):
            assert stream is not None
            self.longs.append(Long(svc.name, sock, stream, svc.epoch, len(self.steps)))
            return
        if stream is not None:
            await stream.aclose()
        self.judge(svc, sock, line, seen, before, after)

    async def op_use_longs(self) -> None:
        self.step(f"one line on each of {len(self.longs)} long-lived connections")
        for long in list(self.longs):
            svc = self.services.get(long.svc)
            intact = (svc is not None and svc.epoch == long.epoch
                      and long.sock in svc.sockets)
            long.exchanges += 1
            line = f"long-{long.number}-{long.exchanges}\n".encode()
            seen = Seen("hang")
            began = trio.current_time()
            with trio.move_on_after(STOP_TIMEOUT + SLACK):
                try:
                    await long.stream.send_all(line)
                    seen = Seen("answer", await _read_line(long.stream))
                except (EOFError, trio.BrokenResourceError, OSError):
                    seen = Seen("closed")
            seen.after = trio.current_time() - began
            self.steps[-1] += f" {long.svc}#{long.number}:{seen.kind}"
            if seen.kind == "answer" and _correct(long.svc, line, seen.data):
                continue
            self.longs.remove(long)
            await long.stream.aclose()
            if seen.kind == "answer":
                raise Violation(f"wrong answer on a long-lived connection: {seen}")
            if seen.kind == "hang":
                raise Violation(f"a long-lived connection to {long.svc} was left hanging "
                                f"(neither answered nor closed): {seen}")
            if intact:
                raise Violation(f"a long-lived connection to {long.svc} broke though nothing "
                                f"happened to the service: {seen}")

    async def op_kill(self) -> None:
        reply = await self.status()
        running = [(n, s["pid"]) for n, s in reply["services"].items() if s.get("pid")]
        if not running:
            self.step("SIGKILL a service: none runs")
            return
        name, pid = self.rng.choice(running)
        self.step(f"SIGKILL {name} (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.services[name].epoch += 1
        self.services[name].killed_at = len(self.steps)

    async def op_wait(self) -> None:
        seconds = self.rng.choice([0.2, 0.5, 1.0, 2.0])
        self.step(f"wait {seconds:g} s")
        await trio.sleep(seconds)

    def choose(self) -> tuple[str, Callable[[], Any]]:
        mutable = [s for s in self.services.values() if not s.fixed]
        ops: list[tuple[str, float, Callable[[], Any]]] = [
            ("add", 3 if len(mutable) < MAX_SERVICES else 0, self.op_add),
            ("remove", 1.5 if mutable else 0, self.op_remove),
            ("change", 2 if mutable else 0, self.op_change),
            ("bad config", 1, self.op_bad_config),
            ("burst", 4, self.op_burst),
            ("spread", 1.5, self.op_spread),
            ("removed", 3 if self.removed else 0, self.op_removed),
            ("open long", 1.5, self.op_open_long),
            ("use longs", 2 if self.longs else 0, self.op_use_longs),
            ("kill", 1.5, self.op_kill),
            ("wait", 1, self.op_wait),
        ]
        names = [o[0] for o in ops]
        weights = [o[1] for o in ops]
        index = self.rng.choices(range(len(ops)), weights)[0]
        return names[index], ops[index][2]

    # -- start and end ------------------------------------------------------------

    def anchor(self) -> Svc:
        """The one service that is always there: pass mode, exits when idle; in a
        kernel walk, a proxy on the kernel path, stopped when idle (a service
        wanting the kernel path at start-up is what has lazyd set it up)."""
        sock = self._sock("k0", "tcp", "anchor")
        if self.kernel:
            return Svc(name="anchor", serial=0, mode="proxy", behavior="ok", ready="connect",
                       restart="no", start_limit=100, interval=2.0, idle=0.3, delay=0.0,
                       user="root", requires=[], sockets=[sock], fixed=True,
                       datapath="kernel")
        return Svc(name="anchor", serial=0, mode="pass", behavior="ok", ready="started",
                   restart="no", start_limit=100, interval=2.0, idle=0.3, delay=0.0,
                   user="root", requires=[], sockets=[sock], fixed=True)

    async def quiet(self) -> Snapshot:
        """Wait until every service is idle and nothing the walk started runs;
        lazyd's fds and tasks then (read until two readings agree)."""
        assert self.lz is not None
        pid = self.lz.process.pid
        with trio.move_on_after(STEADY_TIMEOUT):
            while True:
                reply = await self.status()
                busy = [n for n, s in reply["services"].items()
                        if s["state"] != "idle" or s["pid"]]
                if not busy and not _processes(self.mark, -1):
                    break
                await trio.sleep(0.1)
        # Three readings in a row that agree. The fds are read well after the
        # last status request, whose connection lazyd closes just after its answer.
        readings: list[Snapshot] = []
        with trio.move_on_after(STEADY_TIMEOUT):
            while len(readings) < 3 or readings[-3] != readings[-1] \
                    or readings[-2] != readings[-1]:
                await trio.sleep(0.3)
                fds = _fd_kinds(pid)
                readings.append(Snapshot(fds, int((await self.status())["tasks"])))
        return readings[-1]

    async def run(self) -> None:
        anchor = self.anchor()
        self.services = {"anchor": anchor}
        self.socks_dir.mkdir()
        # lazyd, once it has dropped root, binds new Unix sockets here on a
        # reload; as root it accepts only a directory others cannot rename
        # files in: root's and sticky, as /tmp is.
        self.socks_dir.chmod(0o1777)
        async with run_lazyd(self.tmp, render(self.services, self.mark)) as lz:
            self.lz = lz
            self.header = self.config_path.read_text().splitlines()[0]
            try:
                await self._walk(anchor)
            except Violation as exc:
                # A daemon that is dying may still be writing its traceback.
                with trio.move_on_after(2):
                    await lz.process.wait()
                    await trio.sleep(0.2)
                (self.tmp / "lazyd.log").write_text("\n".join(lz.lines) + "\n")
                raise Violation(self.report(str(exc))) from None
            finally:
                for long in self.longs:
                    await long.stream.aclose()
                self.blocker.close()

    async def _walk(self, anchor: Svc) -> None:
        assert self.lz is not None
        # The reference state: the anchor alone, used once, idle again; with
        # the paths a walk takes lazily (reloads good and bad) taken once.
        await self.op_warmup(anchor)
        first = await self.quiet()
        self.step(f"reference: {first.total} fds, {first.tasks} tasks")
        for _ in range(self.total_steps):
            name, op = self.choose()
            self._count(name)
            self.figures.steps += 1
            began = trio.current_time()
            await op()
            await self.check()
            self.steps[-1] += f" [{trio.current_time() - began:.1f} s]"
        # Back to the reference state.
        for long in self.longs:
            await long.stream.aclose()
        self.longs.clear()
        self.removed += [s for s in self.services.values() if not s.fixed]
        self.services = {"anchor": anchor}
        self.step("back to the anchor alone (cli)")
        await self.apply("cli")
        await self.check()
        last = await self.quiet()
        self.step(f"at the end: {last.total} fds, {last.tasks} tasks")
        if last.fds != first.fds or last.tasks != first.tasks:
            grown = {k: last.fds.get(k, 0) - first.fds.get(k, 0)
                     for k in set(first.fds) | set(last.fds)
                     if last.fds.get(k, 0) != first.fds.get(k, 0)}
            raise Violation(f"lazyd holds more than in the same state at the start: "
                            f"fds {first.total} -> {last.total} {grown}, "
                            f"tasks {first.tasks} -> {last.tasks}")
        self.step("SIGTERM")
        rc = await self.lz.stop()
        if rc != 0:
            raise Violation(f"lazyd exited {rc} on SIGTERM")
        # What stops last (the spawner's children) may take a moment to go.
        with trio.move_on_after(5):
            while _processes(self.mark, self.lz.process.pid):
                await trio.sleep(0.05)
        left = _processes(self.mark, self.lz.process.pid)
        if left:
            raise Violation(f"processes left after SIGTERM: {left}")
        self.check_log()
        self.figures.kernel_walks += self.kernel
        self.figures.steered_starts += sum(": kernel data path: new connections to " in line
                                           for line in self.lz_lines())
        if os.environ.get("CHAOS_VERBOSE"):
            print("\n".join(self.steps), file=sys.stderr)

    async def op_warmup(self, anchor: Svc) -> None:
        sock = anchor.sockets[0]
        seen = await stream_request(sock, b"warm-up\n", anchor.answer_bound())
        if seen.kind != "answer" or not _correct("anchor", b"warm-up\n", seen.data):
            raise Violation(f"the anchor did not answer: {seen}")
        await self.apply("sighup")
        self.write(render(self.services, self.mark, {"anchor": ["    comand: x"]}))
        if await self.reload("sighup"):
            raise Violation("a config with an error was taken")
        self.write(render(self.services, self.mark))
        self.step("warm-up: one request to the anchor, a reload, a bad one")

    def report(self, what: str) -> str:
        replay = f"CHAOS_SEED={self.seed} CHAOS_STEPS={self.total_steps} make chaos"
        tail = self.lz_lines()[-60:] if self.lz is not None else []
        return (f"chaos walk, seed {self.seed}: {what}\n"
                f"replay: {replay}\n"
                "steps:\n" + "\n".join(self.steps) + "\n"
                "lazyd's log (last 60 lines):\n" + "\n".join(tail))


async def walk(seed: int, steps: int, figures: Figures | None = None) -> None:
    """One walk, in a directory of its own that `nobody` can reach: pytest's own
    (/tmp/pytest-of-root) is set back to mode 0700 by any pytest starting
    meanwhile, and lazyd reads its config as nobody on every reload."""
    figures = figures if figures is not None else Figures()
    figures.walks += 1
    work = Path(tempfile.mkdtemp(prefix=f"lazyd-chaos-{seed}-"))
    work.chmod(0o755)
    try:
        await Walk(seed, steps, work, figures).run()
    except* Violation as found:
        # Raised inside run_lazyd's nursery: one Violation, in a group.
        text = "\n".join(str(exc) for exc in found.exceptions)
        # Kept with the walk's files too: a long run's output may be cut short.
        (work / "failure.txt").write_text(text + "\n")
        raise Violation(f"{text}\n(the walk's files are in {work})") from None
    shutil.rmtree(work, ignore_errors=True)


# --- The suite's walks -----------------------------------------------------------


@pytest.mark.parametrize("seed", SUITE_SEEDS)
async def test_a_random_walk_keeps_every_promise(seed: int) -> None:
    """A fixed seed's walk of reloads, bad configs, traffic and kills: lazyd stays up,
    answers status, answers or refuses every client as the model allows, logs no
    traceback, ends with the fds and tasks it started with and exits 0 on SIGTERM."""
    await walk(seed, SUITE_STEPS)


@pytest.mark.skipif(
    not (os.environ.get("CHAOS_SECONDS") or os.environ.get("CHAOS_SEED")),
    reason="the long walk runs with `make chaos` (CHAOS_SECONDS, CHAOS_SEED)",
)
async def test_chaos_for_a_while() -> None:
    """Seed after seed for CHAOS_SECONDS (or the one CHAOS_SEED): no walk finds a broken
    promise."""
    figures = Figures()
    steps = int(os.environ.get("CHAOS_STEPS") or LONG_STEPS)
    if os.environ.get("CHAOS_SEED"):
        seeds: Any = [int(os.environ["CHAOS_SEED"])]
        seconds = float("inf")
    else:
        seconds = float(os.environ.get("CHAOS_SECONDS") or 600)
        first = int(time.time())
        seeds = (first + i for i in range(1_000_000))
    began = time.monotonic()
    for seed in seeds:
        if time.monotonic() - began >= seconds:
            break
        try:
            await walk(seed, steps, figures)
        except Violation as exc:
            figures.failures.append(str(exc))
            print(f"\n{exc}\n", file=sys.stderr, flush=True)
        print(f"chaos: seed {seed} done; {figures.walks} walks, {figures.steps} steps, "
              f"{len(figures.failures)} failed", file=sys.stderr, flush=True)
    ops = ", ".join(f"{k} {v}" for k, v in sorted(figures.operations.items()))
    print(f"\nchaos: {time.monotonic() - began:.0f} s, {figures.walks} walks, "
          f"{figures.steps} steps, {figures.requests} client requests; "
          f"{figures.kernel_walks} walks on the kernel data path, "
          f"{figures.steered_starts} starts steered; operations: {ops}; "
          f"{len(figures.failures)} walks failed", file=sys.stderr)
    for failure in figures.failures:
        print("chaos: failed: " + failure.splitlines()[0], file=sys.stderr)
    assert not figures.failures, "\n\n".join(figures.failures)


# --- Sequences the walk found, kept as they are ----------------------------------


@pytest.fixture
def work() -> Any:
    """A directory nobody can reach (see walk()), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="lazyd-chaos-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _service(name: str, mode: str, sock: str, *args: str, extra: tuple[str, ...] = ()) -> str:
    command = program("chaos_service.py", name, "regression", *args)
    lines = [f"  {name}:", f"    command: {command}", f"    mode: {mode}", "    user: root",
             *(f"    {e}" for e in extra), "    sockets:", f"      main: {sock}"]
    return "\n".join(lines) + "\n"


async def _sighup(lz: LazydProcess, work: Path, services: str, count: int) -> None:
    config = work / "lazyd.yaml"
    header = config.read_text().splitlines()[0]
    config.write_text(f"{header}\nservices:\n{services}")
    lz.process.send_signal(signal.SIGHUP)
    await lz.wait_line(r"^lazyd: reloaded ", count=count)


async def _still_serving(lz: LazydProcess, sock: Sock, name: str) -> None:
    """lazyd lives on after the reload: status answers, the service left answers."""
    await trio.sleep(0.5)  # what would kill lazyd happens right after the reload
    assert lz.process.returncode is None, lz.log()
    assert set(await lz.status()) == {name}
    seen = await stream_request(sock, b"after\n", OK_START_TIMEOUT)
    assert seen.kind == "answer" and _correct(name, b"after\n", seen.data), (seen, lz.log())
    assert not TRACEBACK.search(lz.log()), lz.log()


async def test_removing_one_of_two_started_pass_services_keeps_lazyd_running(
        work: Path) -> None:
    """Two pass-mode services, each started once by a connection; a SIGHUP that removes
    one stops it, and lazyd goes on serving the other (found by seed 1)."""
    keep, gone = Sock("main", "tcp", port=free_port()), Sock("main", "tcp", port=free_port())
    services = {name: _service(name, "pass", f"'{s.listen()}'", "--listen", "fds")
                for name, s in (("keep", keep), ("gone", gone))}
    async with run_lazyd(work, "services:\n" + "".join(services.values())) as lz:
        for name, sock in (("keep", keep), ("gone", gone)):
            seen = await stream_request(sock, b"hi\n", OK_START_TIMEOUT)
            assert seen.kind == "answer" and _correct(name, b"hi\n", seen.data), seen
        await _sighup(lz, work, services["keep"], count=1)
        await lz.wait_line(r"^gone: stopped \(removed by reload\)")
        await _still_serving(lz, keep, "keep")


async def test_removing_an_idle_proxy_service_keeps_lazyd_running(work: Path) -> None:
    """A proxy-mode service that ran once and was stopped by its idle_timeout; a SIGHUP
    that removes it leaves lazyd serving the other service (found by seed 2)."""
    keep = Sock("main", "tcp", port=free_port())
    gone = Sock("main", "tcp", port=free_port(), up_port=free_port())
    proxy = (f"{{listen: '{gone.listen()}', upstream: '{gone.upstream()}'}}")
    services = {
        "keep": _service("keep", "pass", f"'{keep.listen()}'", "--listen", "fds"),
        "gone": _service("gone", "proxy", proxy, "--listen", gone.service_arg(),
                         extra=("idle_timeout: 300ms",)),
    }
    async with run_lazyd(work, "services:\n" + "".join(services.values())) as lz:
        seen = await stream_request(gone, b"hi\n", OK_START_TIMEOUT)
        assert seen.kind == "answer" and _correct("gone", b"hi\n", seen.data), seen
        await lz.wait_line(r"^gone: stopped \(idle\)")
        await _sighup(lz, work, services["keep"], count=1)
        await _still_serving(lz, keep, "keep")


async def test_a_failed_proxy_service_refuses_new_connections_at_once(work: Path) -> None:
    """A proxy service whose command exits at once, restart: on-failure, start_limit 2
    within 30 s: once `failed`, a new client is refused or closed at once, not held
    (found by seed 3)."""
    sock = Sock("main", "tcp", port=free_port(), up_port=free_port())
    proxy = (f"{{listen: '{sock.listen()}', upstream: '{sock.upstream()}'}}")
    config = "services:\n" + _service(
        "crashy", "proxy", proxy, "--listen", sock.service_arg(), "--crash",
        extra=("restart: on-failure", "start_limit: 2", "start_limit_interval: 30s"))
    async with run_lazyd(work, config) as lz:
        first = await stream_request(sock, b"first\n", OK_START_TIMEOUT)
        assert first.kind == "closed", first  # its start failed: closed, not held
        await lz.wait_state("crashy", "failed")
        seen = await stream_request(sock, b"second\n", AT_ONCE + SLACK)
        assert seen.kind in ("refused", "closed") and seen.after < AT_ONCE, seen
        assert (await lz.status())["crashy"]["state"] == "failed"
