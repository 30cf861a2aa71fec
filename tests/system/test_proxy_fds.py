"""A proxied service is handed none of lazyd's sockets: every client comes through lazyd."""

from __future__ import annotations

import os
import re
from pathlib import Path

import trio

from tests.conftest import LazydProcess, free_port, program, run_lazyd

TIMEOUT = 10.0  # seconds; bounds each step
ATTEMPTS = 20  # connections tried per rule: with the port shared, some would bypass lazyd


def _config(port: int, upstream: int) -> str:
    return (
        "services:\n"
        "  web:\n"
        "    mode: proxy\n"
        f"    command: {program('serve_inherited.py', f'127.0.0.1:{upstream}')}\n"
        "    user: root\n"
        "    max_connections_per_source: 2\n"
        "    sockets:\n"
        f"      main: {{listen: 'tcp://127.0.0.1:{port}', upstream: 'tcp://127.0.0.1:{upstream}',"
        " deny: [127.0.0.2]}\n"
    )


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds (from /proc/PID/fd)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if match := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(int(match[1]))
    return inodes


def _listening_inodes(port: int) -> set[int]:
    """The inodes of the TCP sockets listening on 127.0.0.1:`port` (from /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # TCP_LISTEN
            inodes.add(int(fields[9]))
    return inodes


async def _connect(port: int, source: str) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _greeting(sock: trio.socket.SocketType) -> bytes:
    """What the service says first ("upstream" or "inherited"); b"" if lazyd refused it."""
    with trio.fail_after(TIMEOUT):
        try:
            return await sock.recv(100)
        except ConnectionResetError:
            return b""


async def _refused(port: int, source: str) -> list[bytes]:
    """Try ATTEMPTS connections from `source`; what each got (b"": refused by lazyd)."""
    got = []
    for _ in range(ATTEMPTS):
        try:
            sock = await _connect(port, source)
        except ConnectionResetError:
            got.append(b"")
            continue
        with sock:
            got.append(await _greeting(sock))
    return got


async def _service_pid(lz: LazydProcess) -> int:
    svc = await lz.wait_state("web", "running")
    pid: int = svc["pid"]
    return pid


async def test_a_proxied_service_is_reached_only_through_lazyd(tmp_path: Path) -> None:
    """A proxied service that would serve inherited sockets holds none of lazyd's: a denied
    client is refused, max_connections_per_source holds, every client comes via upstream."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, _config(port, upstream)) as lz:
        held = [await _connect(port, "127.0.0.1")]
        try:
            assert await _greeting(held[0]) == b"upstream\n"
            pid = await _service_pid(lz)
            listening = _listening_inodes(port)
            assert listening & _socket_inodes(lz.process.pid), "lazyd holds its listener"
            assert not listening & _socket_inodes(pid), "the service holds lazyd's listener"
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [v for v in env if v.startswith(b"LISTEN_")]
            assert await _refused(port, "127.0.0.2") == [b""] * ATTEMPTS
            held.append(await _connect(port, "127.0.0.1"))
            assert await _greeting(held[1]) == b"upstream\n"
            # Two from 127.0.0.1 are open: the limit refuses every further one.
            assert await _refused(port, "127.0.0.1") == [b""] * ATTEMPTS
            assert (await lz.status())["web"]["active"] == 2
        finally:
            for sock in held:
                sock.close()
