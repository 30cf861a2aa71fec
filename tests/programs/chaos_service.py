"""A service for the chaos walk, told by argv how to behave.

    chaos_service.py NAME MARK [--listen fds | tcp:HOST:PORT | unix:PATH | udp:HOST:PORT]...
                     [--delay S] [--crash | --hang] [--notify] [--idle-exit S]

It sleeps --delay seconds (its start-up), then:
- with --crash, exits with status 1;
- with --hang, never gets ready: it binds nothing, serves nothing, sends nothing;
- else serves every socket: its inherited LISTEN_FDS (`--listen fds`, pass mode)
  or the addresses it binds itself (proxy mode). A stream client gets
  "NAME PID LINE" for each line, a datagram "NAME PID DATA" back.
With --notify it sends READY=1 to $NOTIFY_SOCKET once it serves. With
--idle-exit it exits (status 0) after S seconds with no connection open and
nothing received, as a pass-mode service that goes idle does.

MARK is only there to be found in /proc/PID/cmdline: the walk looks for
processes it started that outlived lazyd. Nothing is ever printed (a service's
output reaches lazyd's log, which the walk reads for tracebacks).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import time


def _bind(spec: str) -> list[socket.socket]:
    if spec == "fds":
        count = int(os.environ.get("LISTEN_FDS", "0"))
        return [socket.socket(fileno=3 + i) for i in range(count)]
    kind, _, where = spec.partition(":")
    if kind == "unix":
        # A socket file left by an earlier run (SIGKILL leaves it).
        if os.path.exists(where):
            os.unlink(where)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(where)
        os.chmod(where, 0o666)  # lazyd, no longer root, connects to it
        server.listen(128)
        return [server]
    host, port = where.rsplit(":", 1)
    if kind == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, int(port)))
        return [sock]
    return [socket.create_server((host, int(port)), backlog=128)]


def _notify() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", target)


def serve(name: bytes, listeners: list[socket.socket], idle_exit: float | None) -> None:
    pid = b"%d" % os.getpid()
    selector = selectors.DefaultSelector()
    for sock in listeners:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, "listener")
    buffers: dict[socket.socket, bytes] = {}
    last = time.monotonic()
    while True:
        timeout = None
        if idle_exit is not None and not buffers:
            timeout = last + idle_exit - time.monotonic()
            if timeout <= 0:
                sys.exit(0)
        events = selector.select(timeout)
        if events:
            last = time.monotonic()
        for key, _ in events:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "listener" and sock.type == socket.SOCK_DGRAM:
                try:
                    data, peer = sock.recvfrom(65536)
                    sock.sendto(name + b" " + pid + b" " + data, peer)
                except OSError:
                    pass
            elif key.data == "listener":
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                buffers[conn] = b""
                selector.register(conn, selectors.EVENT_READ, "conn")
            else:
                try:
                    data = sock.recv(65536)
                    lines = (buffers[sock] + data).split(b"\n")
                    buffers[sock] = lines.pop()
                    for line in lines:
                        sock.sendall(name + b" " + pid + b" " + line + b"\n")
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    del buffers[sock]
                    sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("mark")
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--crash", action="store_true")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--notify", action="store_true")
    parser.add_argument("--idle-exit", type=float)
    args = parser.parse_args()
    time.sleep(args.delay)
    if args.crash:
        sys.exit(1)
    if args.hang:
        while True:
            time.sleep(3600)
    listeners = [sock for spec in args.listen for sock in _bind(spec)]
    if args.notify:
        _notify()
    serve(args.name.encode(), listeners, args.idle_exit)


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyboardInterrupt):
        # Silent: a traceback here would read as lazyd's in the walk's log check.
        os._exit(2)
