"""A flood during a cold start: 10,000 connections at once to a service that
needs a second before it can serve.

Two services, each in every round, each with its own tables (both by default,
`--backend c` or `--backend python` for one); both sleep 1 s, then serve a
fixed HTTP answer, and write the moment they began serving (CLOCK_MONOTONIC)
to a file: that is the service's ready time, the origin of "slowest answer
after ready".

- C: programs/flood_backend.c (compiled here with `cc`), single-threaded on
  epoll: serving the whole flood costs it a few tens of milliseconds, so what
  is measured is the activators.
- Python: programs/flood_backend.py under /usr/bin/python3, stdlib only, one
  connection at a time (accept, read the request, answer, close, next), as a
  plain Python service is: it takes far longer to work through the flood,
  and while it does, everything past its own accept queue
  (min(4096, net.core.somaxconn)) waits or is dropped.

The client (programs/flood_client.py, on CPU 1, its RLIMIT_NOFILE raised)
opens every connection at once, sends each a small request and reads each
answer to the end.  It opens them from many client addresses, 200 from each
(127.0.1.1, 127.0.1.2, ...), as a flood from many clients comes: from one
address, lazyd's max_connections_per_source (256 by default) would reset all
but 256 of them.  Compared, each started cold for every run, interleaved, the
order rotating every round:

- direct: no activator and no cold start; the service already serves when
  the flood begins.  The floor: what answering the flood costs by itself
  (its answers count from the flood's start).
- lazyd (proxy): lazyd accepts and holds the connections; the service binds
  its own port after 1 s; lazyd's `ready: connect` probe finds it and every
  held connection is forwarded.  Once `queue_limit` connections are held
  (16384 by default) lazyd stops accepting and the kernel's accept queue holds
  the rest; a second row sets queue_limit to 4096 (somaxconn here), so that
  the kernel's queue has to take over part of the flood.
- lazyd (kernel): lazyd (proxy) with `datapath: kernel`: the flood arrives
  during the cold start, so lazyd still holds and forwards it; once the
  service is ready new connections (SYNs sent again, among them) are steered
  straight into the service's own socket.  Needs root and BPF sk_lookup
  (otherwise the row is left out, saying why).
- lazyd (pass): real socket activation; the service takes the listening socket
  at fd 3 and serves from it after 1 s.  Until then only the kernel's accept
  queue (min(backlog, net.core.somaxconn)) holds connections; SYNs past it
  are dropped, and their clients send them again 1 s, then 3 s, ... later.
- systemd-socket-activate + systemd-socket-proxyd: the activator execs a
  shell that starts the same service in the background (bind after 1 s) and
  execs systemd-socket-proxyd, which connects every client at once: while
  nothing listens yet, the connect is refused and the client is reset.
  Its default --connections-max=256 is kept: past 256 open connections it
  closes new ones at once.

Per connection the client records the connect time, whether its SYN was
retransmitted (TCP_INFO), the moment its answer was complete, and how it
ended.  The kernel's ListenOverflows counter (system-wide, from
/proc/net/netstat) is read before and after each run.  Nothing in the
system's settings is changed: the relevant ones are printed.  Per set-up, the
run figures "SYN-retried connects" and "slowest answer after ready" are also
given as the median over the rounds with their spread (min to max).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_proxy import (
    ACTIVATE,
    CLIENT_CPU,
    HOST,
    PINNED,
    PROGRAMS,
    PROXYD,
    SERVER_CPU,
    TIMEOUT,
    Started,
    cpu_seconds,
    ensure_commands,
    free_port,
    lazyd_argv,
    lazyd_processes,
    lazyd_service,
    need,
    peak_rss_mb,
    progress,
    proxy_socket,
    setup_child,
)

DELAY = 1.0  # the service's own start-up, seconds
CONNECTIONS = 10_000
DEADLINE = 12.0  # a connection still open this long after the flood began timed out
NOFILE = 65536  # for the server side: each proxied connection costs two fds
SETTLE = 1.0  # between runs, so one run's closing sockets do not meet the next run
SYSCTLS = ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_syncookies",
           "net.ipv4.tcp_abort_on_overflow", "net.ipv4.tcp_syn_retries",
           "net.ipv4.ip_local_port_range")
# What the flood must look like behind lazyd's proxy mode.
TARGET_AFTER_READY = 0.5
SMALL_QUEUE = 4096  # the second lazyd (proxy) row's queue_limit
# Connections per client address: under max_connections_per_source's default
# (256), which would otherwise reset all but 256 of a flood from one address.
PER_SOURCE = 200
SETUPS = ("direct", "lazyd-proxy", "lazyd-proxy-queue", "lazyd-kernel", "lazyd-pass", "proxyd")
PYTHON = "/usr/bin/python3"  # the Python backend's interpreter: the system's, not ours
BACKENDS = {"c": "flood_backend.c (C, epoll)",
            "python": "flood_backend.py (/usr/bin/python3, one connection at a time)"}


def label(setup: str) -> str:
    return {
        "direct": "direct (the service already running; no activator)",
        "lazyd-proxy": "lazyd (proxy)",
        "lazyd-proxy-queue": f"lazyd (proxy), queue_limit {SMALL_QUEUE}",
        "lazyd-kernel": "lazyd (kernel)",
        "lazyd-pass": "lazyd (pass)",
        "proxyd": "systemd-socket-activate + systemd-socket-proxyd",
    }[setup]


def sysctl(name: str) -> str:
    return " ".join(Path("/proc/sys", *name.split(".")).read_text().split())


def fd_limit() -> str:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    top = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    return (f"{NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)} "
            f"(the hard limit here is {top})")


def listen_overflows() -> int:
    """TcpExt ListenOverflows: connections dropped because an accept queue was full."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
             if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["ListenOverflows"])


def build_backend(kind: str, tmp: Path) -> list[str]:
    """The backend's command (before its options)."""
    if kind == "python":
        if not os.access(PYTHON, os.X_OK):
            raise RuntimeError(f"the Python backend needs {PYTHON}")
        return [PYTHON, str(PROGRAMS / "flood_backend.py")]
    ensure_commands({"cc": ("gcc",)})
    binary = tmp / "flood_backend"
    subprocess.run([need("cc"), "-O2", "-o", str(binary), str(PROGRAMS / "flood_backend.c")],
                   check=True)
    return [str(binary)]


def kernel_unavailable() -> str | None:
    """Why lazyd (kernel) cannot be measured here (None: it can)."""
    if os.geteuid() != 0:
        return "the kernel data path needs lazyd started as root"
    from lazyd.datapath.bpf import supported

    return supported()


@contextlib.contextmanager
def start(setup: str, tmp: Path, run: int,
          backend: Sequence[str]) -> Iterator[tuple[int, Path, Started]]:
    """Start one set-up cold; yield (port, ready file, the activator's process)."""
    port, upstream = free_port(), free_port()
    ready = tmp / f"ready-{run}"
    delay = ["--delay", f"{DELAY:g}", "--ready-file", str(ready)]
    if "flood_backend.py" in " ".join(backend):
        delay += ["--busy-file", str(busy_file(ready))]
    bind = [*backend, "--bind", f"{HOST}:{upstream}", *delay]
    log = tmp / f"{setup}-{run}.log"
    if setup == "direct":
        # The floor: how long the service itself takes to answer the flood.
        proc = Started([*backend, "--bind", f"{HOST}:{port}", *delay[2:], "--delay", "0"],
                       log, nofile=NOFILE)
        try:
            wait_file(ready, proc)
            yield port, ready, proc
        finally:
            proc.stop()
        return
    if setup == "proxyd":
        # The service comes up beside the proxy, as a unit the proxy's unit
        # requires would: started at the first connection, ready 1 s later.
        script = f"{shlex.join(bind)} 3<&- & exec {PROXYD} {HOST}:{upstream}"
        argv = [ACTIVATE, "-l", f"{HOST}:{port}", "--", "/bin/sh", "-c", script]
        proc = Started(argv, log, nofile=NOFILE)
        pattern = r"Listening on"
    else:
        if setup == "lazyd-pass":
            service = lazyd_service("flood", [*backend, "--fd", *delay],
                                    f"main: 'tcp://{HOST}:{port}'", mode="pass")
        else:
            extra = {"lazyd-proxy-queue": [f"queue_limit: {SMALL_QUEUE}"],
                     "lazyd-kernel": ["datapath: kernel"]}.get(setup, [])
            service = lazyd_service("flood", bind, proxy_socket(port, upstream), *extra)
        config = tmp / f"lazyd-{run}.yaml"
        config.write_text(f"control: unix:{tmp / f'control-{run}.sock'}\nservices:\n{service}")
        proc = Started(lazyd_argv(config), log, nofile=NOFILE)
        pattern = r"^lazyd: holding"
    try:
        proc.wait_line(pattern)
        yield port, ready, proc
    finally:
        proc.stop()


def busy_file(ready: Path) -> Path:
    """Where the Python service writes its own serving time when it is stopped."""
    return ready.with_name(ready.name + ".busy")


def read_busy(ready: Path) -> float | None:
    """The service's own serving time (programs/flood_backend.py), if it wrote it."""
    try:
        return float(busy_file(ready).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_file(path: Path, proc: Started) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (path.exists() and path.read_text().endswith("\n")):
        if proc.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.argv[0]} did not start: {proc.text()}")
        time.sleep(0.005)


@dataclass
class Flood:
    """One run's outcome, times in seconds."""

    setup: str
    backend: str
    round: int
    outcomes: Counter[str]
    syn_retried: int  # connections whose SYN was sent more than once
    connect_max: float
    ready: float | None  # the service's ready time, after the first connect
    after_ready: list[float]  # each answered connection's answer time minus ready
    overflows: int
    issued: float  # how long the client took to issue every connect
    cpu: float | None  # CPU time the activator (lazyd's processes, or the proxy) used
    peak_rss: float | None  # its largest peak resident set size, MB
    activator_line: str = ""
    busy: float | None = None  # the service's own serving time (the Python one says it)

    @property
    def answered(self) -> int:
        return self.outcomes["answered"]

    @property
    def slowest(self) -> float | None:
        return max(self.after_ready) if self.after_ready else None

    @property
    def late(self) -> int:
        return sum(t >= 1.0 for t in self.after_ready)


def flood(setup: str, kind: str, round_: int, tmp: Path, run: int, backend: Sequence[str],
          connections: int) -> Flood:
    with start(setup, tmp, run, backend) as (port, ready_file, proc):
        # systemd-socket-activate becomes the shell, then the proxy: one pid.
        pids = (lazyd_processes(proc) if setup.startswith("lazyd")
                else [proc.pid] if setup == "proxyd" else [])
        cpu_before = cpu_seconds(pids)
        overflows = listen_overflows()
        client = subprocess.run(
            [sys.executable, str(PROGRAMS / "flood_client.py"), HOST, str(port),
             str(connections), f"{DEADLINE:g}", str(PER_SOURCE)],
            capture_output=True, text=True, check=True, timeout=DEADLINE + 30,
            preexec_fn=setup_child(CLIENT_CPU),
        )
        overflows = listen_overflows() - overflows
        cpu = cpu_seconds(pids) - cpu_before if pids else None
        peak_rss = peak_rss_mb(pids) if pids else None
        data = json.loads(client.stdout)
        line = ""
        if setup.startswith("lazyd"):
            text = proc.text()
            match = re.search(r"^flood: (ready in .*|start .*)$", text, re.MULTILINE)
            line = match[1] if match else "(no start line)"
            # A kernel run that never steered would be a proxy run under another name.
            if setup == "lazyd-kernel" and not re.search(
                    r"^flood: kernel data path: new connections to", text, re.MULTILINE):
                raise RuntimeError(f"lazyd (kernel) did not steer the service:\n{text[-4000:]}")
    t0 = data["t0"]
    busy = read_busy(ready_file)  # written as the service was stopped
    ready = float(ready_file.read_text()) - t0 if ready_file.exists() else None
    # Direct: the service was ready before the flood, which is then the origin.
    origin = None if ready is None else max(ready, 0.0)
    connect = [c - s for c, s in zip(data["connected"], data["started"], strict=True)
               if c is not None]
    answered = [d - t0 for d, o in zip(data["done"], data["outcome"], strict=True)
                if o == "answered"]
    return Flood(
        setup=setup, backend=kind, round=round_, outcomes=Counter(data["outcome"]),
        syn_retried=sum(n > 0 for n in data["syn_retransmits"]),
        connect_max=max(connect, default=0.0), ready=ready,
        after_ready=[a - origin for a in answered] if origin is not None else [],
        overflows=overflows, issued=data["issued"] - t0, cpu=cpu, peak_rss=peak_rss,
        activator_line=line, busy=busy,
    )


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def spread(values: Sequence[float | None], digits: int) -> str:
    """Median over the rounds, and min to max ("—" for a run without the figure)."""
    known = [v for v in values if v is not None]
    if not known:
        return "—"
    missing = len(values) - len(known)
    return (f"{statistics.median(known):.{digits}f} ({min(known):.{digits}f} to "
            f"{max(known):.{digits}f})" + (f", {missing} run(s) without" if missing else ""))


def report(runs: list[Flood], connections: int, rounds: int, kind: str,
           no_kernel: str | None) -> None:
    lazyd = [r for r in runs if r.setup == "lazyd-proxy"]
    setups = [s for s in SETUPS if any(r.setup == s for r in runs)]

    def met(r: Flood) -> bool:
        # Within TARGET_AFTER_READY of ready, plus what the service itself
        # spends on the flood (one connection at a time, nobody can save it).
        return (r.answered == connections and r.syn_retried == 0
                and r.slowest is not None
                and r.slowest <= TARGET_AFTER_READY + (r.busy or 0.0))

    def summary(setup: str) -> str:
        rs = [r for r in runs if r.setup == setup]
        answered = sum(r.answered for r in rs)
        slowest = max((r.slowest for r in rs if r.slowest is not None), default=None)
        retried = sum(r.syn_retried for r in rs)
        return (f"{label(setup)} {answered}/{connections * len(rs)} answered, "
                f"{retried} SYN retried, slowest {fmt(slowest, 2)} s after ready")

    print(f"### Service {BACKENDS[kind]}\n")
    print(f"**{connections:,} connections at once during a {DELAY:g} s cold start: "
          + "; ".join(summary(s) for s in setups)
          + f". Target for lazyd (proxy): {'met' if lazyd and all(map(met, lazyd)) else 'NOT met'}"
          + "**\n")
    settings = ", ".join(f"{name} = {sysctl(name)}" for name in SYSCTLS)
    pinning = (f"activator and service on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}"
               if PINNED else "not pinned (fewer than 2 CPUs)")
    print(f"{rounds} round(s), each set-up started cold for every run, interleaved (order "
          f"rotated each round, the two services taking turns); {pinning}; the service binds "
          f"(or starts accepting) {DELAY:g} s after it is started; client deadline "
          f"{DEADLINE:g} s; {PER_SOURCE} connections per client address; "
          f"Python {sys.version.split()[0]}; load average "
          f"{os.getloadavg()[0]:.2f}; fd limit (RLIMIT_NOFILE) of the server side: "
          f"{fd_limit()}.  System settings (unchanged): {settings}.  systemd-socket-proxyd "
          "runs with its default --connections-max=256 (past 256 open connections it closes "
          "new ones at once)."
          + (f"  lazyd (kernel) not measured: {no_kernel}." if no_kernel else "") + "\n")
    print("#### Per set-up, over the rounds: median (min to max)\n")
    print("| set-up | runs | answered | SYN-retried connects | slowest answer after ready s "
          "| the service's own serving time s | slowest minus the service's own s "
          "| answers ≥ 1 s after ready |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for setup in setups:
        rs = [r for r in runs if r.setup == setup]
        beyond = [None if r.slowest is None or r.busy is None else r.slowest - r.busy
                  for r in rs]
        print(f"| {label(setup)} | {len(rs)} | {spread([r.answered for r in rs], 0)} "
              f"| {spread([r.syn_retried for r in rs], 0)} "
              f"| {spread([r.slowest for r in rs], 3)} | {spread([r.busy for r in rs], 3)} "
              f"| {spread(beyond, 3)} | {spread([r.late for r in rs], 0)} |")
    print("\n#### How each connection ended\n")
    print("| set-up | round | answered | reset | closed unanswered | refused | timed out "
          "| SYN retried |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        other = sum(n for o, n in r.outcomes.items() if o.startswith("error:"))
        print(f"| {label(r.setup)} | {r.round} | {r.answered} "
              f"| {r.outcomes['reset']} | {r.outcomes['closed']} | {r.outcomes['refused']} "
              f"| {r.outcomes['timeout'] + other} | {r.syn_retried} |")
    print("\n#### When, and at what cost (times in seconds)\n")
    print("| set-up | round | service ready after first connect | slowest connect "
          "| slowest answer after ready | p99 answer after ready | answers ≥ 1 s after ready "
          "| listen overflows | activator CPU s | activator peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        p99 = (statistics.quantiles(r.after_ready, n=100, method="inclusive")[98]
               if len(r.after_ready) >= 2 else None)
        ready = "before" if r.ready is not None and r.ready < 0 else fmt(r.ready)
        print(f"| {label(r.setup)} | {r.round} | {ready} "
              f"| {r.connect_max:.3f} | {fmt(r.slowest)} | {fmt(p99)} | {r.late} "
              f"| {r.overflows} | {fmt(r.cpu, 2)} | {fmt(r.peak_rss, 0)} |")
    print()
    others = Counter(o for r in runs for o in r.outcomes.elements() if o.startswith("error:"))
    if others:
        print(f"Counted as timed out: other errors {dict(others)}.")
    lines = [f"{label(r.setup)}, round {r.round}: `{r.activator_line}`"
             for r in runs if r.activator_line]
    if lines:
        print("lazyd's start lines: " + "; ".join(lines) + ".")
    issued = [r.issued for r in runs]
    print(f"The client issued its {connections:,} connects in {min(issued):.2f}-"
          f"{max(issued):.2f} s.  `slowest connect` counts from a connection's own connect() "
          "until the client saw it complete; `SYN retried`: connections whose SYN the client "
          "had to send again (TCP_INFO), each a second or more lost; `listen overflows`: the "
          "kernel's count of connections dropped at a full accept queue during the run "
          "(system-wide, upstream queues included).  Direct's answers count from the flood's "
          "start.  `the service's own serving time`: the CPU time the Python service says it "
          "spent once it began to serve (the C one does not say).  Target for lazyd (proxy): "
          "all answered, "
          f"no SYN retried, slowest answer within {TARGET_AFTER_READY:g} s of ready plus the "
          "service's own serving time.\n")


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_flood", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rounds", type=int, default=3, help="runs per set-up (%(default)s)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help="connections in the flood (%(default)s)")
    parser.add_argument("--backend", choices=("both", *BACKENDS), default="both",
                        help="which service(s) to flood, each with its own tables "
                             "(%(default)s)")
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    if args.rounds < 1 or args.connections < 1:
        parser.error("need --rounds >= 1 and --connections >= 1")
    for tool in (PROXYD, ACTIVATE):
        if not os.access(tool, os.X_OK):
            parser.error(f"{tool} is needed")
    if PINNED:
        os.sched_setaffinity(0, {CLIENT_CPU})
    kinds = list(BACKENDS) if args.backend == "both" else [args.backend]
    no_kernel = kernel_unavailable()
    setups = tuple(s for s in SETUPS if not (no_kernel and s == "lazyd-kernel"))
    runs: list[Flood] = []
    with tempfile.TemporaryDirectory(prefix="lazyd-bench-flood-") as tmpdir:
        tmp = Path(tmpdir)
        backends = {kind: build_backend(kind, tmp) for kind in kinds}
        run = 0
        for i in range(args.rounds):
            k = i % len(setups)
            # The services take turns at going first, round by round.
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                for setup in setups[k:] + setups[:k]:
                    run += 1
                    progress(f"round {i + 1}/{args.rounds}: {kind}: {label(setup)}")
                    result = flood(setup, kind, i + 1, tmp, run, backends[kind],
                                   args.connections)
                    progress(f"  {dict(result.outcomes)}, SYN retried {result.syn_retried}, "
                             f"slowest {fmt(result.slowest)} s after ready")
                    runs.append(result)
                    time.sleep(SETTLE)
    for kind in kinds:
        report([r for r in runs if r.backend == kind], args.connections, args.rounds, kind,
               no_kernel)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    sys.exit(main(sys.argv[1:]))
