"""The soak benchmark's service: answers "ok LINE" to every line of a stream
client and "ok DATA" to every datagram.

    soak_backend.py tcp:HOST:PORT     binds its own TCP port (proxy mode)
    soak_backend.py udp:HOST:PORT     binds its own UDP port (proxy mode)
    soak_backend.py fd3 [IDLE_EXIT]   the socket-activated fd 3 (pass mode);
                                      exits after IDLE_EXIT seconds without
                                      a new connection, as a pass-mode service
                                      that goes idle does

Once it listens it says READY=1 to $NOTIFY_SOCKET when it has one, so that
lazyd hands it nothing before it can answer.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", target)


def serve_stream(conn: socket.socket) -> None:
    with conn:
        try:
            with conn.makefile("rb") as lines:
                for line in lines:
                    conn.sendall(b"ok " + line)
        except OSError:
            pass  # the client went away: its business


def main() -> None:
    kind, _, where = sys.argv[1].partition(":")
    if kind == "udp":
        host, port = where.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, int(port)))
        notify_ready()
        while True:
            data, peer = sock.recvfrom(65536)
            sock.sendto(b"ok " + data, peer)
    if kind == "tcp":
        host, port = where.rsplit(":", 1)
        server = socket.create_server((host, int(port)), backlog=1024)
    else:
        server = socket.socket(fileno=3)
        server.setblocking(True)
        if len(sys.argv) > 2:
            server.settimeout(float(sys.argv[2]))
    notify_ready()
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if threading.active_count() > 1:
                continue  # a client is still being served: not idle yet
            return  # idle: lazyd holds the socket again
        conn.settimeout(None)
        threading.Thread(target=serve_stream, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
