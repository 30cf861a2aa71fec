"""A service that binds its own port (for proxy mode).

    backend.py KIND:ADDRESS [--delay S] [--echo] [--notify]

KIND is tcp (HOST:PORT), unix (PATH) or udp (HOST:PORT).  It sleeps --delay
seconds before binding (its start-up), then serves: stream clients get
"PID LINE" for each line (or, with --echo, every byte back, and EOF after the
client's EOF); UDP clients get "PID ADDRESS DATA" for each datagram, where
ADDRESS is the sender it saw.  With --notify it sends READY=1 to its
NOTIFY_SOCKET once it listens, and exits 3 if it has none.  A stream client
that sends the line "stop listening" makes it close its listening socket at
once and exit 0.5 s later, as a service on its way out does.  A TCP client
that sends "listen anew" makes it close its listening socket and listen on a
new one (as iperf3 does after each test) before it answers.  With
--accept-every S it waits S seconds before each accept, as a busy service does
(--backlog N: its listen backlog, 1024 by default).
"""

import argparse
import os
import socket
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("address")
parser.add_argument("--delay", type=float, default=0.0)
parser.add_argument("--echo", action="store_true")
parser.add_argument("--notify", action="store_true")
parser.add_argument("--accept-every", type=float, default=0.0,
                    help="a slow service: wait this long before each accept")
parser.add_argument("--backlog", type=int, default=1024)
args = parser.parse_args()
if args.notify and not os.environ.get("NOTIFY_SOCKET"):
    print("no NOTIFY_SOCKET in my environment", flush=True)
    sys.exit(3)


def ready() -> None:
    print("listening", flush=True)
    if args.notify:
        address = os.environ["NOTIFY_SOCKET"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(b"READY=1", "\0" + address[1:] if address[0] == "@" else address)

kind, _, where = args.address.partition(":")
time.sleep(args.delay)
pid = os.getpid()

if kind == "udp":
    host, port = where.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    ready()
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(b"%d %s:%d %s" % (pid, peer[0].encode(), peer[1], data), peer)

if kind == "unix":
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(where)
    server.listen(1024)
else:
    host, port = where.rsplit(":", 1)
    server = socket.create_server((host, int(port)), backlog=args.backlog)
ready()


anew = threading.Event()  # set once the listener is replaced


def listen_anew() -> None:
    global server
    old = server
    old.shutdown(socket.SHUT_RDWR)  # the main thread's accept fails, and it waits for anew
    server = socket.create_server((host, int(port)), backlog=1024)
    anew.set()


def serve(conn: socket.socket) -> None:
    with conn:
        try:
            if args.echo:
                while data := conn.recv(1 << 20):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                return
            with conn.makefile("rb") as lines:
                for line in lines:
                    if line == b"stop listening\n":
                        # shutdown(), not just close(): the main thread's accept
                        # holds the socket, and only shutdown stops the listening.
                        server.shutdown(socket.SHUT_RDWR)
                        threading.Timer(0.5, os._exit, (0,)).start()
                    if line == b"listen anew\n":
                        listen_anew()
                    conn.sendall(b"%d %s" % (pid, line))
        except OSError as exc:
            print(f"connection: {exc}", file=sys.stderr, flush=True)


while True:
    current = server
    time.sleep(args.accept_every)
    try:
        conn, _ = current.accept()
    except OSError:
        if anew.wait(5):  # "listen anew": accept on the new listener
            anew.clear()
            current.close()
            continue
        threading.Event().wait()  # "stop listening": wait for the exit it scheduled
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
