"""The control socket: a small request/response protocol over a Unix socket.

One JSON object per line each way; one request per connection.

    → {"version": 1, "command": "status"}
    ← {"version": 1, "ok": true, "services": {...}}
    ← {"version": 1, "ok": false, "error": "unknown command 'x'"}

`version` is the protocol version.  A daemon answers any request whose
version it knows; a request from a newer client carries a version the daemon
does not know, and the daemon says so (with the versions it speaks) instead of
guessing, so the client can explain the mismatch.  The socket is mode 0600,
root's when lazyd runs as a uid of its own, else the account's it runs as:
only lazyd's own user (and root) may talk to it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from lazyd.config import Config, SocketConfig
from lazyd.config.ownership import who_else_can_change
from lazyd.errors import ControlError
from lazyd.logs import Level, log_at
from lazyd.net.addresses import Address, Kind
from lazyd.net.rights import refuse_rights
from lazyd.runtime.binding import bind_socket

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 5.0
# As in trio's serve_listeners: out of fds or memory, accept() fails for every
# client alike; wait a little for some to close instead of failing (or spinning).
ACCEPT_BACKOFF = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def control_path(config: Config | None = None, explicit: str | None = None) -> str:
    """Where the control socket is: see README.md, "Command line"."""
    if explicit:
        return explicit
    if config is not None and config.control:
        return config.control
    env = os.environ.get("LAZYD_CONTROL")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/lazyd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "lazyd.sock")
    raise ControlError(
        "no control socket path: set control: in the config, $LAZYD_CONTROL or $XDG_RUNTIME_DIR"
    )


def bind_control(path: str, uid: int = -1, gid: int = -1) -> socket.socket:
    """Bind the control socket (replacing a stale one), mode 0600, owned by uid:gid.

    The file is created 0600 and given to its owner through the bound file
    itself, never by path (see `lazyd.sockets`), so a symlink swapped in
    after bind() cannot turn the chown onto another file.
    """
    if os.geteuid() == 0 and (problem := who_else_can_change(path, directories_only=True)):
        # The config check says this for `control:`; the path may come from elsewhere.
        raise ControlError(f"{problem}: lazyd, as root, creates its control socket only in a "
                           "directory that only root can change")
    listen = Address(Kind.UNIX, path=path)
    sc = SocketConfig(name="control", listen=listen, backlog=64, mode=0o600)
    return bind_socket(sc, ids=(uid, gid))


async def serve_control(
    sock: socket.socket, handler: Handler, *, log: Callable[[str], None] | None = None
) -> None:
    """Answer requests on the bound control socket until cancelled.

    Only lazyd's own user and root are answered (whatever the file's mode
    lets through): anyone else gets an error line, and `log` a line.
    """
    # A request is one line of text: nobody has an fd to send it (and one the
    # kernel dropped in our recv would be closed on the event loop).
    refuse_rights(sock)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    short = False
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                if not short and log is not None:
                    log_at(log, Level.WARNING, f"lazyd: control: accept failed: "
                           f"{os.strerror(exc.errno)}; retrying every 100 ms")
                short = True
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            short = False
            nursery.start_soon(_serve_one, stream, handler, log)


def _peer_uid(stream: trio.SocketStream) -> int:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return int(uid)


async def _serve_one(
    stream: trio.SocketStream, handler: Handler, log: Callable[[str], None] | None
) -> None:
    async with stream:
        try:
            with trio.fail_after(CLIENT_TIMEOUT):
                line = await _read_line(stream)
            uid = _peer_uid(stream)
            if uid in (0, os.geteuid()):
                reply = await _answer(line, handler)
            else:
                if log is not None:
                    log_at(log, Level.WARNING, f"lazyd: control: refused a request from uid {uid}")
                reply = {"version": PROTOCOL_VERSION, "ok": False,
                         "error": f"uid {uid} may not control lazyd (only uid "
                         f"{os.geteuid()} and root may)"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass


async def _answer(line: bytes | None, handler: Handler) -> dict[str, Any]:
    def error(text: str) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "ok": False, "error": text}

    if line is None:
        return error(f"request too long or not terminated (limit {MAX_REQUEST} bytes)")
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return error(f"request is not JSON: {exc}")
    except RecursionError:
        # json's decoder recurses per nesting level: "[[[[..." within the
        # size limit would otherwise take the whole daemon down.
        return error("request is not JSON: nested too deeply")
    if not isinstance(request, dict):
        return error("request must be a JSON object")
    version = request.get("version")
    if version not in SUPPORTED_VERSIONS:
        reply = error(
            f"protocol version {version!r} is not supported by this daemon "
            f"(it speaks {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
        reply["supported"] = list(SUPPORTED_VERSIONS)
        return reply
    if not isinstance(request.get("command"), str):
        return error("request has no command")
    reply = await handler(request)
    reply.setdefault("version", PROTOCOL_VERSION)
    return reply


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    data = bytearray()
    while b"\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            return None
        data += chunk
    line = data.split(b"\n", 1)[0]
    # The last chunk may have carried the line past the limit before its newline.
    return bytes(line) if len(line) <= MAX_REQUEST else None


def request(path: str, command: str, **arguments: Any) -> dict[str, Any]:
    """Send one request to a running daemon and return its reply (blocking)."""
    message = {"version": PROTOCOL_VERSION, "command": command, **arguments}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no lazyd is running at {path}") from None
        except OSError as exc:
            raise ControlError(f"cannot reach lazyd at {path}: {exc.strerror}") from None
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ControlError(f"lazyd at {path} did not answer: {exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"lazyd at {path} sent an answer that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"lazyd at {path} sent an answer that is not a JSON object")
    if not reply.get("ok"):
        raise ControlError(f"lazyd at {path}: {reply.get('error', 'request failed')}", reply)
    return reply
