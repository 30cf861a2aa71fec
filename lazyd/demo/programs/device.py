"""A device service that talks to the bus (the seed's bluetooth).

As soon as it runs it logs, and sends "hello from device" to the bus, whose
socket exists even if the bus is still starting; start-up takes --delay
seconds; then it waits for the bus's answer, logs it, and says READY=1.  Its
own socket (for clients of the device) is served afterwards.
"""

from __future__ import annotations

import argparse
import socket
import time

from lazyd.demo.programs.common import listening_socket, log, notify


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--bus", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    sock = listening_socket(args.socket, socket.SOCK_STREAM)
    log(args.log, "device", "starting")
    bus = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bus.connect(args.bus)
    bus.sendall(b"hello from device\n")
    time.sleep(args.delay)
    answer = bus.makefile("rb").readline().decode().strip()
    log(args.log, "device", f"bus answered {answer!r}")
    notify("READY=1\nSTATUS=device online")
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(b"device online\n")


if __name__ == "__main__":
    raise SystemExit(main())
