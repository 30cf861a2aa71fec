"""A message bus on a Unix stream socket (the seed's dbus).

As soon as it runs it logs to the log daemon; start-up takes --delay seconds;
then it says READY=1 and answers every line a client sends with "ok LINE",
logging each one.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

from lazyd.demo.programs.common import listening_socket, log, notify


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    sock = listening_socket(args.socket, socket.SOCK_STREAM)
    log(args.log, "bus", "starting")
    time.sleep(args.delay)
    notify("READY=1\nSTATUS=routing messages")

    def serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for raw in lines:
                line = raw.decode().strip()
                log(args.log, "bus", f"message {line!r}")
                conn.sendall(f"ok {line}\n".encode())

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
