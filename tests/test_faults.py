"""Faults lazyd must survive: crashes of its own, malformed requests, restarts."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import trio

from lazyd import control
from tests.conftest import alive as _alive
from tests.conftest import free_port, program, run_lazyd


def _config(port: int, unix: Path) -> str:
    return (
        "services:\n"
        "  web:\n"
        f"    command: {program('serve_lines.py', 0)}\n"
        "    user: root\n"
        "    sockets:\n"
        f"      tcp: tcp://127.0.0.1:{port}\n"
        "  local:\n"
        f"    command: {program('serve_lines.py', 0)}\n"
        "    user: root\n"
        "    sockets:\n"
        f"      unix: unix:{unix}\n"
    )


async def test_sigkill_then_immediate_restart_binds_the_same_addresses(tmp_path: Path) -> None:
    """lazyd killed with SIGKILL (its Unix socket files left behind, connections in
    TIME_WAIT): its services die with it, and it starts again at once on the same
    addresses and serves."""
    port, unix = free_port(), tmp_path / "web.sock"
    async with run_lazyd(tmp_path, _config(port, unix), expect_exit=None) as lz:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"one\n")
            assert s.recv(100).endswith(b" one\n")
        service = (await lz.status())["web"]["pid"]
        os.killpg(lz.process.pid, signal.SIGKILL)
        await lz.process.wait()
    # The service runs in a session of its own, out of reach of the killpg above; the
    # spawner sees lazyd go and takes the services with it.
    with trio.fail_after(2):
        while _alive(service):
            await trio.sleep(0.005)
    assert unix.exists()  # left behind by the crash
    async with run_lazyd(tmp_path, _config(port, unix)) as lz:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"two\n")
            assert s.recv(100).endswith(b" two\n")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(unix))
            s.sendall(b"three\n")
            assert s.recv(100).endswith(b" three\n")


def _raw_control(path: str, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = json.loads(s.makefile("rb").readline())
        assert isinstance(reply, dict)
        return reply


async def test_malformed_control_requests_are_answered_and_harmless(tmp_path: Path) -> None:
    """Garbage, non-objects, unknown versions and commands on the control socket each get
    a clear error reply; the daemon keeps answering; the socket is mode 0600."""
    port, unix = free_port(), tmp_path / "web.sock"
    async with run_lazyd(tmp_path, _config(port, unix)) as lz:
        path = lz.control_path
        assert os.stat(path).st_mode & 0o777 == 0o600
        cases = {
            b"not json\n": "request is not JSON",
            b"[1, 2]\n": "request must be a JSON object",
            b'{"version": 99, "command": "status"}\n': "protocol version 99 is not supported",
            b'{"version": 1}\n': "request has no command",
            b'{"version": 1, "command": "explode"}\n': "unknown command 'explode'",
            b"\xff\xfe\n": "request is not JSON",
        }
        for payload, expected in cases.items():
            reply = await trio.to_thread.run_sync(_raw_control, path, payload)
            assert reply["ok"] is False and expected in str(reply["error"]), (payload, reply)
        big = b"x" * (control.MAX_REQUEST + 10)
        reply = await trio.to_thread.run_sync(_raw_control, path, big)
        assert reply["ok"] is False and "too long" in str(reply["error"])
        assert "web" in await lz.status()
