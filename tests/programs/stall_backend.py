"""A proxy-mode backend that misbehaves on purpose: it binds HOST:PORT (argv[1])
and then, per connection, does one of two things.

    stall_backend.py HOST:PORT --read-timeout S
        closes a connection that sends nothing for S seconds (and says so);
    stall_backend.py HOST:PORT --gate FIFO
        reads nothing until someone opens FIFO for writing and closes it, then
        reads to EOF and answers "BYTES SHA256HEX\\n".

Every other connection (and the first line of a --read-timeout one) is
answered line by line with "PID LINE".
"""

import argparse
import hashlib
import os
import socket
import threading

parser = argparse.ArgumentParser()
parser.add_argument("address")
parser.add_argument("--read-timeout", type=float)
parser.add_argument("--gate")
args = parser.parse_args()
host, port = args.address.rsplit(":", 1)
server = socket.create_server((host, int(port)), backlog=128)
print("listening", flush=True)


def lines(conn: socket.socket) -> None:
    with conn.makefile("rb") as reader:
        for line in reader:
            conn.sendall(b"%d %s" % (os.getpid(), line))


def gated(conn: socket.socket) -> None:
    # lazyd's readiness probe connects and closes without a byte: no gate for it.
    if not conn.recv(1, socket.MSG_PEEK):
        return
    with open(args.gate, "rb") as gate:  # blocks until a writer opens it
        gate.read()  # and until it closes it
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    conn.sendall(b"%d %s\n" % (total, digest.hexdigest().encode()))


def serve(conn: socket.socket) -> None:
    with conn:
        try:
            if args.gate:
                gated(conn)
                return
            if args.read_timeout is not None:
                conn.settimeout(args.read_timeout)
            lines(conn)
        except TimeoutError:
            print("closing a connection that sent nothing", flush=True)
        except OSError:
            pass


while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
