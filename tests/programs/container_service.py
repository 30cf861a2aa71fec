"""What the container tests run inside a container (the host's python3 on the
host's files): a TCP echo server on 127.0.0.1:argv[1] and, when argv[2] is
given, a UDP echo server on 127.0.0.1:argv[2].  It is pid 1 of its pid
namespace, which ignores SIGTERM unless it handles it: it exits 0 on SIGTERM.
With LAZYD_TEST_HEALTH_AFTER=SECONDS it creates /tmp/healthy that long after
it listens (what the container's healthcheck looks for)."""

import os
import signal
import socket
import sys
import threading
import time

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def serve_udp(udp: socket.socket) -> None:
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(b"udp " + data, peer)


# The UDP socket is bound before the TCP one listens: lazyd's readiness is
# the TCP connect, and a datagram it releases then must find a socket (lazyd
# sees a TCP listener within a millisecond).
if len(sys.argv) > 2:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", int(sys.argv[2])))
    threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(1024)
print(f"container listening on {sys.argv[1]}", flush=True)
after = os.environ.get("LAZYD_TEST_HEALTH_AFTER")
if after:
    def healthy() -> None:
        time.sleep(float(after))
        open("/tmp/healthy", "w").close()
    threading.Thread(target=healthy, daemon=True).start()
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
