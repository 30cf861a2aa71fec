"""A socket-activated HTTP service for the demo.

Takes its listening socket from fd 3 (LISTEN_FDS), pretends to have a slow
start-up (`--delay`), answers every request with its pid, and exits after
`--idle` seconds without a connection, as a pass-mode service that goes idle
does; lazyd then holds the socket again.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time


def _serve(conn: socket.socket) -> None:
    with conn:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        body = f"hello from pid {os.getpid()}\n".encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )


def notify_ready() -> None:
    """sd_notify(3) READY=1, when started with `ready: notify`."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1\nSTATUS=serving", address)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--idle", type=float, default=0.0)
    args = parser.parse_args()
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        print("expected one socket from LISTEN_FDS", file=sys.stderr)
        return 1
    time.sleep(args.delay)  # the start-up work a real service does
    listener = socket.socket(fileno=3)
    # O_NONBLOCK lives on the socket shared with lazyd: set the mode wanted
    # rather than trusting what an earlier run left behind.
    listener.settimeout(args.idle or None)
    print(f"up after {args.delay:g} s of start-up work", flush=True)
    notify_ready()
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            print(f"idle for {args.idle:g} s: exiting", flush=True)
            return 0
        conn.settimeout(10)
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
