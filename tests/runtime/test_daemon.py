"""The real daemon, with real services, sockets and outside programs."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from lazyd.runtime import control
from tests.conftest import (
    PROGRAMS,
    PY,
    burst,
    exchange,
    free_port,
    needs,
    program,
    run_lazyd,
    wait_gone,
)
from tests.conftest import alive as _alive

PROXYD = "/lib/systemd/systemd-socket-proxyd"
SYSTEM_PY = "/usr/bin/python3"



async def _echo_server(
    port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass  # the proxy in front closed without a half-close

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(echo, listeners)


@needs("/lib/systemd/systemd-socket-proxyd")
async def test_systemd_socket_proxyd_runs_as_a_pass_mode_service(tmp_path: Path) -> None:
    """systemd's own socket-proxyd accepts the LISTEN_FDS lazyd hands it and forwards."""
    port, backend = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(_echo_server, backend)
        config = f"""
services:
  proxyd:
    command: [{PROXYD}, "127.0.0.1:{backend}"]
    user: root
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
        async with run_lazyd(tmp_path, config) as lz:
            with trio.fail_after(10):
                # systemd-socket-proxyd does not pass a half-close on, so read the
                # echo before closing instead of sending EOF.
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    payload = b"through systemd-socket-proxyd"
                    await stream.send_all(payload)
                    received = b""
                    while len(received) < len(payload):
                        received += await stream.receive_some(65536)
                assert received == payload
            await lz.wait_line(r"^proxyd: ready in [\d.]+ ms \(spawn [\d.]+ ms, readiness")
        nursery.cancel_scope.cancel()


@needs("curl")
async def test_gunicorn_answers_http_on_the_held_port(tmp_path: Path) -> None:
    """gunicorn, which reads LISTEN_FDS itself, serves an HTTP request (curl) on lazyd's port."""
    port = free_port()
    gunicorn = str(Path(PY).parent / "gunicorn")
    config = f"""
services:
  web:
    command: [{gunicorn}, --workers, "1", --chdir, "{PROGRAMS}",
              "gunicorn_app:app"]
    user: root
    sockets:
      http: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config):
        result = await trio.run_process(
            ["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/"],
            capture_stdout=True,
        )
        assert result.stdout.startswith(b"hello from gunicorn worker ")


async def test_sockets_arrive_at_fds_3_4_5_with_names_pid_and_user(tmp_path: Path) -> None:
    """http, https, quic land at fds 3, 4, 5 named http:https:quic; LISTEN_PID is the
    service's own pid; the environment is clean; user nobody runs as nobody."""
    http, https, quic = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    # nobody must be able to run the interpreter and write the report: pytest's own
    # tmp dirs and the virtualenv's interpreter (under /root) are closed to it.
    shared = Path(tempfile.mkdtemp(prefix="lazyd-report-"))
    shared.chmod(0o777)
    report = shared / "report.json"
    config = f"""
services:
  blog:
    command: [{SYSTEM_PY}, "{PROGRAMS / 'report.py'}", "{report}"]
    user: nobody
    sockets:
      http: tcp://127.0.0.1:{http}
      https: tcp://127.0.0.1:{https}
      quic: udp://127.0.0.1:{quic}
    environment:
      BLOG_ROOT: /srv/blog
      PYTHONCOERCECLOCALE: "0"  # else Python itself adds LC_CTYPE to its environment
"""
    try:
        async with run_lazyd(tmp_path, config) as lz:
            with trio.fail_after(10):
                assert await exchange(http, b"") == b"reported\n"
            await lz.wait_line(r"^blog: exited with status 0")
        data = json.loads(report.read_text())
    finally:
        shutil.rmtree(shared)
    env = data["env"]
    assert env["LISTEN_FDS"] == "3"
    assert env["LISTEN_FDNAMES"] == "http:https:quic"
    assert env["LISTEN_PID"] == str(data["pid"])
    assert set(env) == {
        "PATH", "BLOG_ROOT", "PYTHONCOERCECLOCALE", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"
    }
    assert [(f["fd"], f["type"], f["address"][1]) for f in data["fds"]] == [
        (3, "stream", http),
        (4, "stream", https),
        (5, "dgram", quic),
    ]
    nobody = pwd.getpwnam("nobody")
    assert (data["uid"], data["gid"]) == (nobody.pw_uid, nobody.pw_gid)


async def test_fifty_early_connections_are_answered_by_one_start(tmp_path: Path) -> None:
    """50 clients connect before the service exists; all are answered, by one process."""
    port = free_port()
    config = f"""
services:
  lines:
    command: {program("serve_lines.py", 0.3)}
    user: root
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config) as lz:
        with trio.fail_after(15):
            answers, failures = await burst(port, 50)
        assert failures == []
        pids = {a.split()[0] for a in answers.values()}
        assert len(answers) == 50 and len(pids) == 1
        assert {i: a.split(b" ", 1)[1] for i, a in answers.items()} == {
            i: b"request %d\n" % i for i in range(50)
        }
        status = (await lz.status())["lines"]
        assert status["activations"] == 1
        assert status["state"] == "running"
        assert str(status["pid"]).encode() in pids
        line = await lz.wait_line(r"^lines: ready in")
        assert "waiting" in line


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def test_a_service_that_exits_at_once_hits_the_start_limit_and_rests(
    tmp_path: Path,
) -> None:
    """A service that exits at once is started start_limit times, ends failed, and lazyd
    does not spin while the connection waits in the kernel."""
    port = free_port()
    config = f"""
services:
  crash:
    command: [{PY}, -c, "raise SystemExit(3)"]
    user: root
    start_limit: 3
    start_limit_interval: 30s
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config) as lz:
        client = socket.create_connection(("127.0.0.1", port))
        try:
            await lz.wait_line(r"^crash: failed: 3 starts within 30 s")
            status = (await lz.status())["crash"]
            assert status["state"] == "failed"
            assert status["activations"] == 3
            # The promise is about time (no spinning once it has given up), so it is
            # measured over a stretch of it: CPU ticks over the wall time that passed.
            before, start = _cpu_ticks(lz.process.pid), time.monotonic()
            await trio.sleep(1.0)
            ticks, window = _cpu_ticks(lz.process.pid) - before, time.monotonic() - start
            assert ticks / os.sysconf("SC_CLK_TCK") <= 0.02 * window, (ticks, window)
            assert len([ln for ln in lz.lines if "exited with status 3" in ln]) == 3
        finally:
            client.close()


@needs("systemd-notify")
async def test_notify_readiness_from_systemd_notify_in_a_shell_script(tmp_path: Path) -> None:
    """A shell-script service that runs `systemd-notify --ready` becomes ready through it."""
    port = free_port()
    script = tmp_path / "svc.sh"
    script.write_text(
        "#!/bin/sh\n"
        "exec 3>&-  # keep the listening socket only in the server below\n"
        "systemd-notify --status='warming up'\n"
        "sleep 0.2\n"
        "systemd-notify --ready --status='serving'\n"
        "exec sleep 30\n"
    )
    script.chmod(0o755)
    config = f"""
services:
  notified:
    command: [{script}]
    user: root
    ready: notify
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config) as lz:
        client = socket.create_connection(("127.0.0.1", port))
        try:
            line = await lz.wait_line(r"^notified: ready in")
            readiness = float(line.split("readiness ")[1].split(" ms")[0])
            assert readiness >= 200
            status = (await lz.status())["notified"]
            assert status["state"] == "running"
            assert status["status"] == "serving"
        finally:
            client.close()


async def test_sigterm_stops_everything_and_sigkills_the_stubborn(tmp_path: Path) -> None:
    """On SIGTERM a service that ignores its stop signal is killed after stop_timeout, its
    children with it; lazyd exits 0 and leaves no process behind."""
    port = free_port()
    pidfile = tmp_path / "pids"
    stubborn = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(60)\n"
    )
    config = f"""
services:
  stubborn:
    command: [{PY}, -c, {json.dumps(stubborn)}]
    user: root
    stop_timeout: 300ms
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config) as lz:
        client = socket.create_connection(("127.0.0.1", port))
        try:
            await lz.wait_line(r"^stubborn: ready in")
            with trio.fail_after(10):
                while not pidfile.exists() or " " not in pidfile.read_text():
                    await trio.sleep(0.01)
            pids = [int(p) for p in pidfile.read_text().split()]
        finally:
            client.close()
    assert lz.returncode == 0
    assert "stubborn: still running 0.3 s after SIGTERM; sending SIGKILL" in lz.log()
    # SIGKILL is delivered asynchronously: give the kernel a moment, no more.
    with trio.move_on_after(2):
        for pid in pids:
            await wait_gone(pid)
    for pid in pids:
        assert not _alive(pid), f"pid {pid} survived"


async def test_status_json_has_the_documented_fields(tmp_path: Path) -> None:
    """`lazyd status --json` prints state, pid, activations, queued, active, last_start_ms."""
    port = free_port()
    config = f"""
services:
  lines:
    command: {program("serve_lines.py", 0)}
    user: root
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config) as lz:
        result = await trio.run_process(
            [PY, "-m", "lazyd", "status", "--json", "--control", lz.control_path],
            capture_stdout=True,
        )
        idle = json.loads(result.stdout)["services"]["lines"]
        assert idle == {**idle, "state": "idle", "pid": None, "activations": 0,
                        "queued": 0, "last_start_ms": None}
        assert "active" in idle
        assert await exchange(port, b"x\n")
        await lz.wait_line(r"^lines: ready in")
        result = await trio.run_process(
            [PY, "-m", "lazyd", "status", "--control", lz.control_path], capture_stdout=True
        )
        table = result.stdout.decode()
        assert table.splitlines()[0].split()[:3] == ["SERVICE", "STATE", "PID"]
        assert "lines" in table and "running" in table


async def test_status_without_a_daemon_is_a_clear_error(tmp_path: Path) -> None:
    """`lazyd status` with nobody listening says so and exits 1."""
    result = subprocess.run(
        [PY, "-m", "lazyd", "status", "--control", str(tmp_path / "none.sock")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"lazyd: no lazyd is running at {tmp_path / 'none.sock'}"


async def test_a_port_in_use_fails_the_start_and_releases_everything(tmp_path: Path) -> None:
    """A port that cannot be bound names service and socket; lazyd exits 1 and the sockets
    it had bound are free again."""
    first, taken = free_port(), free_port()
    blocker = socket.create_server(("127.0.0.1", taken))
    config_path = tmp_path / "lazyd.yaml"
    config_path.write_text(f"""
control: unix:{tmp_path / 'control.sock'}
services:
  web:
    command: [{PY}, -c, "pass"]
    user: root
    sockets:
      a: tcp://127.0.0.1:{first}
      b: tcp://127.0.0.1:{taken}
""")
    try:
        result = subprocess.run(
            [PY, "-m", "lazyd", "run", "-c", str(config_path)],
            capture_output=True, text=True, timeout=20, check=False,
        )
    finally:
        blocker.close()
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"lazyd: services.web.sockets.b (tcp://127.0.0.1:{taken}): "
        "cannot bind: Address already in use"
    )
    socket.create_server(("127.0.0.1", first)).close()
    assert not (tmp_path / "control.sock").exists()


async def test_start_timeout_stops_a_service_that_never_gets_ready(tmp_path: Path) -> None:
    """A notify service that never says READY=1 is stopped after start_timeout."""
    port = free_port()
    config = f"""
services:
  slow:
    command: [sleep, "30"]
    user: root
    ready: notify
    start_timeout: 300ms
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config) as lz:
        client = socket.create_connection(("127.0.0.1", port))
        try:
            await lz.wait_line(r"^slow: start timed out: not ready within 0.3 s")
            await lz.wait_line(r"^slow: stopped \(start timeout\): killed by SIGTERM")
        finally:
            client.close()


async def test_restart_on_failure_brings_a_crashed_service_back(tmp_path: Path) -> None:
    """restart: on-failure starts a service that crashed again, without new traffic."""
    port = free_port()
    marker = tmp_path / "ran-once"
    crash_once = (
        "import os, sys, time\n"
        f"m = {str(marker)!r}\n"
        "if not os.path.exists(m):\n"
        "    open(m, 'w').close(); sys.exit(5)\n"
        "time.sleep(30)\n"
    )
    config = f"""
services:
  flaky:
    command: [{PY}, -c, {json.dumps(crash_once)}]
    user: root
    restart: on-failure
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config) as lz:
        with socket.create_connection(("127.0.0.1", port)):
            await lz.wait_line(r"^flaky: exited with status 5")
        await lz.wait_line(r"^flaky: restarting in 100 ms \(on-failure\)")
        await lz.wait_line(r"^flaky: ready in", count=2)
        assert (await lz.status())["flaky"]["activations"] == 2


async def test_the_first_accept_of_a_pass_mode_service_is_measured(tmp_path: Path) -> None:
    """A pass-mode service that is `ready: started` at exec but accepts only after 0.3 s
    of start-up: the start record's first accept comes at least that long after ready
    (and not much later), so `analyze` shows where a held client's time went."""
    port = free_port()
    config = (
        "services:\n  web:\n"
        f"    command: {program('serve_lines.py', 0.3)}\n"
        "    user: root\n    sockets:\n"
        f"      http: tcp://127.0.0.1:{port}\n"
    )
    async with run_lazyd(tmp_path, config) as lz:
        assert (await exchange(port, b"hi\n")).endswith(b" hi\n")
        with trio.fail_after(10):
            while True:
                reply = await trio.to_thread.run_sync(
                    partial(control.request, lz.control_path, "status", history=True))
                (start,) = reply["services"]["web"]["starts"]
                if start["first_accept_ms"] is not None:
                    break
                await trio.sleep(0.05)
        after_ready = start["first_accept_ms"] - start["ready_ms"]
        assert 0.3 * 1000 * 7 / 8 <= after_ready <= 2000, start
