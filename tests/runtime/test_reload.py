"""Reload on SIGHUP and `lazyd reload`: held sockets stay open, changes land."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import trio

from tests.conftest import PY, exchange, free_port, program, proxy_service, run_lazyd


def _config(services: dict[str, tuple[str, int]]) -> str:
    lines = ["services:"]
    for name, (command, port) in services.items():
        lines += [
            f"  {name}:",
            f"    command: {command}",
            "    user: root",
            "    sockets:",
            f"      tcp: tcp://127.0.0.1:{port}",
        ]
    return "\n".join(lines) + "\n"


def _ask(port: int, line: bytes = b"ping\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        return s.makefile("rb").read()


async def _client_loop(port: int, stop: trio.Event, results: dict[str, int]) -> None:
    """Connect again and again; count answers and refusals."""
    while not stop.is_set():
        try:
            answer = await trio.to_thread.run_sync(_ask, port)
        except ConnectionRefusedError:
            results["refused"] += 1
        else:
            results["answered" if answer.endswith(b" ping\n") else "bad"] += 1


async def test_reload_adds_removes_and_changes_without_refusing_anyone(tmp_path: Path) -> None:
    """SIGHUP with an added, a removed and a changed service, while a client loops on an
    unchanged socket: nothing refused; the removed socket closes, the added one answers,
    the changed running service restarts with its new command."""
    keep, gone, changed, added = free_port(), free_port(), free_port(), free_port()
    serve = program("serve_lines.py", 0)
    before = _config({"keep": (serve, keep), "gone": (serve, gone), "changed": (serve, changed)})
    async with run_lazyd(tmp_path, before) as lz:
        old_pid = (await trio.to_thread.run_sync(_ask, changed)).split()[0]
        results = {"answered": 0, "refused": 0, "bad": 0}
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_client_loop, keep, stop, results)
            config = tmp_path / "lazyd.yaml"
            header = config.read_text().splitlines()[0]
            after = _config({
                "keep": (serve, keep),
                "changed": (program("serve_lines.py", 0, "exit-when-idle", 30), changed),
                "added": (serve, added),
            })
            config.write_text(f"{header}\n{after}")
            lz.process.send_signal(signal.SIGHUP)
            await lz.wait_line(r"^lazyd: reloaded ")
            await lz.wait_line(r"^changed: stopped \(reload\)")
            await lz.wait_line(r"^changed: ready in", count=2)
            with trio.fail_after(10):
                while results["answered"] < 20:
                    await trio.sleep(0.01)
            stop.set()
        assert results["refused"] == 0 and results["bad"] == 0
        new_pid = (await trio.to_thread.run_sync(_ask, changed)).split()[0]
        assert new_pid != old_pid
        assert (await trio.to_thread.run_sync(_ask, added)).endswith(b" ping\n")
        try:
            await trio.to_thread.run_sync(_ask, gone)
            raise AssertionError("the removed service's socket still accepts")
        except ConnectionRefusedError:
            pass
        status = await lz.status()
        assert set(status) == {"keep", "changed", "added"}


async def test_a_bad_config_on_reload_changes_nothing(tmp_path: Path) -> None:
    """`lazyd reload` with a broken config prints its problems, exits 1, and every
    service and socket stays as it was."""
    port = free_port()
    async with run_lazyd(tmp_path, _config({"web": (program("serve_lines.py", 0), port)})) as lz:
        assert (await trio.to_thread.run_sync(_ask, port)).endswith(b" ping\n")
        config = tmp_path / "lazyd.yaml"
        good = config.read_text()
        config.write_text(good.replace("command:", "comand:"))
        result = subprocess.run(
            [PY, "-m", "lazyd", "reload", "--control", lz.control_path],
            capture_output=True, text=True, timeout=20, check=False,
        )
        assert result.returncode == 1
        assert "unknown key 'comand' (did you mean 'command'?)" in result.stderr
        await lz.wait_line(r"^lazyd: reload failed; the running config stays in force")
        assert (await trio.to_thread.run_sync(_ask, port)).endswith(b" ping\n")
        assert (await lz.status())["web"]["state"] == "running"
        config.write_text(good)
        result = subprocess.run(
            [PY, "-m", "lazyd", "reload", "--control", lz.control_path],
            capture_output=True, text=True, timeout=20, check=False,
        )
        assert result.returncode == 0 and result.stdout.strip() == "reloaded"


async def test_removing_a_started_pass_mode_service_leaves_the_daemon_running(
    tmp_path: Path,
) -> None:
    """Two pass-mode services, each started once by a connection; one is removed from the
    file and SIGHUP: the removed one is stopped, lazyd keeps running and serving the other,
    and its log has no traceback."""
    keep, gone = free_port(), free_port()
    serve = program("serve_lines.py", 0)
    async with run_lazyd(tmp_path, _config({"keep": (serve, keep), "gone": (serve, gone)})) as lz:
        for port in (keep, gone):
            assert (await trio.to_thread.run_sync(_ask, port)).endswith(b" ping\n")
        config = tmp_path / "lazyd.yaml"
        header = config.read_text().splitlines()[0]
        config.write_text(f"{header}\n{_config({'keep': (serve, keep)})}")
        lz.process.send_signal(signal.SIGHUP)
        # A reload has the root helper read the file in a fresh interpreter: on a
        # loaded machine that alone can take seconds.
        await lz.wait_line(r"^gone: stopped \(removed by reload\)", timeout=30)
        await lz.wait_line(r"^lazyd: reloaded ")
        # The removed service's runner winds down after its process is gone: give it
        # the chance to trip over its closed socket before looking.
        with trio.fail_after(5):
            while "gone" in await lz.status():
                await trio.sleep(0.02)
        assert (await trio.to_thread.run_sync(_ask, keep)).endswith(b" ping\n")
        with trio.fail_after(5):
            while True:
                try:
                    await trio.to_thread.run_sync(_ask, gone)
                except ConnectionRefusedError:
                    break
                await trio.sleep(0.02)
        assert lz.process.returncode is None
        assert "Traceback" not in lz.log(), lz.log()


async def test_a_client_right_after_a_reload_that_replaces_a_runner_is_answered(
    tmp_path: Path,
) -> None:
    """A reload that changes how lazyd serves a running proxy service (a new runner, the
    process restarted): a client that connects the moment the reload is done is held
    for the new process and answered by it, not forwarded to the one being stopped."""
    port, upstream = free_port(), free_port()
    backend = program("backend.py", f"tcp:127.0.0.1:{upstream}")
    config = tmp_path / "lazyd.yaml"

    def write(idle: str) -> str:
        return "services:\n" + proxy_service(
            "web", backend, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{upstream}",
            f"idle_timeout: {idle}")

    async with run_lazyd(tmp_path, write("1h")) as lz:
        header = config.read_text().splitlines()[0]
        old = int((await exchange(port, b"first\n")).split()[0])
        for n, idle in enumerate(("2h", "3h", "4h"), start=1):
            config.write_text(f"{header}\n{write(idle)}")
            lz.process.send_signal(signal.SIGHUP)
            await lz.wait_line(r"^lazyd: reloaded ", count=n)
            with trio.fail_after(10):
                answer = await exchange(port, b"after\n")
            pid, line = answer.split(b" ", 1)
            assert line == b"after\n" and int(pid) != old, lz.log()
            old = int(pid)
