"""Proxy mode, warm: lazyd against systemd-socket-proxyd and against no proxy.

Three paths to the same backend, measured with the same load generator,
interleaved in one run (the order rotates every round):

- direct: the client talks to the backend itself;
- systemd-socket-proxyd: started by systemd-socket-activate, which holds the
  listening socket and execs the proxy on the first connection;
- lazyd: one `lazyd run` with a proxy-mode service whose `command` only
  sleeps: the backend runs on its own, so `ready: connect` succeeds at once.
- lazyd (kernel): the same lazyd, a second service with `datapath: kernel`
  whose command is a second backend of the same configuration (the kernel
  path steers into the listener of a process lazyd started, so it cannot be
  the shared one): once it is ready and steered, new connections to lazyd's
  port go straight to that backend's socket.  Its ratio is to direct access
  to the first backend.

Two loads:

- small requests: nginx (one worker, a 3-byte `return 200`, keep-alive,
  access log off; its config is written to a temporary directory) under
  `wrk -t1 -c50 --latency`: requests per second and the 99th percentile.
- bulk: `iperf3 -s` as the backend, `iperf3 -c -J` through each path: GB/s
  received.  iperf3's control connection goes through the proxy as well.

Every path gets one warm-up request (for lazyd that is the cold start, which
is not what this benchmark is about) and one unrecorded short run first.  The
server side (backend and proxy) runs on CPU 0, the load generator on CPU 1
(sched_setaffinity, what taskset does).  Besides throughput, each row shows the
CPU time the proxy itself used per request (or per GB), read from /proc: it
tells how close to saturating its CPU each proxy is.  nginx, wrk and iperf3
are installed with apt-get when absent.

The figures come from one median per row over the rounds; ratios are of
medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = Path(__file__).resolve().parent / "programs"
HOST = "127.0.0.1"
PROXYD = "/lib/systemd/systemd-socket-proxyd"
ACTIVATE = "/usr/bin/systemd-socket-activate"
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVER_CPU, CLIENT_CPU = 0, 1
PINNED = {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
TIMEOUT = 15.0  # seconds for any one wait; a hang is a failure, not a figure
# lazyd / systemd-socket-proxyd: small requests, bulk
SMALL_TARGET, BULK_TARGET = 1.2, 1.05

TARGETS = ("direct", "proxyd", "lazyd", "kernel")
LABELS = {"direct": "direct", "proxyd": "systemd-socket-proxyd", "lazyd": "lazyd (proxy)",
          "kernel": "lazyd (kernel)"}
KERNEL_TARGET = 0.95  # lazyd (kernel) / direct, for both loads


def progress(text: str) -> None:
    """Progress goes to stderr; stdout is the report."""
    print(text, file=sys.stderr, flush=True)


def ensure_commands(needed: dict[str, Sequence[str]]) -> None:
    """Install (apt-get) a package for every command in `needed` that is missing:
    the first of its candidate Debian packages that apt can install."""
    missing = {cmd: pkgs for cmd, pkgs in needed.items() if find(cmd) is None}
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"missing {', '.join(missing)}, and no apt-get as root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    packages = [next((p for p in pkgs if installable(p)), pkgs[-1]) for pkgs in missing.values()]
    progress(f"installing {' '.join(packages)} with apt-get")
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    still = [cmd for cmd in needed if find(cmd) is None]
    if still:
        raise SystemExit(f"still missing after apt-get install: {', '.join(still)}")


def installable(package: str) -> bool:
    """Whether apt has a candidate version of the package (nginx-light left Debian 13)."""
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    match = re.search(r"Candidate:\s*(\S+)", out)
    return match is not None and match[1] != "(none)"


def find(command: str) -> str | None:
    """The command's path, looking in the sbin directories too."""
    return shutil.which(command, path=os.environ.get("PATH", "") + ":" + SEARCH_PATH)


def need(command: str) -> str:
    path = find(command)
    if path is None:
        raise SystemExit(f"{command} not found")
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_connectable(port: int, timeout: float = TIMEOUT) -> None:
    """Return once something accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:g} s")
        time.sleep(0.01)


def setup_child(cpu: int, nofile: int | None = None) -> Callable[[], None]:
    """A preexec_fn: pin the child to `cpu` (as taskset does); raise its fd limit
    towards `nofile` (the soft limit, up to the hard one)."""

    def setup() -> None:
        if PINNED:
            os.sched_setaffinity(0, {cpu})
        if nofile is not None:
            # Raising the hard limit needs CAP_SYS_RESOURCE: go as far as allowed.
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            soft = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return setup


class Started:
    """A process this benchmark started, with its output in a log file.

    It leads its own process group, so that stop() also ends what it started
    (systemd-socket-activate's shell and backend, nginx's worker)."""

    def __init__(self, argv: Sequence[str], log: Path, *, cpu: int = SERVER_CPU,
                 nofile: int | None = None, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT, env=env, preexec_fn=setup_child(cpu, nofile), start_new_session=True,
            )
        self.pid = self.process.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """Wait for a line of the log matching `pattern` (polled: the log is a file)."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            if match := regex.search(self.text()):
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[0]}: no line matched {pattern!r} "
                                   f"(exit status {self.process.returncode}); its output:\n"
                                   + self.text()[-4000:])
            time.sleep(0.005)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal it, wait, then SIGKILL whatever is left of its process group.
        Should it not stop by itself, every process below it is killed as well
        (lazyd's services lead process groups of their own)."""
        if self.process.poll() is None:
            below = descendants(self.pid)[1:]
            self.process.send_signal(sig)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                progress(f"{self.argv[0]} did not stop on {sig.name}: killing it")
                for pid in below:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()


@contextlib.contextmanager
def started(*args: object, stop_signal: signal.Signals = signal.SIGTERM,
            **kwargs: object) -> Iterator[Started]:
    """Started(...) as a context manager that always stops it."""
    proc = Started(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        proc.stop(stop_signal)


def lazyd_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "lazyd", "run", "-c", str(config)]


def lazyd_service(name: str, command: Sequence[str], sockets: str, *extra: str,
                  mode: str = "proxy") -> str:
    """One service of a lazyd config (YAML text)."""
    user = ["user: root"] if os.geteuid() == 0 else []
    lines = [f"  {name}:", f"    mode: {mode}",
             f"    command: [{', '.join(json.dumps(part) for part in command)}]",
             *(f"    {line}" for line in (*user, *extra)), "    sockets:", f"      {sockets}"]
    return "\n".join(lines) + "\n"


def proxy_socket(port: int, upstream: int) -> str:
    return f"main: {{listen: 'tcp://{HOST}:{port}', upstream: 'tcp://{HOST}:{upstream}'}}"


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(entry.path, "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def lazyd_processes(lazyd: Started) -> list[int]:
    """lazyd's own processes (the daemon and its privileged spawner, both this
    Python), not its services."""
    python = os.path.realpath(sys.executable)
    keep = []
    for pid in descendants(lazyd.pid):
        with contextlib.suppress(OSError):
            if os.path.realpath(f"/proc/{pid}/exe") == python:
                keep.append(pid)
    return keep


def peak_rss_mb(pids: Sequence[int]) -> float:
    """The largest peak resident set size (VmHWM) among the processes, in MB."""
    peak = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return peak / 1024


# -- loads ----------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float
    p99_ms: float
    requests: int
    errors: str  # wrk's error lines, empty when there were none


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def run_wrk(port: int, seconds: float) -> WrkResult:
    """wrk -t1 -c50 --latency on the client's CPU."""
    out = subprocess.run(
        [need("wrk"), "-t1", "-c50", f"-d{seconds:g}s", "--latency", f"http://{HOST}:{port}/"],
        capture_output=True, text=True, check=True, timeout=seconds + TIMEOUT,
        preexec_fn=setup_child(CLIENT_CPU),
    ).stdout
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", out, re.MULTILINE)
    if rps is None or p99 is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = "; ".join(line.strip() for line in out.splitlines()
                       if "Socket errors" in line or "Non-2xx" in line)
    return WrkResult(float(rps[1]), float(p99[1]) * _UNITS[p99[2]], int(total[1]), errors)


def run_iperf(port: int, seconds: float) -> tuple[float, float]:
    """iperf3 -c through `port` on the client's CPU: (GB/s received, GB received)."""
    proc = subprocess.run(
        [need("iperf3"), "-c", HOST, "-p", str(port), "-t", f"{seconds:g}", "-J"],
        capture_output=True, text=True, timeout=seconds + TIMEOUT,
        preexec_fn=setup_child(CLIENT_CPU),
    )
    try:
        received = json.loads(proc.stdout)["end"]["sum_received"]
    except (ValueError, KeyError) as exc:
        raise RuntimeError(
            f"iperf3 failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        ) from exc
    return received["bits_per_second"] / 8e9, received["bytes"] / 1e9


def http_get(port: int) -> None:
    """One request, checked: the warm-up (for lazyd, the cold start)."""
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"warm-up request through port {port} answered {answer[:80]!r}")


# -- the three paths ----------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # Measure forwarding, not reconnects: wrk keeps its 50 connections.
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/body;
    server {{
        listen {host}:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(tmp: Path, port: int) -> Iterator[Started]:
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, host=HOST, port=port))
    # -e: the error log from the very start (before the config is read).
    with started([need("nginx"), "-p", str(tmp), "-e", str(tmp / "nginx-error.log"),
                  "-c", str(conf)], tmp / "nginx.log", stop_signal=signal.SIGQUIT) as proc:
        wait_connectable(port)
        yield proc


@contextlib.contextmanager
def iperf_server(tmp: Path, port: int) -> Iterator[Started]:
    with started([need("iperf3"), "-s", "-B", HOST, "-p", str(port), "--forceflush"],
                 tmp / "iperf3.log") as proc:
        proc.wait_line(r"Server listening on")
        yield proc


@contextlib.contextmanager
def proxyd(tmp: Path, name: str, upstream: int) -> Iterator[tuple[int, Started]]:
    """systemd-socket-activate holding a port, to exec systemd-socket-proxyd on the
    first connection; yields (port, process)."""
    port = free_port()
    with started([ACTIVATE, "-l", f"{HOST}:{port}", "--", PROXYD, f"{HOST}:{upstream}"],
                 tmp / f"proxyd-{name}.log") as proc:
        proc.wait_line(r"Listening on")
        yield port, proc


def kernel_backend(tmp: Path, name: str, port: int) -> list[str]:
    """The command of the kernel-path service's own backend: a second nginx or iperf3."""
    if name == "web":
        home = tmp / "kernel"
        home.mkdir(exist_ok=True)
        conf = home / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=home, host=HOST, port=port))
        return [need("nginx"), "-p", str(home), "-e", str(home / "nginx-error.log"),
                "-c", str(conf)]
    return [need("iperf3"), "-s", "-B", HOST, "-p", str(port)]


@contextlib.contextmanager
def lazyd(tmp: Path, upstreams: dict[str, int]) -> Iterator[tuple[dict[str, int], Started]]:
    """One lazyd holding a proxy service per upstream, and per upstream a kernel-path
    service NAME-kernel with a backend of its own; yields ({name: port}, process)."""
    kernel = {f"{name}-kernel": (name, free_port()) for name in upstreams}
    ports = {name: free_port() for name in [*upstreams, *kernel]}
    sleep = need("sleep")
    config = tmp / "lazyd.yaml"
    config.write_text(f"control: unix:{tmp / 'control.sock'}\nservices:\n" + "".join(
        lazyd_service(name, [sleep, "infinity"], proxy_socket(ports[name], upstream))
        for name, upstream in upstreams.items()) + "".join(
        lazyd_service(name, kernel_backend(tmp, load, upstream),
                      proxy_socket(ports[name], upstream), "datapath: kernel")
        for name, (load, upstream) in kernel.items()))
    with started(lazyd_argv(config), tmp / "lazyd.log") as proc:
        proc.wait_line(r"^lazyd: holding")
        yield ports, proc


# -- the report -------------------------------------------------------------------

def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "—"


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "NOT met"


def round_ratios(a: list[float], b: list[float]) -> str:
    """The ratio a/b round by round (the rows of one round ran side by side), as min-max."""
    ratios = [x / y for x, y in zip(a, b, strict=True) if y]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "—"


def report_small(rows: dict[str, list[WrkResult]], cpu: dict[str, list[float]],
                 out: list[str]) -> float:
    """Append the small-request table to `out`; return lazyd / proxyd in req/s."""
    rps = {t: statistics.median(r.rps for r in rows[t]) for t in TARGETS}
    p99 = {t: statistics.median(r.p99_ms for r in rows[t]) for t in TARGETS}
    out.append("### Small requests: nginx `return 200` (3 bytes, keep-alive), "
               "`wrk -t1 -c50 --latency`\n")
    out.append("| path | req/s | p99 latency ms | vs direct (req/s) | proxy CPU µs/request "
               "| rounds req/s (min-max) |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for t in TARGETS:
        per_request = ("—" if t == "direct"
                       else f"{statistics.median(cpu[t]) * 1e6:.1f}")
        spread = f"{min(r.rps for r in rows[t]):,.0f}-{max(r.rps for r in rows[t]):,.0f}"
        out.append(f"| {LABELS[t]} | {rps[t]:,.0f} | {p99[t]:.2f} "
                   f"| {ratio(rps[t], rps['direct'])} | {per_request} | {spread} |")
    errors = [f"{LABELS[t]}: {r.errors}" for t in TARGETS for r in rows[t] if r.errors]
    value = rps["lazyd"] / rps["proxyd"]
    out.append(f"\nreq/s ratios: lazyd/direct {ratio(rps['lazyd'], rps['direct'])}, "
               f"proxyd/direct {ratio(rps['proxyd'], rps['direct'])}, "
               f"lazyd/proxyd {ratio(rps['lazyd'], rps['proxyd'])} "
               f"(rounds {round_ratios(*([r.rps for r in rows[t]] for t in ('lazyd', 'proxyd')))}; "
               f"target ≥ {SMALL_TARGET:.2f}x: {verdict(value, SMALL_TARGET)})")
    out.append(f"p99 ratios: lazyd/direct {ratio(p99['lazyd'], p99['direct'])}, "
               f"proxyd/direct {ratio(p99['proxyd'], p99['direct'])}, "
               f"lazyd/proxyd {ratio(p99['lazyd'], p99['proxyd'])} (lower is better)")
    if errors:
        out.append("wrk reported errors: " + " | ".join(errors))
    out.append("")
    return value


def report_bulk(rows: dict[str, list[float]], cpu: dict[str, list[float]],
                out: list[str]) -> float:
    """Append the bulk table to `out`; return lazyd / proxyd in GB/s."""
    gbps = {t: statistics.median(rows[t]) for t in TARGETS}
    out.append("### Bulk: `iperf3 -s` backend, `iperf3 -c -t N -J` through each path\n")
    out.append("| path | GB/s | vs direct | proxy CPU s per GB | rounds GB/s (min-max) |")
    out.append("|---|---:|---:|---:|---:|")
    for t in TARGETS:
        per_gb = "—" if t == "direct" else f"{statistics.median(cpu[t]):.3f}"
        out.append(f"| {LABELS[t]} | {gbps[t]:.2f} | {ratio(gbps[t], gbps['direct'])} "
                   f"| {per_gb} | {min(rows[t]):.2f}-{max(rows[t]):.2f} |")
    value = gbps["lazyd"] / gbps["proxyd"]
    out.append(f"\nGB/s ratios: lazyd/direct {ratio(gbps['lazyd'], gbps['direct'])}, "
               f"proxyd/direct {ratio(gbps['proxyd'], gbps['direct'])}, "
               f"lazyd/proxyd {ratio(gbps['lazyd'], gbps['proxyd'])} "
               f"(rounds {round_ratios(rows['lazyd'], rows['proxyd'])}; "
               f"target ≥ {BULK_TARGET:.2f}x: {verdict(value, BULK_TARGET)})\n")
    return value


def report_kernel(value: float, what: str, out: list[str]) -> None:
    out.append(f"{what} ratio lazyd (kernel)/direct {value:.2f}x (target ≥ {KERNEL_TARGET:.2f}x: "
               f"{'met' if value >= KERNEL_TARGET else 'NOT met'})\n")


def wait_steering(tmp: Path, service: str) -> None:
    """Wait until lazyd steers `service`'s new connections (it does so right after
    the service is ready, once the privileged helper has handed over its socket)."""
    from lazyd.runtime import control

    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        reply = control.request(str(tmp / "control.sock"), "status")
        if reply["services"][service]["steering"]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"lazyd did not steer {service} within {TIMEOUT:.0f} s")


def rotated(i: int) -> tuple[str, ...]:
    k = i % len(TARGETS)
    return TARGETS[k:] + TARGETS[:k]


# -- the runs -------------------------------------------------------------------------

def measure(tmp: Path, rounds: int, seconds: float, parts: set[str],
            out: list[str], notes: list[str]) -> tuple[str, list[str]]:
    """Run the chosen parts; append their tables to `out` and remarks to `notes`;
    return lazyd's log and the headline's pieces."""
    backend = {"web": free_port(), "bulk": free_port()}
    upstreams: dict[str, int] = {name: backend[name] for name in ("web", "bulk") if name in parts}
    with contextlib.ExitStack() as stack:
        if "web" in parts:
            stack.enter_context(nginx(tmp, backend["web"]))
        if "bulk" in parts:
            stack.enter_context(iperf_server(tmp, backend["bulk"]))
        lazyd_ports, lz = stack.enter_context(lazyd(tmp, upstreams))
        ports: dict[str, dict[str, int]] = {}
        proxyd_pids: dict[str, int] = {}
        for name, upstream in upstreams.items():
            port, pd = stack.enter_context(proxyd(tmp, name, upstream))
            ports[name] = {"direct": upstream, "proxyd": port, "lazyd": lazyd_ports[name],
                           "kernel": lazyd_ports[f"{name}-kernel"]}
            proxyd_pids[name] = pd.pid

        def proxy_pids(target: str, name: str) -> list[int]:
            if target in ("lazyd", "kernel"):
                return lazyd_processes(lz)
            return [proxyd_pids[name]] if target == "proxyd" else []

        pieces: list[str] = []
        if "web" in parts:
            progress("small requests: warming up")
            for t in TARGETS:
                http_get(ports["web"][t])  # lazyd: the cold start, not counted
                if t == "kernel":
                    wait_steering(tmp, "web-kernel")
                run_wrk(ports["web"][t], 1)
            wrk_rows: dict[str, list[WrkResult]] = {t: [] for t in TARGETS}
            wrk_cpu: dict[str, list[float]] = {t: [] for t in TARGETS}
            for i in range(rounds):
                for t in rotated(i):
                    pids = proxy_pids(t, "web")
                    before = cpu_seconds(pids)
                    result = run_wrk(ports["web"][t], seconds)
                    wrk_cpu[t].append((cpu_seconds(pids) - before) / max(result.requests, 1))
                    wrk_rows[t].append(result)
                    progress(f"  round {i + 1}/{rounds} {LABELS[t]}: {result.rps:,.0f} req/s, "
                             f"p99 {result.p99_ms:.2f} ms")
            value = report_small(wrk_rows, wrk_cpu, out)
            pieces.append(f"small requests lazyd/proxyd {value:.2f}x "
                          f"({verdict(value, SMALL_TARGET)})")
            kernel = (statistics.median(r.rps for r in wrk_rows["kernel"])
                      / statistics.median(r.rps for r in wrk_rows["direct"]))
            report_kernel(kernel, "req/s", out)
            pieces.append(f"small requests lazyd (kernel)/direct {kernel:.2f}x")
        if "bulk" in parts:
            progress("bulk: warming up")
            for t in TARGETS:
                try:
                    run_iperf(ports["bulk"][t], 1)  # lazyd: the cold start, not counted
                except RuntimeError as exc:
                    # lazyd's `ready: connect` probe reaches iperf3 as a client
                    # that sends nothing; iperf3 may fail the test that follows.
                    error = re.search(r'"error":\s*"([^"]*)"', str(exc))
                    notes.append(f"the warm-up iperf3 run through {LABELS[t]} failed "
                                 f"({error[1] if error else exc}) and was repeated")
                    run_iperf(ports["bulk"][t], 1)
                if t == "kernel":
                    wait_steering(tmp, "bulk-kernel")
            bulk_rows: dict[str, list[float]] = {t: [] for t in TARGETS}
            bulk_cpu: dict[str, list[float]] = {t: [] for t in TARGETS}
            for i in range(rounds):
                for t in rotated(i):
                    pids = proxy_pids(t, "bulk")
                    before = cpu_seconds(pids)
                    rate, volume = run_iperf(ports["bulk"][t], seconds)
                    bulk_cpu[t].append((cpu_seconds(pids) - before) / max(volume, 1e-9))
                    bulk_rows[t].append(rate)
                    progress(f"  round {i + 1}/{rounds} {LABELS[t]}: {rate:.2f} GB/s")
            value = report_bulk(bulk_rows, bulk_cpu, out)
            pieces.append(f"bulk lazyd/proxyd {value:.2f}x ({verdict(value, BULK_TARGET)})")
            kernel = statistics.median(bulk_rows["kernel"]) / statistics.median(bulk_rows["direct"])
            report_kernel(kernel, "GB/s", out)
            pieces.append(f"bulk lazyd (kernel)/direct {kernel:.2f}x")
        return lz.text(), pieces


def versions() -> str:
    def first_line(argv: list[str]) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True)
        return (proc.stdout + proc.stderr).strip().splitlines()[0]

    return ", ".join((
        first_line([need("nginx"), "-v"]).replace("nginx version: ", ""),
        first_line([need("wrk"), "-v"]).split(" [")[0],
        first_line([need("iperf3"), "-v"]).split(" (")[0],
        "systemd " + first_line([PROXYD, "--version"]).split()[1],
        f"Python {sys.version.split()[0]}",
    ))


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_proxy", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path (%(default)s)")
    parser.add_argument("--seconds", type=float, default=5, help="length of a run (%(default)s)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    parser.add_argument("--only", choices=("small", "bulk"), help="run one of the two loads")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 2, 2
    if args.rounds < 1 or args.seconds < 1:
        parser.error("need --rounds >= 1 and --seconds >= 1")
    for tool in (PROXYD, ACTIVATE):
        if not os.access(tool, os.X_OK):
            parser.error(f"{tool} is needed")
    parts = {"small": {"web"}, "bulk": {"bulk"}, None: {"web", "bulk"}}[args.only]
    ensure_commands({"nginx": ("nginx-light", "nginx"), "wrk": ("wrk",), "iperf3": ("iperf3",)})
    if PINNED:
        os.sched_setaffinity(0, {CLIENT_CPU})
    tables: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lazyd-bench-proxy-") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)  # nginx's worker runs unprivileged
        log, pieces = measure(tmp, args.rounds, args.seconds, parts, tables, notes)
    pinning = (f"backend and proxy on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}"
               if PINNED else "not pinned (fewer than 2 CPUs)")
    print("**lazyd proxy mode against systemd-socket-proxyd: " + "; ".join(pieces) + "**\n")
    print(f"{args.rounds} rounds x {len(TARGETS)} paths x {args.seconds:g} s, interleaved "
          f"(order rotated each round), after a warm-up request and a 1 s run per path; {pinning}; "
          f"{versions()}; load average before the report {os.getloadavg()[0]:.2f}.")
    starts = re.findall(r"^\w+: ready in .*$", log, re.MULTILINE)
    if starts:
        print("lazyd's cold starts (the warm-up, not counted): " + "; ".join(starts) + ".")
    for note in notes:
        print(f"Note: {note}.")
    print()
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    sys.exit(main(sys.argv[1:]))
