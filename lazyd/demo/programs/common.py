"""What the bundled programs share: taking or binding their socket, sd_notify,
and logging to the log daemon's datagram socket."""

from __future__ import annotations

import contextlib
import os
import socket


def listening_socket(path: str, kind: int) -> socket.socket:
    """The socket lazyd passed at fd 3, or (started without lazyd, as a classic
    init would) one this process binds itself."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        sock = socket.socket(fileno=3)
        sock.setblocking(True)  # O_NONBLOCK is shared with lazyd's copy: say what we want
        return sock
    sock = socket.socket(socket.AF_UNIX, kind)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock.bind(path)
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def notify(message: str) -> None:
    """sd_notify(3): send `message` to $NOTIFY_SOCKET, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def log(log_path: str, sender: str, text: str) -> None:
    """One line to the log daemon.  If its socket is held but the daemon is not
    running yet, the datagram waits in the socket: that is the whole point."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(f"{sender}: {text}".encode(), log_path)
