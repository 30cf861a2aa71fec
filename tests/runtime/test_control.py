"""lazyd.runtime.control: where the control socket is, and what a client of it is told."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyd.errors import ControlError
from lazyd.runtime import control


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("LAZYD_CONTROL", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    yield monkeypatch


def test_the_path_is_the_flag_then_the_config_then_the_environment(
    no_env: pytest.MonkeyPatch,
) -> None:
    """--control wins over the environment; $LAZYD_CONTROL over the default; root's
    default is /run/lazyd.sock, anyone else's $XDG_RUNTIME_DIR/lazyd.sock."""
    no_env.setenv("LAZYD_CONTROL", "/tmp/from-env.sock")
    assert control.control_path(explicit="/tmp/flag.sock") == "/tmp/flag.sock"
    assert control.control_path() == "/tmp/from-env.sock"
    no_env.delenv("LAZYD_CONTROL")
    no_env.setattr(os, "geteuid", lambda: 0)
    assert control.control_path() == "/run/lazyd.sock"
    no_env.setattr(os, "geteuid", lambda: 1000)
    no_env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert control.control_path() == "/run/user/1000/lazyd.sock"


def test_no_path_at_all_says_how_to_give_one(no_env: pytest.MonkeyPatch) -> None:
    """A user without $XDG_RUNTIME_DIR and no setting gets an error naming the three ways."""
    no_env.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ControlError, match=r"control: in the config, \$LAZYD_CONTROL or "
                       r"\$XDG_RUNTIME_DIR"):
        control.control_path()


def test_no_daemon_running_is_said_plainly(tmp_path: Path) -> None:
    """A request to a path where nothing listens: "no lazyd is running at PATH"."""
    path = str(tmp_path / "nobody-here.sock")
    with pytest.raises(ControlError, match=f"^no lazyd is running at {path}$"):
        control.request(path, "status")


async def _serving(tmp_path: Path, nursery: trio.Nursery, made: list[socket.socket]) -> str:
    path = str(tmp_path / "control.sock")
    sock = control.bind_control(path)
    made.append(sock)

    async def handler(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "echo": request}

    nursery.start_soon(control.serve_control, sock, handler)
    return path


def _raw(path: str, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
        return reply


async def test_a_request_gets_its_answer_and_the_socket_is_private(
    tmp_path: Path, sockets: list[socket.socket]
) -> None:
    """request() sends the command with its arguments and the protocol version, and gets
    the handler's answer back; the socket file is mode 0600."""
    async with trio.open_nursery() as nursery:
        path = await _serving(tmp_path, nursery, sockets)
        assert os.stat(path).st_mode & 0o777 == 0o600
        reply = await trio.to_thread.run_sync(
            lambda: control.request(path, "status", history=True))
        assert reply == {"ok": True, "version": 1, "echo": {
            "version": 1, "command": "status", "history": True}}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("data", "error"), [
    (b"not json\n", "request is not JSON: "),
    (b"[1]\n", "request must be a JSON object"),
    (b'{"command": "status"}\n', "protocol version None is not supported by this daemon "
                                 "(it speaks 1)"),
    (b'{"version": 1}\n', "request has no command"),
    (b"[" * 10000 + b"\n", "request is not JSON: nested too deeply"),
])
async def test_a_bad_request_gets_an_error_saying_what_is_wrong(
    tmp_path: Path, sockets: list[socket.socket], data: bytes, error: str
) -> None:
    """Each malformed request is answered with ok: false and an error that names the
    problem; the handler never sees it."""
    async with trio.open_nursery() as nursery:
        path = await _serving(tmp_path, nursery, sockets)
        reply = await trio.to_thread.run_sync(_raw, path, data)
        assert reply["ok"] is False and reply["version"] == 1
        assert reply["error"].startswith(error), reply
        assert "echo" not in reply
        nursery.cancel_scope.cancel()
