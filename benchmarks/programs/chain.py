"""One link of the boot benchmark's dependency chain (run it with `python -I -S`).

    chain.py NAME DELAY_SECONDS OWN_SOCKET NEXT_SOCKET|- OUT_FILE
    chain.py --imports-only        (start up and exit 0: to time start-up alone)

Link i has its own Unix stream socket: taken from LISTEN_FDS when lazyd
started it, bound here otherwise (as a classic init would leave it to do). At
start it connects to link i+1's socket (NEXT_SOCKET, "-" for the last link)
and sends "hello from NAME", does DELAY_SECONDS of start-up work, waits for
link i+1's answer, and only then says READY=1 to $NOTIFY_SOCKET. From then on
it answers every line a client sends with "ok LINE".

What happened goes to OUT_FILE, one line per event, appended with O_APPEND so
that the links' lines never interleave:

    NAME received: LINE            (the server side, before it answers)
    NAME answered: ANSWER          (the client side, the answer was right)
    NAME lost: WHY                 (the client side, no right answer came)

Dozens of these start at once on a small machine, so each must cost as
little as possible: only modules the interpreter has loaded anyway or that
are cheap (no argparse, no threading), and no site (`-S`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

# Long enough for every link below this one to start and answer on a busy
# machine; a link that waits this long says READY=1 anyway and reports a loss,
# so a lost message shows in the table rather than as a hung boot.
ANSWER_TIMEOUT = 20.0


def own_socket(path: str) -> socket.socket:
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        sock = socket.socket(fileno=3)
        # O_NONBLOCK is shared with lazyd's copy of the socket: say what we want.
        sock.setblocking(True)
        return sock
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock


def record(out: str, line: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def read_line(conn: socket.socket) -> str:
    """One line, without its newline ("" at end of stream)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().rstrip("\n")


def main(argv: list[str]) -> int:
    if argv == ["--imports-only"]:
        return 0
    if len(argv) != 5:
        sys.stderr.write(__doc__ or "")
        return 2
    name, delay, path, following, out = argv[0], float(argv[1]), argv[2], argv[3], argv[4]
    listener = own_socket(path)
    hello = f"hello from {name}"
    upstream = None
    if following != "-":
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.settimeout(ANSWER_TIMEOUT)
        try:
            upstream.connect(following)
            upstream.sendall((hello + "\n").encode())
        except OSError as exc:
            record(out, f"{name} lost: {exc}")
            upstream.close()
            upstream = None
    time.sleep(delay)  # the start-up work
    if upstream is not None:
        with upstream:
            try:
                answer = read_line(upstream)
            except OSError as exc:
                answer = f"<{exc}>"
        if answer == f"ok {hello}":
            record(out, f"{name} answered: {answer}")
        else:
            record(out, f"{name} lost: {answer!r}")
    notify("READY=1")
    # One client at a time is enough: each link has one client, link i-1,
    # which closes its connection once it has its answer.
    while True:
        conn, _ = listener.accept()
        with conn:
            while line := read_line(conn):
                record(out, f"{name} received: {line}")
                conn.sendall(f"ok {line}\n".encode())


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
