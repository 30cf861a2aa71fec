"""lazyd under systemd: inherited sockets, and readiness reported to its supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from lazyd.readiness.notify import open_notify_socket
from tests.conftest import ROOT, free_port, needs, program, run_lazyd

CONF = ROOT / "conf"


@asynccontextmanager
async def socket_activated(
    config: Path, listen: Sequence[int], names: str, *env: str
) -> AsyncIterator[trio.Process]:
    """lazyd run under systemd-socket-activate, which binds `listen` (127.0.0.1 ports)
    as fds named `names` and execs lazyd on the first connection; killed if still
    running at the end."""
    command = ["systemd-socket-activate"]
    for port in listen:
        command += ["-l", f"127.0.0.1:{port}"]
    command += [f"--fdname={names}", "-E", f"PATH={os.environ['PATH']}"]
    for variable in env:
        command += ["-E", variable]
    command += [sys.executable, "-m", "lazyd", "run", "-c", str(config)]
    activate = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield activate
    finally:
        if activate.returncode is None:
            os.killpg(activate.pid, signal.SIGKILL)
            await activate.wait()


async def first_connection(port: int) -> socket.socket:
    """Connect once systemd-socket-activate listens (it binds right after it starts)."""
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:  # not listening yet
            await trio.sleep(0.01)


async def early_line(client: socket.socket) -> bytes:
    """Send "early", half-close, and read the whole answer."""
    with client:
        client.sendall(b"early\n")
        client.shutdown(socket.SHUT_WR)
        return await trio.to_thread.run_sync(client.makefile("rb").read)


async def stderr_of(process: trio.Process) -> str:
    """All a process wrote to its stderr pipe, once it has closed it."""
    assert process.stderr is not None
    data = b""
    while chunk := await process.stderr.receive_some(1 << 16):
        data += chunk
    return data.decode()


@needs("systemd-socket-activate")
async def test_lazyd_started_by_systemd_socket_activate_uses_the_inherited_socket(
    tmp_path: Path,
) -> None:
    """systemd-socket-activate binds the port and starts lazyd on the first connection;
    lazyd adopts the socket named web.http (binding it again would fail: no
    SO_REUSEPORT), starts its service, and the early client is answered.  lazyd reports
    READY=1 and, on SIGTERM, STOPPING=1 to its own NOTIFY_SOCKET."""
    port = free_port()
    config = tmp_path / "lazyd.yaml"
    config.write_text(
        f"control: unix:{tmp_path / 'control.sock'}\n"
        "services:\n"
        "  web:\n"
        f"    command: {program('serve_lines.py', 0)}\n"
        "    user: root\n"
        "    sockets:\n"
        f"      http: tcp://127.0.0.1:{port}\n"
    )
    with open_notify_socket("lazyd-test") as notify:
        async with socket_activated(config, [port], "web.http",
                                    f"NOTIFY_SOCKET={notify.address}") as activate:
            with trio.fail_after(20):
                # systemd-socket-activate execs lazyd on the first connection.
                answer = await early_line(await first_connection(port))
                assert answer.endswith(b" early\n")
                ready = await notify.receive()
                assert ready.ready and ready.pid == activate.pid  # lazyd is the exec'd process
                activate.send_signal(signal.SIGTERM)
                stopping = await notify.receive()
                assert stopping.stopping
                assert await activate.wait() == 0
            log = await stderr_of(activate)
            adopted = "lazyd: using the inherited socket 'web.http' for services.web.sockets.http"
            assert adopted in log


def test_example_units_name_configured_sockets() -> None:
    """conf/lazyd.socket names its socket SERVICE.SOCKET of the example config, and
    conf/lazyd.service is Type=notify running `lazyd run`."""
    unit = (CONF / "lazyd.socket").read_text()
    assert "FileDescriptorName=blog.http" in unit and "ListenStream=0.0.0.0:80" in unit
    assert "http: tcp://0.0.0.0:80" in (CONF / "blog.yaml").read_text()
    service = (CONF / "lazyd.service").read_text()
    assert "Type=notify" in service and "lazyd run -c" in service


@needs("systemd-socket-activate")
async def test_a_notify_proxy_service_started_by_an_inherited_waiting_client_gets_its_socket(
    tmp_path: Path,
) -> None:
    """lazyd socket-activated with a client already waiting on its first inherited socket:
    that socket's proxy accepts the client the moment it runs, before the second proxy
    runs, and the `ready: notify` service it starts finds NOTIFY_SOCKET in its
    environment, says READY=1 and serves the client."""
    port, upstream, other = free_port(), free_port(), free_port()
    config = tmp_path / "lazyd.yaml"
    config.write_text(
        f"control: unix:{tmp_path / 'control.sock'}\n"
        "services:\n"
        "  web:\n"
        "    mode: proxy\n"
        f"    command: {program('backend.py', f'tcp:127.0.0.1:{upstream}', '--notify')}\n"
        "    user: root\n"
        "    ready: notify\n"
        "    start_timeout: 10s\n"
        "    sockets:\n"
        f"      http: {{listen: 'tcp://127.0.0.1:{port}', upstream: 'tcp://127.0.0.1:{upstream}'}}\n"
        f"      other: {{listen: 'tcp://127.0.0.1:{other}', upstream: 'tcp://127.0.0.1:{upstream}'}}\n"
    )
    async with socket_activated(config, [port, other], "web.http:web.other",
                                "LAZYD_STRICT=1") as activate:
        with trio.fail_after(20):
            answer = await early_line(await first_connection(port))
            activate.send_signal(signal.SIGTERM)
            assert await activate.wait() == 0
        log = await stderr_of(activate)
        assert "no NOTIFY_SOCKET" not in log, log
        assert answer.endswith(b" early\n"), log
        assert "web: ready in" in log and "Traceback" not in log, log


async def test_readiness_reaches_a_supervisor_socket_the_dropped_user_cannot(
    tmp_path: Path,
) -> None:
    """lazyd run as root with NOTIFY_SOCKET in a root-only directory: it drops to nobody,
    and still tells its supervisor READY=1 once it holds its sockets, RELOADING=1 and
    READY=1 around a reload, and STOPPING=1 on SIGTERM."""
    private = tmp_path / "supervisor"
    private.mkdir(mode=0o700)
    path = str(private / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as supervisor:
        supervisor.bind(path)
        supervisor.settimeout(10)
        config = "services:\n" + _line_service(free_port())
        async with run_lazyd(tmp_path, config, env={"NOTIFY_SOCKET": path}) as lz:
            assert (await trio.to_thread.run_sync(supervisor.recv, 4096)).startswith(b"READY=1")
            assert "lazyd: dropped privileges" in lz.log()
            lz.process.send_signal(signal.SIGHUP)
            reloading = await trio.to_thread.run_sync(supervisor.recv, 4096)
            assert reloading.startswith(b"RELOADING=1\nMONOTONIC_USEC=")
            assert await trio.to_thread.run_sync(supervisor.recv, 4096) == b"READY=1"
            await lz.wait_line(r"^lazyd: reloaded ")
        assert await trio.to_thread.run_sync(supervisor.recv, 4096) == b"STOPPING=1"
        assert "could not tell the supervisor" not in lz.log(), lz.log()


async def test_a_supervisor_socket_that_cannot_be_reached_is_said_once(tmp_path: Path) -> None:
    """NOTIFY_SOCKET naming nothing: lazyd says at start-up that its supervisor will not
    learn it is ready, then serves as usual."""
    port = free_port()
    missing = str(tmp_path / "nobody-listens-here")
    config = "services:\n" + _line_service(port)
    async with run_lazyd(tmp_path, config, env={"NOTIFY_SOCKET": missing}) as lz:
        await lz.wait_line(rf"^lazyd: cannot reach the supervisor's NOTIFY_SOCKET {missing}: ")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"hi\n")
            client.shutdown(socket.SHUT_WR)
            assert (await trio.to_thread.run_sync(client.makefile("rb").read)).endswith(b" hi\n")


def _line_service(port: int) -> str:
    return (
        "  web:\n"
        f"    command: {program('serve_lines.py', 0)}\n"
        "    user: root\n"
        "    sockets:\n"
        f"      http: tcp://127.0.0.1:{port}\n"
    )


@needs("systemd-socket-activate")
async def test_an_inherited_socket_bound_elsewhere_than_the_config_says_fails_at_start(
    tmp_path: Path,
) -> None:
    """A socket passed as web.http but bound to another address than the config's: lazyd
    refuses to start (exit 1) and says where the socket is bound, instead of adopting it
    and failing every start of the service later."""
    port, other = free_port(), free_port()
    config = tmp_path / "lazyd.yaml"
    config.write_text(f"control: unix:{tmp_path / 'control.sock'}\nservices:\n"
                      + _line_service(other))
    async with socket_activated(config, [port], "web.http") as activate:
        with trio.fail_after(20):
            (await first_connection(port)).close()
            log = await stderr_of(activate)
            assert await activate.wait() == 1
        assert (f"services.web.sockets.http (tcp://127.0.0.1:{other}): the inherited socket "
                f"is bound to 127.0.0.1:{port}") in log
