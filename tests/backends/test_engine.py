"""The container engine client against a real engine: Podman's Docker-compatible
API, served on a unix socket and on 127.0.0.1 TCP by `podman system service`,
with containers made from this host's own files (no image registry is needed).
Skipped, with scripts/podman-setup's reason, where Podman cannot run."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import lazyd
from lazyd.backends.container.engine import (
    MAX_BODY,
    MAX_EVENT,
    TLS,
    Engine,
    EngineError,
    Events,
    Logs,
    default_address,
    parse_address,
)
from tests.conftest import ROOT, free_port

# The directory holding the lazyd package in use (the source tree, or site-packages).
INSTALLED_AT = Path(lazyd.__file__).resolve().parent.parent

# A container's program: the host's python3 serving one line per connection.
# It is pid 1 in its own pid namespace, which ignores SIGTERM without a handler:
# without this one, every stop would wait the whole stop timeout.
SERVER = """
import signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("serving", sys.argv[1], flush=True)
print("on stderr", flush=True, file=sys.stderr)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"hello\\n")
    c.close()
"""
PRINTER = "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"
# A healthcheck that passes when PORT accepts a connection.
PROBE = "/usr/bin/python3 -c 'import socket, sys; socket.create_connection((\"127.0.0.1\", {}))'"

WAIT = 10.0  # seconds any one thing may take before the test fails


@dataclass
class Podman:
    """The engines of this module, and the containers it made (removed at the end)."""

    unix: Engine
    tcp: Engine
    tls: Engine  # a TLS front with client certificates before the unix socket
    certs: dict[str, Path]
    tmp: Path
    run_id: str
    names: list[str] = field(default_factory=list)

    def create(self, *options: str, command: tuple[str, ...]) -> str:
        """A new container (not started) running `command`, named uniquely."""
        name = f"lazyd-test-{self.run_id}-{len(self.names)}"
        self.names.append(name)
        subprocess.run(
            ["podman", "create", "--name", name, "--cgroups=disabled", "--network", "host",
             *options, "--rootfs", "/:O", *command],
            check=True, capture_output=True, timeout=WAIT,
        )
        return name

    def server(self, port: int, *options: str) -> str:
        return self.create(*options, command=("/usr/bin/python3", "-c", SERVER, str(port)))


def podman_unavailable() -> str | None:
    """Why Podman cannot be used here, or None (after setting it up if needed)."""
    try:
        out = subprocess.run(
            [str(ROOT / "scripts" / "podman-setup")],
            capture_output=True, text=True, timeout=300,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scripts/podman-setup failed: {e}"
    last = out.strip().splitlines()[-1] if out.strip() else "podman-setup said nothing"
    return None if last.startswith("podman-setup: ready") else last


def start_service(url: str, tmp: Path) -> subprocess.Popen[bytes]:
    """`podman system service` on `url`, once it says READY=1 (sd_notify)."""
    notify_path = tmp / f"notify-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(WAIT)
        service = subprocess.Popen(
            ["podman", "system", "service", "--time", "0", url],
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
        except BaseException:
            service.kill()
            service.wait()
            raise
    return service


def make_certificates(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a
    client certificate of another CA."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test engine CA")
    for who, extra in (("server", "subjectAltName=IP:127.0.0.1"),
                       ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        (tmp / f"{who}.ext").write_text(extra + "\n")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{who}.pem", "-days", "1",
                "-extfile", f"{who}.ext")
    # A client certificate the test CA did not sign.
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "stranger.key", "-out", "stranger.pem", "-days", "1", "-subj", "/CN=x")
    return {name: tmp / name for name in ("ca.pem", "server.pem", "server.key", "client.pem",
                                          "client.key", "stranger.pem", "stranger.key")}


@contextlib.contextmanager
def tls_front(backend: str, certs: dict[str, Path]) -> Iterator[int]:
    """A TLS endpoint on 127.0.0.1 that requires a client certificate signed by
    the test CA and forwards to the engine's unix socket: what a Docker engine
    with --tlsverify is (Podman 4.3 serves no TLS itself)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server.pem"], certs["server.key"])
    context.load_verify_locations(certs["ca.pem"])
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def serve(raw: socket.socket) -> None:
        try:
            client = context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        engine.connect(backend)
        back = threading.Thread(target=pipe, args=(engine, client), daemon=True)
        back.start()
        pipe(client, engine)
        back.join()
        client.close()
        engine.close()

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = listener.accept()
                threading.Thread(target=serve, args=(raw,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield port
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    reason = podman_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("engine")
    unix_path = tmp / "podman.sock"
    tcp_port = free_port()
    services = [start_service(f"unix://{unix_path}", tmp),
                start_service(f"tcp://127.0.0.1:{tcp_port}", tmp)]
    certs = make_certificates(tmp)
    names: list[str] = []
    try:
        with tls_front(str(unix_path), certs) as tls_port:
            client = TLS(ca=str(certs["ca.pem"]), cert=str(certs["client.pem"]),
                         key=str(certs["client.key"]))
            yield Podman(
                unix=Engine(f"unix:{unix_path}", timeout=WAIT),
                tcp=Engine(f"tcp://127.0.0.1:{tcp_port}", timeout=WAIT),
                tls=Engine(f"tcp://127.0.0.1:{tls_port}", client, timeout=WAIT),
                certs=certs,
                tmp=tmp,
                run_id=f"{os.getpid()}-{secrets.token_hex(3)}",
                names=names,
            )
    finally:
        if names:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *names],
                           capture_output=True, timeout=60)
        for service in services:
            service.terminate()
            service.wait(timeout=WAIT)


@pytest.fixture(params=["unix", "tcp"])
def engine(request: pytest.FixtureRequest, podman: Podman) -> Engine:
    """The same engine, through its unix socket and through its TCP endpoint."""
    found: Engine = getattr(podman, request.param)
    return found


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(16) == b"hello\n"
    except OSError:
        return False


def wait_accepting(port: int) -> float:
    """Seconds until 127.0.0.1:port accepts (a container's port has no event to await)."""
    start = time.monotonic()
    while not accepts(port):
        if time.monotonic() - start > WAIT:
            raise AssertionError(f"port {port} did not accept within {WAIT} s")
        time.sleep(0.002)
    return time.monotonic() - start


def watchdog(stream: Events | Logs, seconds: float = WAIT) -> None:
    """Close a followed stream after `seconds`, so a missing item fails the test
    (the iterator ends early) instead of hanging it."""
    timer = threading.Timer(seconds, stream.close)
    timer.daemon = True
    timer.start()


# -- addresses ---------------------------------------------------------------


def test_addresses_parse_and_bad_ones_say_what_is_expected() -> None:
    """unix:/PATH, unix:///PATH and tcp://HOST:PORT parse; anything else says the forms."""
    assert parse_address("unix:/run/docker.sock") == ("unix", "/run/docker.sock", 0)
    assert parse_address("unix:///run/docker.sock") == ("unix", "/run/docker.sock", 0)
    assert parse_address("tcp://10.0.0.5:2376") == ("tcp", "10.0.0.5", 2376)
    assert parse_address("tcp://[::1]:2376") == ("tcp", "::1", 2376)
    for bad in ("docker.sock", "unix:run/docker.sock", "tcp://host", "tcp://host:0",
                "http://host:2375", "tcp://:2375"):
        with pytest.raises(EngineError, match=r"expected unix:/PATH or tcp://HOST:PORT|range"):
            parse_address(bad)
    with pytest.raises(EngineError, match="engine_tls applies to tcp:// engines only"):
        Engine("unix:/run/docker.sock", TLS("ca", "cert", "key"))


def test_default_address(tmp_path: Path) -> None:
    """$DOCKER_HOST wins; else Docker's socket if it exists, else Podman's."""
    assert default_address({"DOCKER_HOST": "tcp://h:2375"}) == "tcp://h:2375"
    expected = "unix:/run/docker.sock" if os.path.exists("/run/docker.sock") \
        else "unix:/run/podman/podman.sock"
    assert default_address({}) == expected
    assert default_address({"DOCKER_HOST": ""}) == expected


def test_names_that_are_not_container_names_never_reach_the_engine() -> None:
    """A name that could be a path or a query is refused before any request."""
    engine = Engine("unix:/nonexistent/engine.sock")  # any request would fail to connect
    for bad in ("../images/create", "a/b", "wiki?x=1", "", "-x", "a b"):
        with pytest.raises(EngineError, match="not a container name"):
            engine.start(bad)


def test_the_client_imports_only_the_standard_library() -> None:
    """Without site packages, the client loads, and loads nothing outside the
    standard library (nor typing): what the privileged helper requires."""
    check = (
        "import sys; sys.path.append(sys.argv[1]); import lazyd.backends.container.engine; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
        " - {'__main__'})); print('typing' in sys.modules)"
    )
    # As lazyd.spawner starts the helper: the package's directory on sys.path.
    out = subprocess.run([sys.executable, "-I", "-S", "-c", check, str(INSTALLED_AT)],
                         capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["['lazyd']", "False"]


# -- unreachable, missing, refused ---------------------------------------------


def test_unreachable_engine_says_cannot_connect(tmp_path: Path) -> None:
    """A socket path that does not exist, or a TCP port nobody listens on: cannot connect."""
    path = tmp_path / "no-engine.sock"
    with pytest.raises(EngineError) as caught:
        Engine(f"unix:{path}").inspect("wiki")
    assert str(caught.value) == f"engine unix:{path}: cannot connect: No such file or directory"

    # A bound socket that does not listen keeps the port from anyone else.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        with pytest.raises(EngineError) as caught:
            Engine(f"tcp://127.0.0.1:{port}").start("wiki")
    assert str(caught.value) == f"engine tcp://127.0.0.1:{port}: cannot connect: Connection refused"


def test_missing_container(engine: Engine, podman: Podman) -> None:
    """A container the engine does not have is named as missing, for every operation
    (but events: they follow the name, whatever container comes to have it)."""
    name = f"lazyd-test-{podman.run_id}-missing"
    expected = f"no container named {name!r} on engine {engine.address}"
    for operation in (engine.inspect, engine.start, lambda n: engine.stop(n, 1),
                      engine.healthcheck, engine.logs):
        with pytest.raises(EngineError) as caught:
            operation(name)
        assert str(caught.value) == expected


def test_engine_errors_are_quoted(podman: Podman) -> None:
    """A start the engine refuses (no such program in the container) quotes its message."""
    name = podman.create(command=("/nonexistent/program",))
    with pytest.raises(EngineError) as caught:
        podman.unix.start(name)
    message = str(caught.value)
    assert message.startswith(f'engine {podman.unix.address}: cannot start {name!r}: "')
    assert "/nonexistent/program" in message and message.endswith("(HTTP 500)")


# -- start, stop, kill -----------------------------------------------------------


def test_start_and_stop(engine: Engine, podman: Podman) -> None:
    """After start the container runs and its port accepts; a second start is fine;
    after stop it has exited and its port refuses."""
    port = free_port()
    name = podman.server(port)
    before = engine.inspect(name)
    assert before["name"] == name and before["state"] == "created" and not before["running"]
    assert not accepts(port)

    began = time.monotonic()
    engine.start(name)
    answered = time.monotonic() - began
    accepting = answered + wait_accepting(port)
    print(f"\n{engine.kind}: start answered in {answered * 1000:.0f} ms, "
          f"port accepting after {accepting * 1000:.0f} ms")
    running = engine.inspect(name)
    assert running["running"] and running["state"] == "running" and running["pid"] > 0
    assert running["id"] == before["id"] and not running["tty"] and not running["healthcheck"]

    engine.start(name)  # already running: fine, and it still is
    assert engine.inspect(name)["running"] and accepts(port)

    began = time.monotonic()
    engine.stop(name, 5)
    # It handles SIGTERM: the stop does not wait the 5 s out.
    assert time.monotonic() - began < 4
    stopped = engine.inspect(name)
    assert stopped["state"] == "exited" and not stopped["running"] and stopped["exit_code"] == 0
    assert not accepts(port)
    engine.stop(name, 5)  # already stopped: fine


def test_kill(podman: Podman) -> None:
    """kill sends the signal asked for; a container not running cannot be signalled."""
    port = free_port()
    name = podman.server(port)
    podman.unix.start(name)
    wait_accepting(port)
    with podman.unix.events(name) as events:
        watchdog(events)
        podman.unix.kill(name, "SIGKILL")
        died = next(e for e in events if e["action"] == "die")
    assert died["exit_code"] == 128 + 9
    assert not podman.unix.inspect(name)["running"]
    with pytest.raises(EngineError, match=r"cannot signal .*: \".*(not running|state)"):
        podman.unix.kill(name, "TERM")


# -- events ---------------------------------------------------------------------


def test_events_show_a_start_and_a_death_from_outside(engine: Engine, podman: Podman) -> None:
    """Events followed before a start show it, then the death of `podman kill` from outside."""
    port = free_port()
    name = podman.server(port)
    with engine.events(name) as events:
        watchdog(events)
        engine.start(name)
        wait_accepting(port)
        seen = []
        for event in events:
            seen.append(event["action"])
            if event["action"] == "start":
                subprocess.run(["podman", "kill", name], check=True, capture_output=True)
            if event["action"] == "die":
                break
        assert event["name"] == name and event["id"] == engine.inspect(name)["id"]
        assert event["exit_code"] == 137 and abs(event["time"] - time.time()) < WAIT
    assert seen.index("start") < seen.index("die"), seen


def test_events_stop_when_closed_from_another_thread(podman: Podman) -> None:
    """A thread waiting for the next event returns at once when another thread closes it."""
    name = podman.server(free_port())
    for engine in (podman.unix, podman.tls):
        events = engine.events(name)
        closing = threading.Timer(0.2, events.close)
        closing.start()
        began = time.monotonic()
        assert list(events) == []  # nothing happened to the container: only the close
        assert 0.15 < time.monotonic() - began < 2
        closing.join()
        events.close()  # twice is fine


def test_an_engine_that_goes_away_ends_events_with_an_error(podman: Podman) -> None:
    """The engine ending a followed event stream is an error, not a quiet end."""
    tmp = podman.tmp / f"gone-{secrets.token_hex(3)}.sock"
    service = start_service(f"unix://{tmp}", podman.tmp)
    try:
        events = Engine(f"unix:{tmp}").events(podman.server(free_port()))
        watchdog(events)
    finally:
        service.terminate()
        service.wait(timeout=WAIT)
    with pytest.raises(EngineError, match=f"engine unix:{tmp}: following events: "):
        next(events)


# -- logs -----------------------------------------------------------------------


def test_logs_are_demultiplexed(engine: Engine, podman: Podman) -> None:
    """Output to stdout and stderr both arrive, each labelled with its stream."""
    name = podman.create(command=("/usr/bin/python3", "-c", PRINTER))
    engine.start(name)
    with engine.logs(name) as logs:
        watchdog(logs)
        received: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        for stream, data in logs:  # ends when the container has exited
            received[stream] += data
    assert received == {"stdout": b"to stdout\n", "stderr": b"to stderr\n"}


def test_logs_of_a_container_with_a_tty_are_raw(podman: Podman) -> None:
    """A container with a TTY has one stream, passed on as it is (the TTY's CRLF),
    whether logs() inspects it or is told (as the helper does, having just
    inspected it)."""
    name = podman.create("--tty", command=("/usr/bin/python3", "-c", PRINTER))
    assert podman.unix.inspect(name)["tty"]
    podman.unix.start(name)
    for tty in (None, True):
        with podman.unix.logs(name, tty=tty) as logs:
            watchdog(logs)
            received = list(logs)
        assert {stream for stream, _ in received} == {"stdout"}
        assert b"".join(data for _, data in received) == b"to stdout\r\nto stderr\r\n"


def test_logs_since_and_closed_while_following(podman: Podman) -> None:
    """`since` skips older output; closing from another thread ends a follow at once."""
    port = free_port()
    name = podman.server(port)
    podman.unix.start(name)
    wait_accepting(port)
    podman.unix.stop(name, 5)
    time.sleep(0.01)  # the output since now must be only the next run's
    since = time.time()
    podman.unix.start(name)
    wait_accepting(port)
    logs = podman.unix.logs(name, since=since)
    watchdog(logs)
    received: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    for stream, data in logs:
        received[stream] += data
        if received["stdout"].endswith(b"\n") and received["stderr"].endswith(b"\n"):
            break
    assert received == {"stdout": f"serving {port}\n".encode(), "stderr": b"on stderr\n"}
    threading.Timer(0.2, logs.close).start()
    began = time.monotonic()
    assert list(logs) == []  # the container still runs: only the close ends it
    assert time.monotonic() - began < 2


# -- healthcheck ------------------------------------------------------------------


def test_healthcheck_runs_the_containers_own_check(podman: Podman) -> None:
    """A check that passes is healthy, one that fails unhealthy; none is an error."""
    port = free_port()
    healthy = podman.server(port, "--health-cmd", PROBE.format(port))
    unhealthy = podman.server(free_port(), "--health-cmd", PROBE.format(free_port()),
                              "--health-retries", "1")
    plain = podman.server(free_port())
    for name in (healthy, unhealthy, plain):
        podman.unix.start(name)
    wait_accepting(port)
    assert podman.unix.inspect(healthy)["healthcheck"]
    assert podman.unix.healthcheck(healthy) == "healthy"
    assert podman.unix.healthcheck(unhealthy) == "unhealthy"
    assert podman.unix.inspect(unhealthy)["health"] == "unhealthy"
    with pytest.raises(EngineError, match=r"cannot run the healthcheck of .*: \".*no defined"):
        podman.unix.healthcheck(plain)


# -- TLS --------------------------------------------------------------------------


def test_tls_engine(podman: Podman) -> None:
    """Through client TLS the engine answers; without the client's certificate, or
    against a CA that did not sign the engine's, it cannot connect and says why."""
    port = free_port()
    name = podman.server(port)
    podman.tls.start(name)
    wait_accepting(port)
    assert podman.tls.inspect(name)["running"]
    podman.tls.stop(name, 5)
    assert not podman.tls.inspect(name)["running"]

    certs = podman.certs
    wrong_ca = TLS(ca=str(certs["server.pem"]), cert=str(certs["client.pem"]),
                   key=str(certs["client.key"]))
    with pytest.raises(EngineError, match=r"cannot connect: TLS: .*(certificate|issuer)"):
        Engine(podman.tls.address, wrong_ca).version()
    # The engine refuses a client certificate its CA did not sign.  Under TLS 1.3
    # the client may finish its handshake before the server's alert arrives: the
    # refusal then reads as the connection ended (EOF) rather than the alert.
    stranger = TLS(ca=str(certs["ca.pem"]), cert=str(certs["stranger.pem"]),
                   key=str(certs["stranger.key"]))
    refused = f"engine {podman.tls.address}: .*TLS: .*(UNKNOWN_CA|EOF occurred)"
    with pytest.raises(EngineError, match=refused):
        Engine(podman.tls.address, stranger).version()
    with pytest.raises(EngineError, match="engine_tls: No such file or directory"):
        TLS(ca=str(podman.tmp / "missing.pem"), cert="c", key="k").context()


def test_nothing_is_read_without_a_bound(podman: Podman) -> None:
    """An event past MAX_EVENT bytes, an inspection past MAX_BODY: refused, not read on."""
    # Podman's events carry the container's labels; its inspection, all of them.
    labels = podman.tmp / "labels"
    labels.write_text("".join(f"big{i}={'x' * 60_000}\n" for i in range(20)))
    name = podman.create("--label-file", str(labels), command=("/bin/true",))
    with podman.unix.events(name) as events:
        watchdog(events)
        podman.unix.start(name)
        with pytest.raises(EngineError, match=f"an event is longer than {MAX_EVENT} bytes"):
            next(events)
    with pytest.raises(EngineError, match=f"its answer is longer than {MAX_BODY} bytes"):
        podman.unix.inspect(name)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
