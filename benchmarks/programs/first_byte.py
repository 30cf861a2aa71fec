"""The benchmark's service in Python (run with `python -S`): accept one
connection on the socket-activated fd 3, write one byte, exit."""

import os
import socket

if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
    raise SystemExit(2)
listener = socket.socket(fileno=3)
listener.setblocking(True)
conn, _ = listener.accept()
conn.sendall(b"!")
conn.close()
