"""The flood benchmark's service in Python (stdlib only, run by /usr/bin/python3):
the same contract as flood_backend.c, served the way a plain Python service
does it, one connection at a time.

It sleeps --delay seconds (a service loading itself), then either binds its
own port (--bind HOST:PORT, for proxy mode; --backlog sets its listen()
backlog, 4096 as the C one) or takes the socket-activated listener at fd 3
(--fd, for pass mode), writes the moment it begins to serve (CLOCK_MONOTONIC,
seconds, "%.6f\\n") to --ready-file, and then, for each connection in turn:
accept, read the request up to its blank line, write a fixed 200, close.

With --busy-file, on SIGTERM it writes there the CPU time it spent since it
began to serve (user + system) and how many connections it served,
"%.6f %d\n": the service's own time, which no activator can save it (the
wall time it spends on a connection would count the activator's relaying too).

Unlike the C one it never has two connections in hand: while it serves one,
the others wait in its accept queue, and past that queue's length their SYNs
are dropped. That is what a flood meets behind most services.
"""

import argparse
import os
import select
import signal
import socket
import sys
import time

RESPONSE = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
            b"Connection: close\r\n\r\nok\n")
# A client that connected and then says nothing would stop every other one;
# the benchmark's client always sends at once, so this only bounds a fault.
CLIENT_TIMEOUT = 5.0


def listener_from(args: argparse.Namespace) -> socket.socket:
    if args.fd:
        # The sd_listen_fds(3) contract: refuse to run without it, so a broken
        # handoff shows as a failure rather than as a fast number.
        if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
            sys.exit(2)
        return socket.socket(fileno=3)
    host, port = args.bind.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(args.backlog)
    return sock


def accept(listener: socket.socket) -> socket.socket:
    """The next connection. fd 3's O_NONBLOCK belongs to the open file
    description lazyd shares, so it is waited out here, not changed."""
    while True:
        try:
            conn, _ = listener.accept()
            return conn
        except BlockingIOError:
            select.select([listener], [], [])


def serve(conn: socket.socket) -> None:
    """Read up to the request's blank line, answer, and let the caller close."""
    conn.settimeout(CLIENT_TIMEOUT)
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(4096)
        if not chunk:
            return  # the client left before its request was complete
        request += chunk
    conn.sendall(RESPONSE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", action="store_true")
    where.add_argument("--bind", metavar="HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--ready-file")
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--busy-file")
    args = parser.parse_args()
    busy = [0.0, 0]

    def stop(signum: int, frame: object) -> None:
        if args.busy_file is not None:
            with open(args.busy_file, "w") as f:
                f.write(f"{time.process_time() - busy[0]:.6f} {busy[1]}\n")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    time.sleep(args.delay)
    listener = listener_from(args)
    ready = time.monotonic()
    busy[0] = time.process_time()
    if args.ready_file is not None:
        with open(args.ready_file, "w") as f:
            f.write(f"{ready:.6f}\n")
    while True:
        conn = accept(listener)
        try:
            serve(conn)
        except OSError:
            pass  # reset, or timed out: that client is gone, serve the next
        finally:
            conn.close()
            busy[1] += 1


if __name__ == "__main__":
    sys.exit(main())
