"""The kernel data path in the real daemon (root, the real kernel): once a proxied
service is ready, new connections go straight into its own listening socket."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Awaitable
from pathlib import Path

import pytest
import trio

from lazyd.backends.process.spawner import SpawnError, open_spawner
from lazyd.datapath.bpf import diag, supported
from lazyd.privileged import entries
from tests.conftest import (
    PROGRAMS,
    PY,
    LazydProcess,
    alive,
    free_port,
    program,
    proxy_service,
    run_lazyd,
)

pytestmark = pytest.mark.skipif(
    supported() is not None, reason=f"no kernel data path here: {supported()}"
)


def _service(name: str, listen: str, upstream: int, *extra: str, delay: float = 0.0,
             host: str = "127.0.0.1") -> str:
    command = program("backend.py", f"tcp:{host}:{upstream}", "--delay", delay)
    return proxy_service(name, command, listen, f"tcp://{host}:{upstream}", *extra)


def _kernel(name: str, port: int, upstream: int, *extra: str, delay: float = 0.0,
            host: str = "127.0.0.1") -> str:
    return _service(name, f"tcp://{host}:{port}", upstream, "datapath: kernel", *extra,
                    delay=delay, host=host)


def _ask(port: int, line: bytes = b"hello\n", host: str = "127.0.0.1",
         keep: bool = False) -> tuple[bytes, socket.socket | None]:
    """One line to a backend.py service: its answer, and the socket if `keep`."""
    sock = socket.create_connection((host, port), timeout=10)
    try:
        assert sock.getpeername() == (host, port)  # what the client dialled, either path
        sock.sendall(line)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, "closed before the answer"
            answer += chunk
    except BaseException:
        sock.close()
        raise
    if keep:
        return answer, sock
    sock.close()
    return answer, None


async def ask(port: int, line: bytes = b"hello\n", host: str = "127.0.0.1") -> bytes:
    answer, _ = await trio.to_thread.run_sync(_ask, port, line, host)
    return answer


async def _steered_start(lz: LazydProcess, name: str, port: int, host: str = "127.0.0.1",
                         count: int = 1) -> int:
    """Start `name` with a first (held) connection; wait for its steering; its pid."""
    answer = await ask(port, b"first\n", host)
    await lz.wait_line(rf"^{name}: kernel data path: new connections to", count=count)
    pid = int(answer.split()[0])
    assert answer == b"%d first\n" % pid
    return pid


async def test_a_warm_service_accepts_new_connections_itself(tmp_path: Path) -> None:
    """Once ready, a new connection to lazyd's port is accepted by the service's own
    socket: the client still sees lazyd's address, lazyd forwards nothing of it
    (no active connection, bytes unknown) and counts it as steered, in status,
    metrics and analyze."""
    port, upstream, metrics = free_port(), free_port(), free_port()
    config = f"metrics: tcp://127.0.0.1:{metrics}\nservices:\n" + _kernel("web", port, upstream)
    async with run_lazyd(tmp_path, config) as lz:
        pid = await _steered_start(lz, "web", port)
        assert "lazyd: dropped privileges: running as user" in lz.log()
        answer, sock = await trio.to_thread.run_sync(lambda: _ask(port, keep=True))
        assert sock is not None
        with sock:
            assert answer == b"%d hello\n" % pid
            assert sock.getpeername() == ("127.0.0.1", port)
            svc = (await lz.status())["web"]
            assert svc["datapath"] == "kernel" and svc["steering"] is True
            assert svc["steered"] == 1
            assert svc["active"] == 0  # not through lazyd
            assert svc["bytes_in"] is None and svc["bytes_out"] is None
            # The service's own socket holds the connection, not lazyd's.
            inode = _accepted_inode(port, sock.getsockname())
            assert diag.fd_of_inode(pid, inode) is not None
            assert diag.fd_of_inode(lz.process.pid, inode) is None
        exposition = await trio.to_thread.run_sync(_get_metrics, metrics)
        assert 'lazyd_steered_connections_total{service="web"} 1.0' in exposition
        assert 'lazyd_datapath{datapath="kernel",service="web"} 1.0' in exposition
        assert 'lazyd_bytes_forwarded_total{direction="in",service="web"}' not in exposition
        for argv, line in ((["status"], "web: kernel data path, steering new connections, "
                                        "1 connection steered"),
                           (["analyze", "blame"], "  web: 1 connection steered")):
            shown = await trio.run_process([PY, "-m", "lazyd", *argv, "--control",
                                            lz.control_path], capture_stdout=True)
            assert line in shown.stdout.decode().splitlines()


def _get_metrics(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def _accepted_inode(port: int, client: tuple[str, int]) -> int:
    """The inode of the accepted socket of the connection from `client` to `port`."""
    inodes = [s.inode for s in diag._dump(socket.AF_INET, 1 << diag.TCP_ESTABLISHED, b"")
              if s.local[1] == port and s.remote == client]
    assert len(inodes) == 1
    return inodes[0]


async def test_connections_held_during_the_cold_start_are_answered(tmp_path: Path) -> None:
    """Twenty clients that connect while the service takes 0.3 s to bind are all
    answered (lazyd holds and forwards them); the next one is steered."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + _kernel("slow", port, upstream, delay=0.3)
    async with run_lazyd(tmp_path, config) as lz:
        answers: list[bytes] = []

        async def client(i: int) -> None:
            answers.append(await ask(port, b"held %d\n" % i))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(client, i)
        assert sorted(a.split(b" ", 1)[1] for a in answers) == sorted(
            b"held %d\n" % i for i in range(20))
        await lz.wait_line(r"^slow: kernel data path: new connections to")
        svc = (await lz.status())["slow"]
        assert svc["steered"] == 0 and svc["activations"] == 1
        await ask(port)
        assert (await lz.status())["slow"]["steered"] == 1


async def test_idle_stop_sees_steered_connections(tmp_path: Path) -> None:
    """With idle_timeout 0.4 s, an open steered connection keeps the service running
    past several timeouts; once it closes, the service is stopped, and the next
    connection is held by lazyd again and starts it anew."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + _kernel("idle", port, upstream, "idle_timeout: 400ms")
    async with run_lazyd(tmp_path, config) as lz:
        pid = await _steered_start(lz, "idle", port)
        answer, sock = await trio.to_thread.run_sync(lambda: _ask(port, keep=True))
        assert sock is not None and answer.startswith(b"%d " % pid)
        with sock:
            await trio.sleep(1.5)
            assert (await lz.status())["idle"]["state"] == "running"
            sock.sendall(b"still here\n")
            assert sock.recv(100) == b"%d still here\n" % pid
        with trio.fail_after(3):
            await lz.wait_line(r"^idle: stopping \(idle\)|^idle: .*idle")
        await lz.wait_state("idle", "idle")
        assert not (await lz.status())["idle"]["steering"]
        again = await ask(port, b"again\n")
        assert again.endswith(b" again\n") and int(again.split()[0]) != pid
        await lz.wait_line(r"^idle: kernel data path: new connections to", count=2)


async def test_a_service_that_listens_anew_is_steered_into_its_new_listener(
    tmp_path: Path,
) -> None:
    """A service that replaces its listening socket (iperf3 does, after each test):
    the entry leaves the map with the old socket, the next connection reaches
    lazyd, which forwards it and takes the new listener, so the one after goes
    straight to the service again."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, "services:\n" + _kernel("anew", port, upstream)) as lz:
        pid = await _steered_start(lz, "anew", port)
        assert await ask(port, b"listen anew\n") == b"%d listen anew\n" % pid
        # The old listener is gone: lazyd answers this one itself ...
        assert await ask(port, b"through lazyd\n") == b"%d through lazyd\n" % pid
        steered = (await lz.status())["anew"]["steered"]
        assert steered == 1
        # ... and the next goes to the new listener, accepted by the service.
        answer, sock = await trio.to_thread.run_sync(lambda: _ask(port, keep=True))
        assert sock is not None
        with sock:
            assert answer == b"%d hello\n" % pid
            inode = _accepted_inode(port, sock.getsockname())
            assert diag.fd_of_inode(pid, inode) is not None
            assert diag.fd_of_inode(lz.process.pid, inode) is None
            svc = (await lz.status())["anew"]
            assert svc["steered"] == 2 and svc["steering"] is True
        assert "cannot take the service's listener again" not in lz.log()


async def test_a_service_without_a_listener_is_not_asked_again_for_each_client(
    tmp_path: Path,
) -> None:
    """A steered service that stops listening on its way out: lazyd cannot take a
    listener, says so once, and the clients that arrive meanwhile are answered by
    the next start, through lazyd, without lazyd spinning on refused connects."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, "services:\n" + _kernel("going", port, upstream)) as lz:
        pid = await _steered_start(lz, "going", port)
        assert await ask(port, b"stop listening\n") == b"%d stop listening\n" % pid
        answers = await gather(*(ask(port, b"later %d\n" % i) for i in range(3)))
        for i, answer in enumerate(answers):
            new_pid = int(answer.split()[0])
            assert new_pid != pid and answer == b"%d later %d\n" % (new_pid, i)
        log = lz.log()
        assert log.count("cannot take the service's listener again") == 1
        # Refused while lazyd still thought it ready: tried again every 50 ms
        # for the 0.5 s until the exit, not at every turn of the event loop.
        failures = re.search(r"works again \((\d+) failures in a row\)", log)
        assert failures is not None and int(failures.group(1)) <= 60, failures


async def gather(*calls: Awaitable[bytes]) -> list[bytes]:
    results: list[bytes] = [b""] * len(calls)

    async def one(i: int, call: Awaitable[bytes]) -> None:
        results[i] = await call

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    return results


async def test_a_crashed_service_falls_back_to_lazyd_and_is_steered_again(
    tmp_path: Path,
) -> None:
    """SIGKILL of a steered service: the next connection is held by lazyd (not sent to
    a dead socket), starts the service again, and the daemon (no longer root) puts
    the new listener in the map."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, "services:\n" + _kernel("crash", port, upstream)) as lz:
        pid = await _steered_start(lz, "crash", port)
        await ask(port)
        os.kill(pid, signal.SIGKILL)
        await lz.wait_line(r"^crash: exited|^crash: .*killed by")
        answer = await ask(port, b"after\n")
        new_pid = int(answer.split()[0])
        assert new_pid != pid and answer == b"%d after\n" % new_pid
        await lz.wait_line(r"^crash: kernel data path: new connections to", count=2)
        assert (await ask(port)).startswith(b"%d " % new_pid)
        svc = (await lz.status())["crash"]
        assert svc["steered"] == 2 and svc["activations"] == 2
        assert _uid_of(lz.process.pid) != 0


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _refused(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a connection to the port is refused (nothing listens, nothing steers)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        pass  # accepted into a listener's queue as lazyd closed it: not refused yet
    return False


async def test_shutdown_leaves_no_steering(tmp_path: Path) -> None:
    """After lazyd exits, a new connection to its port is refused, not steered."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, "services:\n" + _kernel("web", port, upstream)) as lz:
        await _steered_start(lz, "web", port)
        await ask(port)
    assert lz.returncode == 0
    assert _refused(port)


async def test_reload_removes_the_steering_before_stopping(tmp_path: Path) -> None:
    """A reload that moves the service to the userspace path stops it with its entry
    removed: the next connection is held by lazyd, forwarded by it (its bytes
    counted), and nothing is steered; a reload removing it leaves its port refused."""
    port, upstream = free_port(), free_port()
    async with run_lazyd(tmp_path, "services:\n" + _kernel("web", port, upstream)) as lz:
        pid = await _steered_start(lz, "web", port)
        config = tmp_path / "lazyd.yaml"
        config.write_text(config.read_text().replace("datapath: kernel", "datapath: userspace"))
        lz.process.send_signal(signal.SIGHUP)
        await lz.wait_line(r"^lazyd: reloaded")
        with trio.fail_after(10):
            while alive(pid):  # the reload stops it (and starts it again: it was running)
                await trio.sleep(0.02)
        answer = await ask(port, b"userspace\n")
        assert answer.endswith(b" userspace\n") and int(answer.split()[0]) != pid
        svc = (await lz.status())["web"]
        assert svc["datapath"] == "userspace" and svc["steered"] is None
        assert svc["bytes_in"] == len(b"userspace\n")
        # Back to the kernel path, then removed altogether.
        config.write_text(config.read_text().replace("datapath: userspace", "datapath: kernel"))
        lz.process.send_signal(signal.SIGHUP)
        await lz.wait_line(r"^lazyd: reloaded", count=2)
        await _steered_start(lz, "web", port, count=2)
        other = free_port()
        config.write_text(config.read_text().split("services:")[0] + "services:\n"
                          + _service("other", f"tcp://127.0.0.1:{other}", free_port()))
        lz.process.send_signal(signal.SIGHUP)
        await lz.wait_line(r"^lazyd: reloaded", count=3)
        await lz.wait_line(r"^web: stopped \(removed by reload\)")
        with trio.fail_after(5):
            while not _refused(port):
                await trio.sleep(0.05)


async def test_same_port_on_two_addresses_goes_to_two_services(tmp_path: Path) -> None:
    """Two kernel-path services on port P of 127.0.0.1 and of 127.0.0.2 each get
    their own connections."""
    port, upstream_a, upstream_b = free_port(), free_port(), free_port()
    config = ("services:\n" + _kernel("a", port, upstream_a)
              + _kernel("b", port, upstream_b, host="127.0.0.2"))
    async with run_lazyd(tmp_path, config) as lz:
        pid_a = await _steered_start(lz, "a", port)
        pid_b = await _steered_start(lz, "b", port, host="127.0.0.2")
        assert pid_a != pid_b
        for _ in range(3):
            assert (await ask(port)).startswith(b"%d " % pid_a)
            assert (await ask(port, host="127.0.0.2")).startswith(b"%d " % pid_b)
        services = await lz.status()
        assert services["a"]["steered"] == 3 and services["b"]["steered"] == 3


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "check.yaml"
    config.write_text(text)
    return subprocess.run([PY, "-m", "lazyd", "check", "-c", str(config)],
                          capture_output=True, text=True, check=False)


def test_kernel_with_what_it_cannot_honour_is_a_config_error(tmp_path: Path) -> None:
    """datapath: kernel with a PROXY protocol header, allow rules or an explicit
    per-source limit is refused by `lazyd check`, pointing at the key, saying why."""
    port, upstream = free_port(), free_port()
    text = "services:\n" + _service(
        "web", f"tcp://127.0.0.1:{port}", upstream, "datapath: kernel",
        "max_connections_per_source: 10",
    ).replace("upstream: ", "proxy_protocol: v2, upstream: ")
    result = _check(tmp_path, text)
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert all(re.search(r"check\.yaml:\d+:\d+: services\.web\.datapath: the kernel data path "
                         r"cannot be used: ", e) for e in errors), errors
    assert "max_connections_per_source is set" in errors[0]
    assert "socket main sends a PROXY protocol header" in errors[1]


async def test_kernel_without_root_is_a_start_up_error(tmp_path: Path) -> None:
    """lazyd run as an unprivileged user with a datapath: kernel service exits 1,
    saying that loading the program needs root, and holds nothing."""
    port, upstream = free_port(), free_port()
    config = tmp_path / "lazyd.yaml"
    config.write_text(f"control: unix:{tmp_path}/control.sock\nservices:\n"
                      + proxy_service("web", "[/bin/sleep, '100']", f"tcp://127.0.0.1:{port}",
                                      f"tcp://127.0.0.1:{upstream}", "datapath: kernel")
                      .replace("    user: root\n", ""))
    os.chmod(tmp_path, 0o777)
    result = await trio.run_process(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         PY, "-m", "lazyd", "run", "-c", str(config)],
        capture_stderr=True, check=False, cwd=str(tmp_path))
    assert result.returncode == 1
    assert "services.web.datapath: kernel: loading the BPF program needs root" in (
        result.stderr.decode())
    assert _refused(port)


async def test_auto_falls_back_with_one_line_and_a_plan_line(tmp_path: Path) -> None:
    """datapath: auto with allow rules stays on the userspace path: `check` says so in
    the plan, the daemon says it once, and forwards the connection itself."""
    port, upstream = free_port(), free_port()
    text = "services:\n" + _service(
        "web", f"tcp://127.0.0.1:{port}", upstream, "datapath: auto",
    ).replace("upstream: ", "allow: [127.0.0.0/8], upstream: ")
    result = _check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert ("  datapath: auto -> userspace (socket main has allow/deny rules)"
            in result.stdout.splitlines())
    async with run_lazyd(tmp_path, text) as lz:
        answer = await ask(port)
        await ask(port)
        assert answer.endswith(b" hello\n")
        svc = (await lz.status())["web"]
        assert svc["datapath"] == "userspace" and svc["bytes_in"] == 2 * len(b"hello\n")
        lines = [line for line in lz.lines if "datapath auto" in line]
        assert lines == ["web: datapath auto: using the userspace path: socket main has "
                         "allow/deny rules"]


async def test_auto_uses_the_kernel_path_where_it_can(tmp_path: Path) -> None:
    """datapath: auto with nothing in the way is steered, and says nothing about it
    beyond the steering line."""
    port, upstream = free_port(), free_port()
    config = "services:\n" + _service("web", f"tcp://127.0.0.1:{port}", upstream,
                                      "datapath: auto")
    async with run_lazyd(tmp_path, config) as lz:
        await _steered_start(lz, "web", port)
        await ask(port)
        assert (await lz.status())["web"]["steered"] == 1
        assert "datapath auto" not in lz.log()


async def test_a_reload_cannot_add_the_first_kernel_service(tmp_path: Path) -> None:
    """Started with no service on the kernel path, lazyd has no steering (it is set up
    before the privilege drop only): a reload adding a `kernel` service fails saying
    so and changes nothing; one adding an `auto` service applies, and says once why
    it uses the userspace path."""
    port, upstream, other = free_port(), free_port(), free_port()
    first = "services:\n" + _service("web", f"tcp://127.0.0.1:{port}", upstream)
    async with run_lazyd(tmp_path, first) as lz:
        config = tmp_path / "lazyd.yaml"
        head = config.read_text().split("services:")[0]
        config.write_text(head + first + _kernel("new", other, free_port()))
        lz.process.send_signal(signal.SIGHUP)
        await lz.wait_line(r"^lazyd: reload failed")
        assert ("lazyd: reload: services.new.datapath: kernel: no service asked for the "
                "kernel path when lazyd started" in lz.log())
        assert set(await lz.status()) == {"web"}
        config.write_text(config.read_text().replace("datapath: kernel", "datapath: auto"))
        lz.process.send_signal(signal.SIGHUP)
        await lz.wait_line(r"^lazyd: reloaded")
        await lz.wait_line(r"^new: datapath auto: using the userspace path: no service asked")
        assert (await ask(other)).endswith(b" hello\n")
        assert (await lz.status())["new"]["datapath"] == "userspace"


def _entry(argv: list[str], steer: dict[str, list[object]] | None) -> dict[str, object]:
    return entries.process_entry(
        executable=argv[0], argv=argv, env={"PATH": os.defpath}, uid=None, gid=None,
        groups=None, workdir=None, nofile_soft=None, sockets=[], notify=False, steer=steer)


async def test_the_helper_hands_over_only_a_kernel_path_services_own_listener() -> None:
    """The root helper gives a listener only for a process it started for a service
    whose table entry steers that socket, and only the one that process holds on
    the entry's address: another service's, another socket name, a foreign pid, a
    socket some other process holds, or a reaped process are refused."""
    up_a, up_b, other = free_port(), free_port(), free_port()
    backend = str(PROGRAMS / "backend.py")
    with socket.create_server(("127.0.0.1", other)), trio.fail_after(20):
        async with open_spawner() as spawner:
            await spawner.define({
                "steered": _entry([PY, backend, f"tcp:127.0.0.1:{up_a}"],
                                  {"main": ["127.0.0.1", up_a]}),
                "plain": _entry([PY, backend, f"tcp:127.0.0.1:{up_b}"], None),
                # Its steer names a socket this test holds, not the service.
                "liar": _entry(["/bin/sleep", "60"], {"main": ["127.0.0.1", other]}),
            })
            started = [await spawner.spawn(name) for name in ("steered", "plain", "liar")]
            a, b, liar = started
            for port in (up_a, up_b):
                await wait_connectable_port(port)
            fd = await spawner.take_listener(a.pid, "main")
            with socket.socket(fileno=fd) as taken:
                assert taken.getsockname() == ("127.0.0.1", up_a)
                assert taken.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            refusals = [
                (b.pid, "main", "service 'plain' does not use the kernel data path"),
                (a.pid, "other", "does not use the kernel data path for socket 'other'"),
                (os.getpid(), "main", f"pid {os.getpid()} is not a running process"),
                (liar.pid, "main", "no process of service 'liar' holds the socket"),
            ]
            for pid, name, error in refusals:
                with pytest.raises(SpawnError, match=re.escape(error)):
                    await spawner.take_listener(pid, name)
            a.send_signal(signal.SIGKILL)
            await a.wait()
            with pytest.raises(SpawnError, match="is not a running process"):
                await spawner.take_listener(a.pid, "main")
            for process in started:
                process.signal_group(signal.SIGKILL)
                await process.stdout.aclose()


async def wait_connectable_port(port: int) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return
        except OSError:
            await trio.sleep(0.02)
