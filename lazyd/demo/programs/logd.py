"""A log daemon on a Unix datagram socket (the seed's syslog).

Start-up takes --delay seconds; then it says READY=1 and appends every
datagram it receives, queued ones first, to --out, one per line.
"""

from __future__ import annotations

import argparse
import socket
import time

from lazyd.demo.programs.common import listening_socket, notify


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    sock = listening_socket(args.socket, socket.SOCK_DGRAM)
    time.sleep(args.delay)
    notify("READY=1\nSTATUS=logging")
    with open(args.out, "a", buffering=1) as out:
        while True:
            out.write(sock.recv(65536).decode(errors="replace") + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
