"""Services that are containers, end to end: a real lazyd (root, dropping its
privileges) in front of containers on a real Podman, reached through its
Docker-compatible API (`podman system service`), the containers made from
this host's own files.  Skipped, with scripts/podman-setup's reason, where
Podman cannot run."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyd import config as config_mod
from lazyd.backends.process.launch import table
from lazyd.backends.process.spawner import SpawnError, open_spawner
from lazyd.errors import ConfigError
from tests.backends.test_engine import podman_unavailable, start_service
from tests.conftest import PROGRAMS, free_port, run_lazyd
from tests.privileged.test_spawnerd import raw_spawner

WAIT = 10.0  # seconds any one thing may take before a test fails
SERVICE = PROGRAMS / "container_service.py"


@dataclass
class Podman:
    """The engine of this module and the containers it made (removed at the end)."""

    socket: Path
    run_id: str
    names: list[str] = field(default_factory=list)

    @property
    def engine(self) -> str:
        return f"unix:{self.socket}"

    def create(self, *options: str, command: tuple[str, ...]) -> str:
        """A new container (not started) running `command`, named uniquely."""
        name = f"lazyd-ct-{self.run_id}-{len(self.names)}"
        self.names.append(name)
        subprocess.run(
            ["podman", "create", "--name", name, "--cgroups=disabled", "--network", "host",
             *options, "--rootfs", "/:O", *command],
            check=True, capture_output=True, timeout=WAIT,
        )
        return name

    def echo(self, port: int, *options: str, udp: int | None = None) -> str:
        """A container running tests/programs/container_service.py on `port` (and `udp`)."""
        extra = () if udp is None else (str(udp),)
        return self.create(*options, command=("/usr/bin/python3", str(SERVICE), str(port),
                                              *extra))

    def inspect(self, name: str) -> dict[str, Any]:
        out = subprocess.run(["podman", "inspect", name], check=True, capture_output=True,
                             timeout=WAIT).stdout
        state: dict[str, Any] = json.loads(out)[0]["State"]
        return state


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    reason = podman_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("containers")
    path = tmp / "podman.sock"
    service = start_service(f"unix://{path}", tmp)
    found = Podman(path, f"{os.getpid()}-{secrets.token_hex(2)}")
    try:
        yield found
    finally:
        if found.names:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *found.names],
                           capture_output=True, timeout=60)
        service.terminate()
        service.wait(timeout=WAIT)


def container_service(
    name: str, container: str, engine: str, listen: int, upstream: int, *extra: str,
    udp: tuple[int, int] | None = None,
) -> str:
    """The config lines of one container service, on 127.0.0.1."""
    lines = [f"  {name}:", f"    container: {container}", f"    engine: {engine}",
             *(f"    {e}" for e in extra), "    sockets:",
             f"      tcp: {{listen: 'tcp://127.0.0.1:{listen}', "
             f"upstream: 'tcp://127.0.0.1:{upstream}'}}"]
    if udp is not None:
        lines.append(f"      udp: {{listen: 'udp://127.0.0.1:{udp[0]}', "
                     f"upstream: 'udp://127.0.0.1:{udp[1]}'}}")
    return "\n".join(lines) + "\n"


async def echo(port: int, payload: bytes) -> bytes:
    """Send `payload` over TCP, half-close, read the whole answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        chunks = []
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks)


async def unanswered(port: int, payload: bytes) -> bool:
    """Whether a held connection was closed (or reset) without an answer."""
    try:
        return await echo(port, payload) == b""
    except trio.BrokenResourceError:
        return True


def lazyd_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazyd", *args], capture_output=True,
                          text=True, timeout=WAIT)


# -- cold start, idle, outside kills ------------------------------------------------


async def test_cold_start_holds_every_connection_and_early_byte(
    podman: Podman, tmp_path: Path
) -> None:
    """Clients that connect and send before the container runs are all held and all
    answered, byte for byte; the start is recorded (spawn: the engine's answer);
    status shows the container's id and state; its output reaches lazyd's log."""
    up, port = free_port(), free_port()
    name = podman.echo(up)
    config = "services:\n" + container_service("wiki", name, podman.engine, port, up)
    async with run_lazyd(tmp_path, config) as lz:
        answers: dict[int, bytes] = {}

        async def client(n: int) -> None:
            answers[n] = await echo(port, f"early bytes {n}\n".encode() * 100)

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(client, n)
        assert answers == {n: f"early bytes {n}\n".encode() * 100 for n in range(50)}
        line = await lz.wait_line(r"^wiki: ready in")
        assert "spawn" in line and "readiness" in line
        await lz.wait_line(rf"^wiki: container listening on {up}$")
        status = await lz.wait_state("wiki", "running")
        container = status["container"]
        assert container["name"] == name and container["engine"] == podman.engine
        assert container["state"] == "running" and status["pid"] is None
        assert container["id"] == subprocess.run(
            ["podman", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
            check=True).stdout.strip()
        assert podman.inspect(name)["Running"]
    # lazyd stopped it on shutdown (its stop handles SIGTERM: exit 0).
    state = podman.inspect(name)
    assert not state["Running"] and state["ExitCode"] == 0


async def test_idle_stop_long_connection_and_reactivation(podman: Podman, tmp_path: Path) -> None:
    """A connection open past idle_timeout keeps the container running; once it is
    closed the container is stopped after idle_timeout; the next client starts it again."""
    up, port = free_port(), free_port()
    name = podman.echo(up)
    config = "services:\n" + container_service("wiki", name, podman.engine, port, up,
                                                "idle_timeout: 500ms", "stop_timeout: 5s")
    async with run_lazyd(tmp_path, config) as lz:
        with trio.fail_after(WAIT):
            long = await trio.open_tcp_stream("127.0.0.1", port)
            async with long:
                await long.send_all(b"one\n")
                assert await long.receive_some(100) == b"one\n"
                await trio.sleep(1.5)  # three idle timeouts, with a connection open
                assert (await lz.status())["wiki"]["state"] == "running"
                assert podman.inspect(name)["Running"]
                await long.send_all(b"still here\n")
                assert await long.receive_some(100) == b"still here\n"
            await lz.wait_line(r"^wiki: stopped \(idle\)")
            await lz.wait_state("wiki", "idle")
            assert not podman.inspect(name)["Running"]
            assert await echo(port, b"again\n") == b"again\n"
            await lz.wait_line(r"^wiki: ready in", count=2)
            assert podman.inspect(name)["Running"]


async def test_a_container_killed_outside_is_noticed_and_restarted(
    podman: Podman, tmp_path: Path
) -> None:
    """`podman kill` from outside: lazyd notices (the engine's events), holds the
    sockets again, and the next client starts the container and is answered."""
    up, port = free_port(), free_port()
    name = podman.echo(up)
    config = "services:\n" + container_service("wiki", name, podman.engine, port, up)
    async with run_lazyd(tmp_path, config) as lz:
        with trio.fail_after(WAIT):
            assert await echo(port, b"first\n") == b"first\n"
            await lz.wait_state("wiki", "running")
            subprocess.run(["podman", "kill", name], check=True, capture_output=True)
            await lz.wait_line(r"^wiki: exited with status 137")
            status = await lz.wait_state("wiki", "idle")
            assert status["container"]["state"] == "exited"
            assert await echo(port, b"second\n") == b"second\n"
            await lz.wait_line(r"^wiki: ready in", count=2)
            assert (await lz.status())["wiki"]["activations"] == 2


# -- readiness, failures -------------------------------------------------------------


async def test_ready_health_waits_for_the_containers_healthcheck(
    podman: Podman, tmp_path: Path
) -> None:
    """With ready: health the client is held until the container's own healthcheck
    passes (here 0.6 s after it listens), not merely until its port accepts."""
    up, port = free_port(), free_port()
    name = podman.echo(up, "--env", "LAZYD_TEST_HEALTH_AFTER=0.6",
                       "--health-cmd", "/usr/bin/test -e /tmp/healthy")
    config = "services:\n" + container_service("wiki", name, podman.engine, port, up,
                                                "ready: health")
    async with run_lazyd(tmp_path, config) as lz:
        with trio.fail_after(WAIT):
            assert await echo(port, b"healthy?\n") == b"healthy?\n"
        line = await lz.wait_line(r"^wiki: ready in")
        readiness = float(line.split("readiness ")[1].split(" ms")[0])
        assert readiness >= 600, line
        status = await lz.wait_state("wiki", "running")
        assert status["container"]["health"] == "healthy"
        assert any("wiki: healthcheck: unhealthy" in x or "healthcheck: starting" in x
                   for x in lz.lines), lz.log()


async def test_a_container_that_exits_at_start_reaches_failed(
    podman: Podman, tmp_path: Path
) -> None:
    """A container that exits at once is restarted per restart: on-failure until
    start_limit, then failed: the held client is closed, the next one refused."""
    port = free_port()
    name = podman.create(command=("/bin/false",))
    config = "services:\n" + container_service(
        "broken", name, podman.engine, port, free_port(), "restart: on-failure",
        "start_limit: 3", "start_limit_interval: 30s")
    async with run_lazyd(tmp_path, config) as lz:
        with trio.fail_after(WAIT):
            assert await unanswered(port, b"anyone?\n")
            await lz.wait_line(r"^broken: failed: 3 starts within 30 s")
            assert (await lz.status())["broken"]["state"] == "failed"
            assert len([x for x in lz.lines if "broken: exited with status 1" in x]) == 3
            # Reset at once: seen during the connect itself or at the first read,
            # whichever the reset beats.
            with pytest.raises((trio.BrokenResourceError, OSError)) as no:
                await echo(port, b"refused\n")
            assert "reset" in f"{no.value!r} {no.value.__cause__!r}", no.value


async def test_missing_container_and_unreachable_engine(podman: Podman, tmp_path: Path) -> None:
    """check and run name a missing container (exit 1); an engine that cannot be
    reached is an error to check, and to run a warning, then each start's reason."""
    missing = f"lazyd-ct-{podman.run_id}-nowhere"
    port = free_port()
    config = tmp_path / "missing.yaml"
    config.write_text("services:\n" + container_service("wiki", missing, podman.engine, port,
                                                        free_port()))
    expected = (f"{config}: services.wiki.container: no container named '{missing}' on "
                f"engine {podman.engine}")
    for command in ("check", "run"):
        result = lazyd_command(command, "-c", str(config))
        assert result.returncode == 1, result
        assert any(line.endswith(expected) for line in result.stderr.splitlines()), result

    gone = tmp_path / "no-engine.sock"
    config.write_text("services:\n" + container_service("wiki", "wiki", f"unix:{gone}", port,
                                                        free_port()))
    result = lazyd_command("check", "-c", str(config))
    unreachable = f"engine unix:{gone}: cannot connect: No such file or directory"
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"services.wiki.container: {unreachable}")
    async with run_lazyd(tmp_path, config.read_text()) as lz:
        await lz.wait_line(rf"warning.*services.wiki.container: {unreachable}|"
                           rf"services.wiki.container: {unreachable}")
        with trio.fail_after(WAIT):
            assert await unanswered(port, b"x\n")
        await lz.wait_line(rf"^wiki: cannot start container wiki: {unreachable}")


async def test_reload_adds_and_removes_container_services(podman: Podman, tmp_path: Path) -> None:
    """A reload that adds a container service holds and starts it; one that removes a
    running one stops its container; one that adds a missing container fails whole."""
    up_a, port_a, up_b, port_b = (free_port() for _ in range(4))
    first, second = podman.echo(up_a), podman.echo(up_b)
    a = container_service("a", first, podman.engine, port_a, up_a)
    b = container_service("b", second, podman.engine, port_b, up_b)
    async with run_lazyd(tmp_path, "services:\n" + a) as lz:
        with trio.fail_after(WAIT):
            assert await echo(port_a, b"to a\n") == b"to a\n"
            await lz.wait_state("a", "running")
            config = tmp_path / "lazyd.yaml"
            head = config.read_text().split("services:")[0]
            missing = container_service("c", f"lazyd-ct-{podman.run_id}-nowhere",
                                        podman.engine, free_port(), free_port())
            config.write_text(head + "services:\n" + a + missing)
            lz.process.send_signal(signal.SIGHUP)
            await lz.wait_line(r"lazyd: reload: .*services.c.container: no container named")
            await lz.wait_line(r"reload failed")
            config.write_text(head + "services:\n" + b)
            lz.process.send_signal(signal.SIGHUP)
            await lz.wait_line(rf"lazyd: reloaded {config}")
            await lz.wait_line(r"^a: stopped \(removed by reload\)")
            assert not podman.inspect(first)["Running"]
            assert await echo(port_b, b"to b\n") == b"to b\n"
            await lz.wait_state("b", "running")


# -- datagrams -----------------------------------------------------------------------


async def test_udp_through_a_container_service(podman: Podman, tmp_path: Path) -> None:
    """Datagrams sent before the container runs are held and delivered; the replies
    come back to the client from lazyd's socket."""
    up, port = free_port(), free_port()
    up_udp, port_udp = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    name = podman.echo(up, udp=up_udp)
    config = "services:\n" + container_service("dns", name, podman.engine, port, up,
                                                udp=(port_udp, up_udp))
    async with run_lazyd(tmp_path, config) as lz:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client, \
                trio.fail_after(WAIT):
            await client.connect(("127.0.0.1", port_udp))
            for n in range(5):
                await client.send(f"query {n}".encode())
            replies = {await client.recv(100) for _ in range(5)}
            assert replies == {f"udp query {n}".encode() for n in range(5)}
        await lz.wait_line(r"^dns: ready in")


# -- the privileged helper -------------------------------------------------------------


async def test_the_helper_acts_only_on_the_containers_of_its_table(
    podman: Podman, tmp_path: Path
) -> None:
    """Against the real helper, what a taken-over daemon could ask: a container op on
    a service that is not in the table, or not a container, a spawn of a container,
    a define after the seal, a container named in the request: all refused, and a
    container outside the table is never touched; the table's own still starts."""
    up = free_port()
    ours, stranger = podman.echo(up), podman.echo(free_port())
    path = tmp_path / "lazyd.yaml"
    path.write_text(
        "services:\n" + container_service("wiki", ours, podman.engine, free_port(), up)
        + f"  plain:\n    command: /bin/true\n    user: root\n"
        f"    sockets: {{http: 'tcp://127.0.0.1:{free_port()}'}}\n"
    )
    config = config_mod.load(str(path))
    with trio.fail_after(WAIT):
        async with open_spawner() as spawner:
            await spawner.define(table(config), seal=True)
            refused = [
                (spawner.container(stranger, "start"), f"unknown service {stranger!r}"),
                (spawner.container("plain", "stop", timeout=0), "service 'plain' is not a "
                 "container"),
                (spawner.spawn("wiki"), "service 'wiki' is a container: it is not spawned"),
                (spawner.define({"evil": {"kind": "container", "container": stranger,
                                          "engine": podman.engine, "tls": None}}),
                 "the table of services is sealed"),
            ]
            for request, message in refused:
                with pytest.raises(SpawnError) as caught:
                    await request
                assert caught.value.stage == "request"
                assert message in str(caught.value)
            run = await spawner.start_container("wiki")
            assert podman.inspect(ours)["Running"]
            await spawner.container("wiki", "stop", timeout=5)
            assert await run.wait() == 0
            await run.output.aclose()
        async with raw_spawner() as raw:
            reply, _ = await raw.request({"op": "define", "services": table(config),
                                          "seal": True})
            assert reply.get("ok"), reply
            for forged, message in [
                ({"op": "container", "service": "wiki", "action": "start", "timeout": None,
                  "signal": None, "container": stranger}, "unknown field"),
                ({"op": "container", "service": "wiki", "action": "exec", "timeout": None,
                  "signal": None}, "action must be one of"),
                ({"op": "create", "service": "wiki"}, "unknown op"),
            ]:
                reply, _ = await raw.request(forged)
                assert message in reply["error"], (forged, reply)
    assert podman.inspect(stranger)["Status"] == "created"


# -- the config ------------------------------------------------------------------------


def test_container_config_errors_say_why() -> None:
    """A container service is proxy mode by default; pass mode, a command, a process's
    keys, ready: notify, engine_tls on a unix engine are refused saying why, and
    ready: health is for containers only."""
    base = ("services:\n  wiki:\n    container: wiki\n    sockets:\n      http: "
            "{listen: 'tcp://127.0.0.1:18080', upstream: 'tcp://127.0.0.1:18081'}\n")
    wiki = config_mod.loads(base + "    ready: health\n", as_root=True).services["wiki"]
    assert (wiki.mode, wiki.container, wiki.engine, str(wiki.ready)) == (
        config_mod.Mode.PROXY, "wiki", None, "health")
    for extra, message in [
        ("    mode: pass\n", "services.wiki.mode: a container service is mode: proxy: the "
         "engine's API cannot hand a container lazyd's listening sockets"),
        ("    command: /bin/true\n", "services.wiki.command: command does not apply to a "
         "container: command and container are exclusive"),
        ("    user: nobody\n", "services.wiki.user: user does not apply to a container"),
        ("    ready: notify\n", "services.wiki.ready: ready: notify does not apply to a container"),
        ("    engine: unix:/run/podman/podman.sock\n    engine_tls: {ca: /a, cert: /b, key: /c}\n",
         "services.wiki.engine_tls: engine_tls applies to a tcp:// engine"),
        ("    engine: http://host\n", "services.wiki.engine: bad engine 'http://host'"),
    ]:
        with pytest.raises(ConfigError) as caught:
            config_mod.loads(base + extra, as_root=True)
        assert message in str(caught.value), (extra, str(caught.value))
    with pytest.raises(ConfigError, match="ready: health only applies to a container"):
        config_mod.loads("services:\n  x:\n    command: /bin/true\n    user: root\n"
                         "    ready: health\n    sockets: {a: 'tcp://127.0.0.1:1234'}\n")
