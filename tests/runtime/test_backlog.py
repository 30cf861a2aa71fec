"""A backlog above net.core.somaxconn: `lazyd check` and `lazyd run` say the
kernel caps it, naming the socket, and how to lift the cap.

The machine's own somaxconn is read and a backlog above it chosen, so nothing
system-wide is changed (others' tests share the machine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lazyd.config.convert import MAX_INT
from lazyd.runtime.backlog import SOMAXCONN, somaxconn
from tests.conftest import PY, free_port, run_lazyd

CAP = int(SOMAXCONN.read_text())
pytestmark = pytest.mark.skipif(CAP >= MAX_INT, reason=f"somaxconn {CAP}: no backlog above it")
ASKED = CAP + 1


def _config(deep: int, shallow: int, plain: int, path: int) -> str:
    """A pass-mode service with a socket above the cap, one below it, one with
    the default backlog (which means "as deep as the kernel allows") and a Unix
    stream socket above the cap."""
    return (
        "services:\n"
        "  web:\n"
        "    command: [/bin/sleep, '60']\n"
        "    user: root\n"
        "    sockets:\n"
        f"      deep: {{listen: 'tcp://127.0.0.1:{deep}', backlog: {ASKED}}}\n"
        f"      shallow: {{listen: 'tcp://127.0.0.1:{shallow}', backlog: 16}}\n"
        f"      plain: 'tcp://127.0.0.1:{plain}'\n"
        f"      local: {{listen: 'unix:{path}', backlog: {ASKED}}}\n"
    )


def _warning(socket: str) -> str:
    return (f"lazyd: services.web.sockets.{socket}: backlog {ASKED} is capped at {CAP} by "
            f"net.core.somaxconn; raise the cap with `sysctl -w net.core.somaxconn={ASKED}`")


def _listen_backlog(port: int) -> int:
    """The backlog the kernel gave the listener on `port` (`ss -l`'s Send-Q)."""
    shown = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                           text=True, check=True).stdout.split()
    return int(shown[2])


def test_check_names_each_capped_socket_and_the_sysctl(tmp_path: Path) -> None:
    config = tmp_path / "lazyd.yaml"
    config.write_text(_config(free_port(), free_port(), free_port(), 1)
                      .replace("unix:1", f"unix:{tmp_path / 'web.sock'}"))
    result = subprocess.run([PY, "-m", "lazyd", "check", "-c", str(config)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    capped = [line for line in result.stderr.splitlines() if "net.core.somaxconn" in line]
    assert capped == [_warning("deep"), _warning("local")]
    assert f"backlog {ASKED}" in result.stdout  # the plan still shows what was asked


async def test_run_says_it_once_and_the_kernel_did_cap_it(tmp_path: Path) -> None:
    deep = free_port()
    text = _config(deep, free_port(), free_port(), 1).replace(
        "unix:1", f"unix:{tmp_path / 'web.sock'}")
    async with run_lazyd(tmp_path, text) as lz:
        # The warning tells the truth: the listener's queue is the cap, not the ask.
        assert _listen_backlog(deep) == CAP
        lines = [line for line in lz.lines if "net.core.somaxconn" in line]
        assert lines == [_warning("deep"), _warning("local")], lz.log()


def test_somaxconn_unreadable_is_none(tmp_path: Path) -> None:
    assert somaxconn(tmp_path / "absent") is None
    assert somaxconn() == CAP
