"""The benchmark's service in Python (run with `python -S`): accept one
connection on the socket-activated fd 3, write one byte, exit.

With `--bind HOST:PORT` (proxy mode, and systemd-socket-proxyd) it binds its
own port instead and writes the byte to every connection until killed; with
`--fork` as well it forks once it listens and the parent exits, as a
Type=forking service tells systemd it is ready."""

import os
import socket
import sys

if len(sys.argv) >= 3 and sys.argv[1] == "--bind":
    host, port = sys.argv[2].rsplit(":", 1)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(128)
    if "--fork" in sys.argv[3:] and os.fork() != 0:
        os._exit(0)
    while True:
        conn, _ = listener.accept()
        conn.sendall(b"!")
        conn.close()
if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
    raise SystemExit(2)
listener = socket.socket(fileno=3)
listener.setblocking(True)
conn, _ = listener.accept()
conn.sendall(b"!")
conn.close()
