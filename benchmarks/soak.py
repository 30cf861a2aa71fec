"""Soak: lazyd under continuous mixed traffic, checked for losses and for growth.

    python -m benchmarks.soak [--duration SECONDS]      (default 600)

One `python -m lazyd run` holds four services, all backed by
benchmarks/programs/soak_backend.py (it answers "ok LINE" per line and
"ok DATA" per datagram, and says READY=1 once it listens):

- `web`: proxy mode, TCP, ready by notify; stays up;
- `dns`: proxy mode, UDP, ready by notify; stays up;
- `plain`: pass mode, TCP; the service exits after 1 s without a new
  connection, so lazyd takes the socket back and the next client starts it again;
- `lazy`: proxy mode, TCP, `idle_timeout: 1s`, so it is stopped and started
  again over and over.

The last two say `start_limit: 1000`: every start counts towards the limit,
also one after an idle stop, and the default (5 within 10 s) would put them
in `failed` for 10 s, which is lazyd working as configured, not a loss.

Traffic, all at once, for the whole duration:

- 4 request loops: connect (to `web` mostly, `plain` otherwise), send 1-5 lines
  of 16-2000 bytes, check each answer byte for byte, close;
- 2 UDP clients, each with one datagram in flight at a time, answers checked;
- 3 long-lived connections to `web`, opened at the start, one exchange every
  0.5 s: they must live through every reload;
- one client of `lazy` every 1.5-2.5 s (longer than its idle_timeout);
- a reload every 15 s (every duration/4 when shorter), SIGHUP and `reload` on
  the control socket in turn, each toggling `lazy`'s stop_timeout so the reload
  changes something.

After a warm-up (a tenth of the duration, 2 s to 30 s) and again at the end,
traffic pauses until lazyd is in the same state both times (`plain` and
`lazy` idle, only the 3 long-lived connections open on `web`), and lazyd's
open fds (/proc/PID/fd), resident memory (VmRSS) and trio task count (the
`tasks` of `status`) are read. Between the two, with the same things open,
fds and tasks must not grow at all: a leaked fd or task per connection or
per start would show as hundreds. RSS may grow by at most 4 MiB: CPython
keeps freed memory in its arenas and the allocator does not return every
page, so a few hundred KiB come and go with the moment of the reading
(+0.2 MiB in a clean 60 s run). A 2-core machine carries about 1,600
requests (lines) a second here, nearly a million in the default 600 s, so a
leak of even 10 bytes per request would pass 4 MiB.

The report is Markdown on stdout (progress on stderr). The exit status is 1
if any request or datagram went unanswered or was answered wrongly, a
long-lived connection broke, a reload failed, lazyd logged a traceback or an
error, fds or tasks grew, RSS grew past the limit, or lazyd did not exit 0 on
SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from lazyd.errors import ControlError
from lazyd.runtime import control

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "benchmarks" / "programs" / "soak_backend.py"
PY = sys.executable
# The services' interpreter. lazyd drops to `nobody` after binding and checks a
# reloaded config as that user, so the command must be reachable by nobody: a
# Python under /root (pyenv) is not. The backend needs only the standard library.
SERVICE_PY = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or PY
HOST = "127.0.0.1"

DEFAULT_DURATION = 600.0
REQUEST_LOOPS = 4
UDP_CLIENTS = 2
LONG_LIVED = 3
LONG_LIVED_EVERY = 0.5
LAZY_IDLE = 1.0  # lazy's idle_timeout, seconds
PLAIN_IDLE = 1.0  # how long plain's service waits for a connection before it exits
RELOAD_EVERY = 15.0
ANSWER_TIMEOUT = 10.0  # no answer by then: the request counts as lost
QUIESCE_TIMEOUT = 30.0
RSS_LIMIT_KB = 4096
# Lines lazyd must never log during a soak (the services print nothing).
PROBLEM = re.compile(
    r"Traceback|Error|failed|dropped \d|timed out|refus|closed \d+ held|ignoring"
)


@dataclass
class Counters:
    """What the traffic did."""

    requests_sent: int = 0
    requests_answered: int = 0
    requests_wrong: int = 0
    datagrams_sent: int = 0
    datagrams_answered: int = 0
    datagrams_wrong: int = 0
    long_lived_exchanges: int = 0
    reloads: int = 0
    reloads_failed: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.errors) < 1000:
            self.errors.append(text)
        print(f"soak: {text}", file=sys.stderr)


@dataclass(frozen=True)
class Snapshot:
    """lazyd's figures at one quiet moment."""

    fds: int
    fd_kinds: dict[str, int]  # "socket", "pipe", "anon_inode:[eventpoll]", a path: how many
    rss_kb: int
    tasks: int
    activations: dict[str, int]


class Pause:
    """Lets the traffic loops be stopped between operations and counts those in flight."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.open.set()
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    async def enter(self) -> None:
        await self.open.wait()
        self.in_flight += 1
        self._idle = trio.Event() if self.in_flight == 1 else self._idle

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def close(self) -> None:
        """Stop new operations and wait for the ones in flight to end."""
        self.open = trio.Event()
        await self._idle.wait()

    def reopen(self) -> None:
        self.open.set()


def _config(ports: dict[str, int], control_path: Path, lazy_stop_timeout: int) -> str:
    backend = f"[{SERVICE_PY}, {BACKEND}"
    return f"""\
control: unix:{control_path}
services:
  web:
    mode: proxy
    command: {backend}, "tcp:{HOST}:{ports['web_up']}"]
    user: root
    ready: notify
    sockets:
      main: {{listen: "tcp://{HOST}:{ports['web']}", upstream: "tcp://{HOST}:{ports['web_up']}"}}
  dns:
    mode: proxy
    command: {backend}, "udp:{HOST}:{ports['dns_up']}"]
    user: root
    ready: notify
    sockets:
      main: {{listen: "udp://{HOST}:{ports['dns']}", upstream: "udp://{HOST}:{ports['dns_up']}"}}
  plain:
    command: {backend}, fd3, "{PLAIN_IDLE}"]
    user: root
    start_limit: 1000
    sockets:
      main: "tcp://{HOST}:{ports['plain']}"
  lazy:
    mode: proxy
    command: {backend}, "tcp:{HOST}:{ports['lazy_up']}"]
    user: root
    ready: notify
    idle_timeout: {LAZY_IDLE}s
    stop_timeout: {lazy_stop_timeout}s
    start_limit: 1000
    sockets:
      main: {{listen: "tcp://{HOST}:{ports['lazy']}", upstream: "tcp://{HOST}:{ports['lazy_up']}"}}
"""


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _fd_kinds(pid: int) -> dict[str, int]:
    """lazyd's open fds by what they are, so that a growth can be told apart."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        kind = re.sub(r":\[\d+\]$", "", target)
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Lazyd:
    """The daemon under test, its stderr collected line by line."""

    def __init__(self, process: trio.Process, control_path: str) -> None:
        self.process = process
        self.control_path = control_path
        self.lines: list[str] = []
        self.new_line = trio.Event()

    async def collect(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            *complete, buffer = (buffer + chunk).split(b"\n")
            self.lines.extend(raw.decode(errors="replace") for raw in complete)
            self.new_line.set()
            self.new_line = trio.Event()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self.new_line.set()

    async def wait_line(self, pattern: str, count: int = 1, timeout: float = 30.0) -> None:
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while sum(1 for line in self.lines if regex.search(line)) < count:
                if self.process.returncode is not None:
                    raise RuntimeError("lazyd exited:\n" + "\n".join(self.lines[-20:]))
                await self.new_line.wait()

    async def request(self, command: str) -> dict[str, Any]:
        return await trio.to_thread.run_sync(control.request, self.control_path, command)

    def problems(self) -> list[str]:
        """Lines of lazyd's own that show something went wrong."""
        return [line for line in self.lines if PROBLEM.search(line)]


class Soak:
    def __init__(self, lazyd: Lazyd, ports: dict[str, int], config_path: Path,
                 control_path: Path) -> None:
        self.lazyd = lazyd
        self.ports = ports
        self.config_path = config_path
        self.control_path = control_path
        self.counters = Counters()
        self.pause = Pause()
        self.long_lived_open = 0
        self.peak_fds = 0
        self.peak_rss_kb = 0
        self.rng = random.Random(1)

    # -- traffic ---------------------------------------------------------------

    async def _exchange(self, stream: trio.SocketStream, line: bytes) -> bool:
        """Send one line, read its answer; False (and counted) if it is wrong."""
        await stream.send_all(line)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            answer += chunk
        if answer != b"ok " + line:
            self.counters.requests_wrong += 1
            self.counters.error(f"wrong answer: sent {line[:40]!r}, got {answer[:60]!r}")
            return False
        return True

    async def _one_request(self, port: int, tag: str) -> None:
        lines = [
            f"{tag} {self.rng.randbytes(self.rng.randint(8, 1000)).hex()}\n".encode()
            for _ in range(self.rng.randint(1, 5))
        ]
        await self.pause.enter()
        try:
            with trio.fail_after(ANSWER_TIMEOUT):
                stream = await trio.open_tcp_stream(HOST, port)
                async with stream:
                    for line in lines:
                        self.counters.requests_sent += 1
                        if not await self._exchange(stream, line):
                            return
                        self.counters.requests_answered += 1
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.counters.error(f"{tag}: {exc!r}")
        finally:
            self.pause.leave()

    async def request_loop(self, index: int) -> None:
        for n in range(1_000_000_000):
            service = "web" if self.rng.random() < 0.75 else "plain"
            await self._one_request(self.ports[service], f"{service}-{index}-{n}")
            await trio.sleep(self.rng.uniform(0, 0.01))

    async def lazy_loop(self) -> None:
        for n in range(1_000_000_000):
            await self._one_request(self.ports["lazy"], f"lazy-{n}")
            await trio.sleep(self.rng.uniform(1.5, 2.5) * LAZY_IDLE)

    async def udp_loop(self, index: int) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind((HOST, 0))
            await sock.connect((HOST, self.ports["dns"]))
            for n in range(1_000_000_000):
                data = f"dg-{index}-{n} ".encode() + self.rng.randbytes(self.rng.randint(1, 1200))
                await self.pause.enter()
                try:
                    self.counters.datagrams_sent += 1
                    await sock.send(data)
                    with trio.fail_after(ANSWER_TIMEOUT):
                        answer = await sock.recv(65536)
                    if answer == b"ok " + data:
                        self.counters.datagrams_answered += 1
                    else:
                        self.counters.datagrams_wrong += 1
                        self.counters.error(f"wrong datagram answer to {data[:20]!r}")
                except trio.TooSlowError:
                    self.counters.error(f"datagram dg-{index}-{n} unanswered")
                    # A late answer would be taken for the next one's: start afresh.
                    return await self.udp_loop(index + UDP_CLIENTS)
                except OSError as exc:
                    self.counters.error(f"datagram dg-{index}-{n}: {exc!r}")
                finally:
                    self.pause.leave()
                await trio.sleep(self.rng.uniform(0, 0.005))

    async def long_lived(self, index: int, task_status: trio.TaskStatus[None]) -> None:
        stream = await trio.open_tcp_stream(HOST, self.ports["web"])
        async with stream:
            await stream.send_all(b"hello\n")
            with trio.fail_after(ANSWER_TIMEOUT):
                assert await stream.receive_some(100) == b"ok hello\n"
            self.long_lived_open += 1
            task_status.started()
            try:
                for n in range(1_000_000_000):
                    await trio.sleep(LONG_LIVED_EVERY)
                    await self.pause.enter()
                    try:
                        self.counters.requests_sent += 1
                        with trio.fail_after(ANSWER_TIMEOUT):
                            if not await self._exchange(stream, f"long-{index}-{n}\n".encode()):
                                return
                        self.counters.requests_answered += 1
                        self.counters.long_lived_exchanges += 1
                    finally:
                        self.pause.leave()
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                self.counters.error(f"long-lived connection {index} broke: {exc!r}")
            finally:
                self.long_lived_open -= 1

    async def reload_loop(self, every: float) -> None:
        stop_timeout = 5
        for n in range(1_000_000_000):
            await trio.sleep(every)
            stop_timeout = 11 - stop_timeout  # 5 <-> 6: `lazy` changes
            self.config_path.write_text(_config(self.ports, self.control_path, stop_timeout))
            reloaded = sum(1 for line in self.lazyd.lines if "lazyd: reloaded" in line)
            # Not while a snapshot is taken: a reload runs tasks of its own for a moment.
            await self.pause.enter()
            try:
                if n % 2 == 0:
                    self.lazyd.process.send_signal(signal.SIGHUP)
                    await self.lazyd.wait_line(r"^lazyd: reloaded ", count=reloaded + 1)
                else:
                    await self.lazyd.request("reload")
                self.counters.reloads += 1
            except (ControlError, trio.TooSlowError, RuntimeError) as exc:
                self.counters.reloads_failed += 1
                said = [line for line in self.lazyd.lines if "reload" in line][-3:]
                self.counters.error(f"reload {n + 1} failed: {exc!r}; lazyd said: {said}")
            finally:
                self.pause.leave()

    # -- measuring -------------------------------------------------------------

    async def watch_peaks(self) -> None:
        """Once a second, lazyd's fds and RSS while the traffic runs: the peaks."""
        pid = self.lazyd.process.pid
        while True:
            with contextlib.suppress(OSError):
                self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{pid}/fd")))
                self.peak_rss_kb = max(self.peak_rss_kb, _rss_kb(pid))
            await trio.sleep(1)

    async def quiet_snapshot(self, *, resume: bool = True) -> Snapshot:
        """Pause traffic until lazyd is in its reference state, read it, and
        resume the traffic (or leave it paused, at the end)."""
        await self.pause.close()
        try:
            with trio.fail_after(QUIESCE_TIMEOUT):
                while True:
                    services = (await self.lazyd.request("status"))["services"]
                    if (services["lazy"]["state"] == "idle"
                            and services["plain"]["state"] == "idle"
                            and services["web"]["active"] == self.long_lived_open
                            and services["web"]["queued"] == 0):
                        break
                    await trio.sleep(0.1)
                # A service that has just exited may leave its output pipe open
                # for a moment longer: read until two readings agree.
                pid = self.lazyd.process.pid
                kinds = _fd_kinds(pid)
                while True:
                    await trio.sleep(0.2)
                    kinds, previous = _fd_kinds(pid), kinds
                    if kinds == previous:
                        break
            status = await self.lazyd.request("status")
            return Snapshot(
                fds=sum(kinds.values()),
                fd_kinds=kinds,
                rss_kb=_rss_kb(pid),
                tasks=int(status["tasks"]),
                activations={name: svc["activations"] for name, svc in status["services"].items()},
            )
        finally:
            if resume:
                self.pause.reopen()


async def _run(duration: float) -> tuple[Soak, Snapshot, Snapshot, int, float]:
    work = Path(tempfile.mkdtemp(prefix="lazyd-soak-"))
    ports = {name: _free_port(socket.SOCK_STREAM) for name in ("web", "web_up", "plain",
                                                               "lazy", "lazy_up")}
    ports |= {name: _free_port(socket.SOCK_DGRAM) for name in ("dns", "dns_up")}
    config_path, control_path = work / "lazyd.yaml", work / "control.sock"
    config_path.write_text(_config(ports, control_path, 5))
    # lazyd re-reads the file on reload after dropping privileges to `nobody`.
    work.chmod(0o755)
    process = await trio.lowlevel.open_process(
        [PY, "-m", "lazyd", "run", "-c", str(config_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
        start_new_session=True,
    )
    lazyd = Lazyd(process, str(control_path))
    soak = Soak(lazyd, ports, config_path, control_path)
    warmup = min(30.0, max(2.0, duration / 10))
    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(lazyd.collect)
            await lazyd.wait_line(r"^lazyd: holding \d+ sockets?")
            print(f"soak: lazyd pid {process.pid} holds its sockets; traffic for {duration:g} s",
                  file=sys.stderr)
            started = trio.current_time()
            async with trio.open_nursery() as traffic:
                for i in range(LONG_LIVED):
                    await traffic.start(soak.long_lived, i)
                for i in range(REQUEST_LOOPS):
                    traffic.start_soon(soak.request_loop, i)
                for i in range(UDP_CLIENTS):
                    traffic.start_soon(soak.udp_loop, i)
                traffic.start_soon(soak.lazy_loop)
                traffic.start_soon(soak.watch_peaks)
                traffic.start_soon(soak.reload_loop, min(RELOAD_EVERY, duration / 4))
                await trio.sleep(warmup)
                first = await soak.quiet_snapshot()
                print(f"soak: after warm-up: {first}", file=sys.stderr)
                await trio.sleep_until(started + duration)
                last = await soak.quiet_snapshot(resume=False)
                print(f"soak: at the end: {last}", file=sys.stderr)
                traffic.cancel_scope.cancel()
            elapsed = trio.current_time() - started
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                returncode = await process.wait()
            outer.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    return soak, first, last, returncode, elapsed


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB"


def report(soak: Soak, first: Snapshot, last: Snapshot, returncode: int,
           elapsed: float) -> list[str]:
    """Print the Markdown report; return what failed (empty: a clean soak)."""
    c = soak.counters
    problems = soak.lazyd.problems()
    failures = []
    if c.requests_answered != c.requests_sent or c.requests_wrong:
        failures.append(f"{c.requests_sent - c.requests_answered} requests unanswered, "
                        f"{c.requests_wrong} wrong")
    if c.datagrams_answered != c.datagrams_sent or c.datagrams_wrong:
        failures.append(f"{c.datagrams_sent - c.datagrams_answered} datagrams unanswered, "
                        f"{c.datagrams_wrong} wrong")
    if c.errors:
        failures.append(f"{len(c.errors)} client errors, first: {c.errors[0]}")
    if c.reloads_failed:
        failures.append(f"{c.reloads_failed} reloads failed")
    if problems:
        failures.append(f"lazyd logged {len(problems)} problem lines, first: {problems[0]}")
    if last.fds > first.fds:
        grown = {kind: last.fd_kinds[kind] - first.fd_kinds.get(kind, 0)
                 for kind in last.fd_kinds if last.fd_kinds[kind] > first.fd_kinds.get(kind, 0)}
        failures.append(f"fds grew by {last.fds - first.fds} ({grown})")
    if last.tasks > first.tasks:
        failures.append(f"trio tasks grew by {last.tasks - first.tasks}")
    if last.rss_kb - first.rss_kb > RSS_LIMIT_KB:
        failures.append(f"RSS grew by {_mb(last.rss_kb - first.rss_kb)}")
    if returncode != 0:
        failures.append(f"lazyd exited {returncode} on SIGTERM")

    def row(*cells: object) -> str:
        return "| " + " | ".join(str(cell) for cell in cells) + " |"

    activations = ", ".join(f"{name} {last.activations[name]}" for name in sorted(last.activations))
    lines = [
        f"## Soak: {elapsed:.0f} s of mixed traffic",
        "",
        row("lazyd", "after warm-up", "at the end", "growth", "allowed"),
        row("---", "---:", "---:", "---:", "---:"),
        row("open fds", first.fds, last.fds, f"{last.fds - first.fds:+d}", "+0"),
        row("RSS", _mb(first.rss_kb), _mb(last.rss_kb),
            f"{(last.rss_kb - first.rss_kb) / 1024:+.2f} MiB", f"+{_mb(RSS_LIMIT_KB)}"),
        row("trio tasks", first.tasks, last.tasks, f"{last.tasks - first.tasks:+d}", "+0"),
        "",
        f"With traffic running, sampled each second: at most {soak.peak_fds} fds and "
        f"{_mb(soak.peak_rss_kb)} RSS. The two readings above are taken with traffic paused "
        f"and the same things open ({LONG_LIVED} long-lived connections, `plain` and `lazy` "
        "stopped).",
        "",
        row("traffic", "sent", "answered", "wrong"),
        row("---", "---:", "---:", "---:"),
        row("requests (lines over TCP: proxy, pass, idle-stopped proxy)", c.requests_sent,
            c.requests_answered, c.requests_wrong),
        row(f"of which on {LONG_LIVED} long-lived connections", c.long_lived_exchanges,
            c.long_lived_exchanges, 0),
        row("datagrams (UDP proxy)", c.datagrams_sent, c.datagrams_answered, c.datagrams_wrong),
        "",
        row("events", "count"),
        row("---", "---:"),
        row("activations (whole run)", activations),
        row("activations after warm-up", sum(last.activations.values())
            - sum(first.activations.values())),
        row("reloads (SIGHUP and control `reload` in turn)", c.reloads),
        row("reloads failed", c.reloads_failed),
        row("client errors", len(c.errors)),
        row("lazyd problem lines (tracebacks, errors, drops)", len(problems)),
        row("lazyd exit status on SIGTERM", returncode),
        "",
        "Result: " + ("**clean**" if not failures else "**FAILED**: " + "; ".join(failures)),
    ]
    print("\n".join(lines))
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0] if __doc__ else "",
    )
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help=f"seconds of traffic (default {DEFAULT_DURATION:g})")
    args = parser.parse_args(argv)
    if args.duration < 4:
        parser.error("--duration must be at least 4 seconds")
    soak, first, last, returncode, elapsed = trio.run(_run, args.duration)
    failures = report(soak, first, last, returncode, elapsed)
    for failure in failures:
        print(f"soak: {failure}", file=sys.stderr)
    for line in soak.lazyd.problems()[:20]:
        print(f"soak: lazyd logged: {line}", file=sys.stderr)
    work = soak.config_path.parent
    if failures:
        log = work / "lazyd.log"
        log.write_text("\n".join(soak.lazyd.lines) + "\n")
        print(f"soak: lazyd's whole log is in {log}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
