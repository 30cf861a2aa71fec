"""A TCP service that serves every socket it inherits, as socket-activated programs do.

    serve_inherited.py HOST:PORT

It serves the sockets passed to it with LISTEN_FDS (at fds 3.., when
LISTEN_PID is its own pid), and it binds HOST:PORT itself too. Each client
gets one line saying how it came in, "inherited" or "upstream", and the
connection stays open until the client closes it.
"""

import os
import selectors
import socket
import sys
import threading

host, _, port = sys.argv[1].rpartition(":")
listeners = []
if os.environ.get("LISTEN_PID") == str(os.getpid()):
    for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))):
        listeners.append((socket.socket(fileno=fd), b"inherited\n"))
own = socket.socket()
own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
own.bind((host, int(port)))
own.listen()
listeners.append((own, b"upstream\n"))


def hold(conn: socket.socket, greeting: bytes) -> None:
    with conn:
        conn.sendall(greeting)
        while conn.recv(4096):
            pass


with selectors.DefaultSelector() as selector:
    for listener, greeting in listeners:
        # Non-blocking, as an event loop has them (and as lazyd's already are):
        # another process may take a connection between readable and accept.
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, greeting)
    while True:
        for key, _ in selector.select():
            try:
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            conn.setblocking(True)
            threading.Thread(target=hold, args=(conn, key.data), daemon=True).start()
