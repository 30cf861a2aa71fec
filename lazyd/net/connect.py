"""lazyd's own non-blocking sockets to a service: starting a connect, closing
a socket trio may be waiting on, and saying in a few words why one failed.
Shared by the connect probe (`lazyd.readiness.probe`) and the proxies
(`lazyd.front`).
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from lazyd.net.addresses import Address
from lazyd.net.rights import refuse_rights


def begin_connect(upstream: Address) -> tuple[socket.socket, int]:
    """Start a non-blocking connect; return the socket and 0, EINPROGRESS or EAGAIN."""
    sock = socket.socket(upstream.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if not upstream.is_unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            refuse_rights(sock)  # what the service sends is bytes (see lazyd/net/rights.py)
        code = sock.connect_ex(upstream.sockaddr())
    except BaseException:
        sock.close()
        raise
    if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        raise OSError(code, os.strerror(code))
    return sock, code


def close_socket(sock: socket.socket) -> None:
    """Close a socket trio may have registered (wakes any waiter with ClosedResourceError)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
    sock.close()


def describe(exc: BaseException) -> str:
    """An error in a few words, for a log line: the errno's text if it has one."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__
