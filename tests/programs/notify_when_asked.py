"""A pass-mode `ready: notify` service that gets ready only when asked.

It prints its NOTIFY_SOCKET, accepts one connection on fd 3 and waits for a
line; then it sends READY=1 itself (from its own pid, as sd_notify does) and
answers "ready".  Later connections get "PID LINE" per line.
"""

import os
import socket

address = os.environ["NOTIFY_SOCKET"]
print(f"NOTIFY_SOCKET={address}", flush=True)
listener = socket.socket(fileno=3)
conn, _ = listener.accept()
with conn, conn.makefile("rb") as lines:
    lines.readline()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"READY=1\nSTATUS=asked", "\0" + address[1:])
    conn.sendall(b"ready\n")
while True:
    conn, _ = listener.accept()
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(b"%d %s" % (os.getpid(), line))
