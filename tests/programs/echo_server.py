"""A plain TCP echo server that binds its own port: argv[1] is HOST:PORT.
Prints "listening" once it accepts."""

import socket
import sys
import threading

host, port = sys.argv[1].rsplit(":", 1)
server = socket.create_server((host, int(port)))
print("listening", flush=True)


def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
