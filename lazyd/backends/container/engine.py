"""A client of Docker's Engine API (and of Podman's compatible API), for the
few operations lazyd needs on containers that already exist: inspect, start,
stop, kill, run a healthcheck, follow events and follow logs. It cannot
create, exec, pull or remove anything: the engine socket is root-equivalent,
and what this client cannot say, a taken-over caller cannot make it say.

Why the standard library's `http.client` and not a well-kept async client
(httpx on trio): only lazyd's privileged helper talks to the engine, and that
helper is a root process that, by design, imports nothing but the standard
library (no site packages, nothing a non-root user could have installed or
changed; see `lazyd.spawnerd`). So this module imports only the standard
library, and not even `typing` at run time, like the helper. Its operations
block; the helper may call them from several threads at once, since each call
opens its own connection and shares nothing with the others.

Engines are addressed as ``unix:/PATH`` (``unix:///PATH`` as in $DOCKER_HOST
is accepted too) or ``tcp://HOST:PORT``, the latter with client TLS when a
`TLS` is given (the usual ``tcp://host:2376`` of a Docker engine that
requires ``--tlsverify``): `http.client` over an AF_UNIX socket (an
HTTPConnection whose connect() opens the unix socket), or over TCP, wrapped in
`ssl` with the client's certificate.

One error type, `EngineError`, whose message is meant for the user as it is:

    engine unix:/run/docker.sock: cannot connect: No such file or directory
    no container named 'wiki' on engine unix:/run/podman/podman.sock
    engine tcp://10.0.0.5:2376: cannot start 'wiki': "crun: executable file ..." (HTTP 500)

the last quoting the engine's own message (the ``message`` field of its JSON
error). Nothing is read without a bound: a body read whole is at most
MAX_BODY bytes, an event at most MAX_EVENT, a log frame is handed on in
pieces of at most MAX_LOG_CHUNK.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import socket
import ssl  # http.client imports it anyway
import threading
import urllib.parse

# Not `from typing import ...`: importing typing costs the privileged helper
# time and memory, and it has no other use for it (see lazyd.spawnerd).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import Any, Self

DEFAULT_TIMEOUT = 10.0  # seconds for a connect, and for an answer to a request
MAX_BODY = 1024 * 1024  # bytes of a response read whole (inspect, version, errors)
MAX_EVENT = 64 * 1024  # bytes of one event (one JSON line); Podman's are ~500
MAX_LOG_CHUNK = 64 * 1024  # bytes of log handed on at once; larger frames are split
MAX_QUOTE = 500  # characters of an engine's message quoted in an error

DOCKER_SOCKET = "/run/docker.sock"
PODMAN_SOCKET = "/run/podman/podman.sock"

# Podman 4.3 answers 404 to /libpod/ paths without a version; 4.0.0 is the
# oldest libpod API that has what this client asks of it.
LIBPOD = "/v4.0.0/libpod"

# Docker's own rule for container names (daemon/names): also keeps a name from
# ever being a path ("../..") or a query inside the URL.
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z")
_SIGNAL = re.compile(r"(SIG)?[A-Z0-9+-]{1,16}\Z")
_STREAMS = {1: "stdout", 2: "stderr"}  # a log frame's first byte (0, stdin, never comes)

# A remote engine that vanishes (host down, cable cut) never closes a
# followed stream; TCP keepalive notices it within ~IDLE + COUNT * INTERVAL s.
_KEEPALIVE_IDLE = 30
_KEEPALIVE_INTERVAL = 10
_KEEPALIVE_COUNT = 3


class EngineError(Exception):
    """The engine could not be reached, or refused, or answered nonsense; the
    message says which engine and what, in one line meant for the user."""


class TLS:
    """Client TLS to a ``tcp://`` engine: the CA that signed the engine's
    certificate, and this client's certificate and key (PEM files)."""

    __slots__ = ("ca", "cert", "key")

    def __init__(self, ca: str, cert: str, key: str) -> None:
        self.ca = ca
        self.cert = cert
        self.key = key

    def __repr__(self) -> str:
        return f"TLS(ca={self.ca!r}, cert={self.cert!r}, key={self.key!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TLS):
            return NotImplemented
        return (self.ca, self.cert, self.key) == (other.ca, other.cert, other.key)

    def __hash__(self) -> int:
        return hash((self.ca, self.cert, self.key))

    def context(self) -> ssl.SSLContext:
        """An SSL context that verifies the engine against `ca` (its name too)
        and presents `cert`; an unreadable file is an EngineError."""
        try:
            context = ssl.create_default_context(cafile=self.ca)
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise EngineError(f"engine_tls: {_reason(e)}") from None
        return context


def default_address(environ: Mapping[str, str] | None = None) -> str:
    """The engine to use when a service names none: $DOCKER_HOST, else Docker's
    socket if it exists, else Podman's (whether or not it exists, so that the
    error names it)."""
    env = os.environ if environ is None else environ
    host = env.get("DOCKER_HOST", "")
    if host:
        return host
    if os.path.exists(DOCKER_SOCKET):
        return "unix:" + DOCKER_SOCKET
    return "unix:" + PODMAN_SOCKET


def parse_address(address: str) -> tuple[str, str, int]:
    """``unix:/PATH`` → ("unix", PATH, 0); ``tcp://HOST:PORT`` → ("tcp", HOST, PORT).
    Anything else is an EngineError that says what is expected."""
    expected = f"engine {address!r}: expected unix:/PATH or tcp://HOST:PORT"
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if path.startswith("//"):  # unix:///run/docker.sock, as $DOCKER_HOST has it
            path = path[2:]
        if not path.startswith("/") or "\0" in path:
            raise EngineError(f"{expected} (the socket's path must be absolute)")
        return "unix", path, 0
    if address.startswith("tcp://"):
        rest = address[len("tcp://") :].rstrip("/")
        host, colon, port_text = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):  # tcp://[::1]:2376
            host = host[1:-1]
        if not colon or not host or not port_text.isdigit() or "/" in host:
            raise EngineError(f"{expected} (the port is required)")
        port = int(port_text)
        if not 0 < port < 65536:
            raise EngineError(f"engine {address!r}: port {port} is out of range")
        return "tcp", host, port
    raise EngineError(expected)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over an AF_UNIX stream socket (the engine's usual endpoint)."""

    def __init__(self, path: str, timeout: float) -> None:
        # The Host header is required by HTTP/1.1; engines ignore its value.
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Engine:
    """One container engine, by address. Each operation is one blocking HTTP
    request on a connection of its own (so threads may share an Engine), with
    `timeout` for connecting and for the answer (a stop waits the container's
    stop timeout on top of it). Every failure is an `EngineError`."""

    def __init__(
        self, address: str, tls: TLS | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.address = address
        self.kind, self._host, self._port = parse_address(address)
        if tls is not None and self.kind != "tcp":
            raise EngineError(f"engine {address}: engine_tls applies to tcp:// engines only")
        self.tls = tls
        self.timeout = timeout
        self._context = tls.context() if tls is not None else None
        # Podman says so in a header of every answer; None until one came.
        self._podman: bool | None = None

    def __repr__(self) -> str:
        return f"Engine({self.address!r}, tls={self.tls!r}, timeout={self.timeout!r})"

    # -- operations --------------------------------------------------------

    def version(self) -> dict[str, Any]:
        """The engine's ``/version`` answer (``Version``, ``ApiVersion``,
        ``Components``, ...)."""
        answer = self._json("GET", "/version", what="ask its version")
        if not isinstance(answer, dict):
            raise self._error("answered /version with something that is not an object")
        return answer

    def inspect(self, name: str) -> dict[str, Any]:
        """What lazyd needs to know of container `name`:
        ``{"id", "name", "state", "running", "pid", "exit_code", "error",
        "tty", "healthcheck", "health"}``: ``state`` as the engine says it
        (created, running, exited, paused, ...), ``tty`` whether its output is
        raw (else multiplexed), ``healthcheck`` whether it has one, ``health``
        its last known status (starting, healthy, unhealthy) or None."""
        raw = self._json("GET", f"/containers/{_path_name(name)}/json", name=name,
                         what=f"inspect {name!r}")
        try:
            state = raw["State"]
            config = raw.get("Config") or {}
            health = state.get("Health") or {}
            check = config.get("Healthcheck") or {}
            return {
                "id": str(raw["Id"]),
                "name": str(raw.get("Name", name)).lstrip("/"),
                "state": str(state["Status"]),
                "running": bool(state.get("Running", False)),
                "pid": int(state.get("Pid") or 0),
                "exit_code": int(state.get("ExitCode") or 0),
                "error": str(state.get("Error") or ""),
                "tty": bool(config.get("Tty", False)),
                # ["NONE"] is how an image's healthcheck is switched off.
                "healthcheck": bool(check.get("Test")) and check.get("Test") != ["NONE"],
                "health": str(health["Status"]) if health.get("Status") else None,
            }
        except (KeyError, TypeError, ValueError, AttributeError):
            raise self._error(f"answered the inspection of {name!r} without its state") from None

    def start(self, name: str) -> None:
        """Start container `name`; one already running is fine (304)."""
        self._call("POST", f"/containers/{_path_name(name)}/start", ok=(204, 304),
                   name=name, what=f"start {name!r}")

    def stop(self, name: str, timeout_s: float) -> None:
        """Stop container `name`: its stop signal, then SIGKILL after `timeout_s`
        seconds; answered once it has stopped. One not running is fine (304)."""
        seconds = max(0, math.ceil(timeout_s))  # the API counts whole seconds
        self._call("POST", f"/containers/{_path_name(name)}/stop", {"t": str(seconds)},
                   ok=(204, 304), name=name, what=f"stop {name!r}",
                   timeout=self.timeout + seconds)

    def kill(self, name: str, signal: str | int = "SIGKILL") -> None:
        """Send `signal` (a number, or a name: "SIGTERM", "TERM") to container
        `name`'s main process; one not running is an EngineError."""
        if isinstance(signal, int):
            if not 0 < signal < 65:
                raise EngineError(f"not a signal: {signal}")
            text = str(signal)
        elif _SIGNAL.match(signal):
            text = signal
        else:
            raise EngineError(f"not a signal: {signal!r}")
        self._call("POST", f"/containers/{_path_name(name)}/kill", {"signal": text},
                   ok=(204,), name=name, what=f"signal {name!r}")

    def healthcheck(self, name: str) -> str:
        """The health of container `name`: "healthy", "unhealthy" or "starting".

        Podman without systemd never runs healthchecks by itself, so on Podman
        this runs one now (and waits for it); Docker runs them itself, so this
        reads the last status from the inspection. A container without a
        healthcheck, or not running, is an EngineError.
        """
        if self._podman is None:
            self.version()  # sets _podman, from its headers
        if self._podman:
            answer = self._json("GET", f"{LIBPOD}/containers/{_path_name(name)}/healthcheck",
                                name=name, what=f"run the healthcheck of {name!r}",
                                timeout=self.timeout + 30)  # Podman's default check timeout
            status = answer.get("Status") if isinstance(answer, dict) else None
            if not isinstance(status, str) or not status:
                raise self._error(f"answered the healthcheck of {name!r} without a status")
            return status
        info = self.inspect(name)
        if not info["healthcheck"]:
            raise EngineError(f"container {name!r} on engine {self.address} has no healthcheck")
        if not info["running"]:
            raise EngineError(f"container {name!r} on engine {self.address} is not running")
        return info["health"] or "starting"

    def events(self, name: str) -> Events:
        """Follow the events of container `name` (start, die, stop, kill,
        health_status, ...) from now on: an iterator of dicts
        ``{"action", "id", "name", "exit_code", "time"}`` (``exit_code`` an int
        or None, ``time`` in seconds since the epoch). When this returns, the
        engine has answered, so an event that happens after it is followed.
        The engine follows the name, not a container: a missing one is no
        error here, and one created under that name later is followed.
        `Events.close()`, from any thread, stops it; the engine going away is
        an EngineError from the iterator."""
        query = {"filters": json.dumps({"container": [_check_name(name)], "type": ["container"]})}
        conn, response = self._open_stream("/events", query, name, f"follow the events of {name!r}")
        return Events(self, conn, response)

    def logs(self, name: str, since: float | None = None, tty: bool | None = None) -> Logs:
        """Follow the output of container `name` (since `since`, seconds since
        the epoch, else all of it): an iterator of (stream, bytes), stream
        "stdout" or "stderr" (a container with a TTY has one stream, raw,
        given as "stdout"). It ends when the container stops; `Logs.close()`,
        from any thread, ends it sooner. `tty`: whether it has a TTY, when
        the caller has just inspected it (else this inspects it first)."""
        if tty is None:
            tty = self.inspect(name)["tty"]
        query = {"follow": "1", "stdout": "1", "stderr": "1"}
        if since is not None:
            query["since"] = f"{since:.9f}"
        conn, response = self._open_stream(
            f"/containers/{_path_name(name)}/logs", query, name, f"follow the output of {name!r}"
        )
        return Logs(self, conn, response, tty)

    # -- HTTP --------------------------------------------------------------

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        """A connected connection, or an EngineError saying "cannot connect"."""
        conn: http.client.HTTPConnection
        if self.kind == "unix":
            conn = _UnixHTTPConnection(self._host, timeout)
        elif self._context is not None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise self._error(f"cannot connect: no answer within {timeout:g} s") from None
        except OSError as e:  # ssl.SSLError is one
            conn.close()
            raise self._error(f"cannot connect: {_reason(e)}") from None
        if self.kind == "tcp":
            _keepalive(conn.sock)
        return conn

    def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        name: str | None,
        what: str,
        timeout: float,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request and read the answer's head. A 404 for a container
        is "no container named"; other statuses are for the caller."""
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        conn = self._connect(timeout)
        try:
            conn.request(method, url, headers={"Accept": "application/json"})
            response = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise self._error(f"cannot {what}: no answer within {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._error(f"cannot {what}: {_reason(e)}") from None
        self._podman = response.getheader("Libpod-Api-Version") is not None
        return conn, response

    def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        ok: tuple[int, ...] = (200,),
        name: str | None = None,
        what: str,
        timeout: float | None = None,
    ) -> bytes:
        """One request whose answer is read whole (at most MAX_BODY bytes);
        its body if its status is one of `ok`, else an EngineError quoting it."""
        wait = self.timeout if timeout is None else timeout
        conn, response = self._send(method, path, query, name, what, wait)
        try:
            body = response.read(MAX_BODY + 1)
        except TimeoutError:
            raise self._error(f"cannot {what}: no answer within {wait:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise self._error(f"cannot {what}: {_reason(e)}") from None
        finally:
            conn.close()
        if response.status not in ok:
            raise self._refusal(response.status, body, name, what)
        if len(body) > MAX_BODY:
            raise self._error(f"cannot {what}: its answer is longer than {MAX_BODY} bytes")
        return body

    def _json(self, method: str, path: str, *, name: str | None = None, what: str,
              timeout: float | None = None) -> Any:
        body = self._call(method, path, name=name, what=what, timeout=timeout)
        try:
            return json.loads(body)
        except ValueError:
            raise self._error(f"cannot {what}: its answer is not JSON: {_quote(body)}") from None

    def _open_stream(
        self, path: str, query: Mapping[str, str], name: str, what: str
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """A followed GET whose head has come with status 200. Its socket then
        waits for as long as it takes (the next event may be hours away)."""
        conn, response = self._send("GET", path, query, name, what, self.timeout)
        if response.status != 200:
            try:
                body = response.read(MAX_BODY)
            except (OSError, http.client.HTTPException):
                body = b""
            finally:
                conn.close()
            raise self._refusal(response.status, body, name, what)
        if conn.sock is not None:
            conn.sock.settimeout(None)
        return conn, response

    # -- errors ------------------------------------------------------------

    def _error(self, what: str) -> EngineError:
        return EngineError(f"engine {self.address}: {what}")

    def _refusal(self, status: int, body: bytes, name: str | None, what: str) -> EngineError:
        message = _message(body)
        # A 404 is also what an engine says to a path it does not know: only
        # its "no such container" means the container is missing.
        if status == 404 and name is not None and "no such container" in message.lower():
            return EngineError(f"no container named {name!r} on engine {self.address}")
        return self._error(f"cannot {what}: {_quote(message)} (HTTP {status})")


class _Stream:
    """A followed answer, read by one thread at a time and closable from any
    other: close() shuts the socket down, which wakes the reader (its read
    returns end of file), and the reader, not close(), then closes the socket,
    so that no thread ever reads an fd that another has closed (and that the
    kernel may have given to something else)."""

    def __init__(
        self, engine: Engine, conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
    ) -> None:
        self._engine = engine
        self._conn = conn
        self._response = response
        self._lock = threading.Lock()
        self._closed = False  # close() was called
        self._reading = False  # a thread is inside _read()
        self._released = False  # the socket is closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop following: the iterator ends (at once if a thread waits in
        it). Safe from any thread, and more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._reading:
                sock = self._conn.sock
                if sock is not None:
                    # socket.socket's own shutdown, also for an SSLSocket: its
                    # override would drop the TLS state under the reader. OSError:
                    # the engine has already shut it down.
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                return
        self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._response.close()
        self._conn.close()

    def _next(self) -> Any:
        """The next item from _read(), with the locking and ending done here."""
        with self._lock:
            if self._closed or self._released:
                closed = True
            else:
                closed = False
                self._reading = True
        if closed:
            self._release()
            raise StopIteration
        failure: BaseException | None = None
        item: Any = None
        try:
            item = self._read()
        except (OSError, http.client.HTTPException, EngineError) as e:
            failure = e
        finally:
            with self._lock:
                self._reading = False
                closed = self._closed
        if closed:
            self._release()
            raise StopIteration
        if failure is not None:
            self._release()
            if isinstance(failure, EngineError):
                raise failure
            raise self._engine._error(f"{self._what}: {_reason(failure)}") from None
        if item is None:
            self._release()
            self._ended()
        return item

    _what = "stream"

    def _read(self) -> Any:
        raise NotImplementedError

    def _ended(self) -> None:
        """The engine ended the answer (and close() was not called)."""
        raise StopIteration


class Events(_Stream):
    """The followed events of one container (see `Engine.events`)."""

    _what = "following events"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        event: dict[str, Any] = self._next()
        return event

    def _read(self) -> dict[str, Any] | None:
        while True:
            line = self._response.readline(MAX_EVENT + 1)
            if not line:
                return None
            if len(line) > MAX_EVENT and not line.endswith(b"\n"):
                raise self._engine._error(
                    f"{self._what}: an event is longer than {MAX_EVENT} bytes"
                )
            if line.strip():  # Docker may send empty lines to keep the answer alive
                return self._parse(line)

    def _parse(self, line: bytes) -> dict[str, Any]:
        try:
            raw = json.loads(line)
            actor = raw.get("Actor") or {}
            attributes = actor.get("Attributes") or {}
            # "status"/"id" are the pre-1.22 names, kept by Podman, gone from Docker.
            action = raw.get("Action") or raw.get("status")
            code = attributes.get("exitCode")
            nanoseconds = raw.get("timeNano")
            return {
                "action": str(action),
                "id": str(actor.get("ID") or raw.get("id") or ""),
                "name": str(attributes.get("name", "")),
                "exit_code": int(code) if code not in (None, "") else None,
                "time": nanoseconds / 1e9 if nanoseconds else float(raw.get("time") or 0),
            }
        except (ValueError, TypeError, AttributeError):
            raise self._engine._error(f"{self._what}: not an event: {_quote(line)}") from None

    def _ended(self) -> None:
        # The engine never ends a followed event stream by itself: it went away.
        raise self._engine._error(f"{self._what}: the engine ended the stream")


class Logs(_Stream):
    """The followed output of one container (see `Engine.logs`)."""

    _what = "following output"

    def __init__(
        self, engine: Engine, conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse, tty: bool,
    ) -> None:
        super().__init__(engine, conn, response)
        self._tty = tty
        self._stream = "stdout"
        self._left = 0  # bytes of the current frame not yet handed on

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return self

    def __next__(self) -> tuple[str, bytes]:
        item: tuple[str, bytes] = self._next()
        return item

    def _read(self) -> tuple[str, bytes] | None:
        if self._tty:
            # Raw: whatever has come, as soon as it has come.
            data = self._response.read1(MAX_LOG_CHUNK)
            return ("stdout", data) if data else None
        while self._left == 0:
            # The multiplexed format: 8-byte header [stream, 0, 0, 0, size (32-bit
            # big-endian)], then size bytes of that stream.
            header = self._response.read(8)
            if not header:
                return None
            if len(header) < 8:
                raise self._engine._error(f"{self._what}: the stream ended inside a frame header")
            stream = _STREAMS.get(header[0])
            if stream is None or header[1:4] != b"\0\0\0":
                raise self._engine._error(f"{self._what}: not a log frame: {header!r}")
            self._stream = stream
            self._left = int.from_bytes(header[4:8], "big")
        data = self._response.read(min(self._left, MAX_LOG_CHUNK))
        if not data:
            raise self._engine._error(f"{self._what}: the stream ended inside a frame")
        self._left -= len(data)
        return self._stream, data


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise EngineError(f"not a container name: {name!r}")
    return name


def _path_name(name: str) -> str:
    return urllib.parse.quote(_check_name(name), safe="")


def _keepalive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", _KEEPALIVE_IDLE), ("TCP_KEEPINTVL", _KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", _KEEPALIVE_COUNT)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _message(body: bytes) -> str:
    """The engine's own words: the ``message`` of its JSON error, else the text."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        return str(answer["message"])
    return body.decode("utf-8", "replace").strip()


def _quote(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if len(text) > MAX_QUOTE:
        text = text[:MAX_QUOTE] + "..."
    return json.dumps(text, ensure_ascii=False)


def _reason(error: BaseException) -> str:
    """An OSError's words without its errno ("No such file or directory")."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error.reason or error}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, http.client.IncompleteRead | http.client.RemoteDisconnected):
        return "the engine closed the connection"
    return str(error) or type(error).__name__
