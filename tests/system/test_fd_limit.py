"""Proxy mode under a tiny open-file limit: lazyd keeps fds for itself and serves
everyone, a little at a time."""

from __future__ import annotations

import re
import resource
import shutil
from pathlib import Path

import pytest
import trio

from lazyd.datapath.budget import FD_TABLE
from tests.conftest import burst, free_port, program, run_lazyd

LIMIT = 64
CLIENTS = 150  # each held client costs lazyd one fd, each forwarded one two

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")


def _config(port: int, upstream: int, delay: float) -> str:
    return (
        "services:\n"
        "  web:\n"
        "    mode: proxy\n"
        f"    command: {program('backend.py', f'tcp:127.0.0.1:{upstream}', '--delay', delay)}\n"
        "    user: root\n"
        "    sockets:\n"
        f"      main: {{listen: 'tcp://127.0.0.1:{port}', upstream: 'tcp://127.0.0.1:{upstream}'}}\n"
    )



async def test_a_burst_past_the_fd_limit_during_a_cold_start_is_served(tmp_path: Path) -> None:
    """With RLIMIT_NOFILE 64, 150 clients at once during a 0.3 s cold start are all
    answered, none refused or reset; the start succeeds and lazyd answers status after."""
    port, upstream = free_port(), free_port()
    prlimit = [str(shutil.which("prlimit")), f"--nofile={LIMIT}:{LIMIT}"]
    async with run_lazyd(tmp_path, _config(port, upstream, 0.3), prefix=prlimit) as lz:
        with trio.fail_after(30):
            answers, failures = await burst(port, CLIENTS)
        assert failures == []
        assert all(answers[i].split(b" ", 1)[1] == b"request %d\n" % i for i in range(CLIENTS))
        # One start served them all: the spawner's reply still found an fd.
        assert len({a.split()[0] for a in answers.values()}) == 1
        await lz.wait_line(r"^web: ready in")
        # lazyd held back rather than take its last fds, and said so.
        await lz.wait_line(r"^web: near the open-file limit \(64\): new connections wait")
        status = (await lz.status())["web"]
        assert (status["state"], status["activations"]) == ("running", 1)
        # And it goes on working once the burst is over.
        with trio.fail_after(10):
            answers, failures = await burst(port, CLIENTS)
        assert failures == [] and len(answers) == CLIENTS
        assert len(re.findall(r"(?m)^web: near the open-file limit", lz.log())) <= 2
        await lz.wait_line(r"^web: every connection that waited for fds is accepted")
        assert "Traceback" not in lz.log()


async def test_the_fd_table_is_grown_once_at_start_up(tmp_path: Path) -> None:
    """Room for every fd lazyd may hold is made at start-up, not doubling by
    doubling under the first flood: in a process with threads each doubling
    waits out an RCU grace period (10-15 ms) inside accept(2), and a flood
    of connects overflowed the accept queue behind eight of them."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = int(Path("/proc/sys/fs/nr_open").read_text())
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, _config(port, upstream, 0.0)) as lz:
        status = Path(f"/proc/{lz.process.pid}/status").read_text()
        fd_size = int(re.search(r"(?m)^FDSize:\s+(\d+)", status)[1])  # type: ignore[index]
        assert fd_size >= min(hard, FD_TABLE)
