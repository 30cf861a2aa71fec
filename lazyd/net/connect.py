"""lazyd's own non-blocking sockets to a service: starting a connect, closing
a socket trio may be waiting on, and saying in a few words why one failed.
Shared by the connect probe (`lazyd.readiness.probe`) and the proxies
(`lazyd.front`).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

import trio

from lazyd.net.addresses import Address
from lazyd.net.rights import refuse_rights


def begin_connect(upstream: Address) -> tuple[socket.socket, int]:
    """Start a non-blocking connect; return the socket and 0, EINPROGRESS or EAGAIN."""
    return connector(upstream)()


def connector(upstream: Address) -> Callable[[], tuple[socket.socket, int]]:
    """begin_connect(upstream) with the address worked out once, for a proxy
    that connects to it for every client."""
    family, sockaddr, unix = upstream.family, upstream.sockaddr(), upstream.is_unix
    # Non-blocking from the start: one ioctl less than setblocking(False).
    kind = socket.SOCK_STREAM | socket.SOCK_NONBLOCK

    def connect() -> tuple[socket.socket, int]:
        sock = socket.socket(family, kind)
        try:
            if not unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                refuse_rights(sock)  # what the service sends is bytes (see lazyd/net/rights.py)
            code = sock.connect_ex(sockaddr)
        except BaseException:
            sock.close()
            raise
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            raise OSError(code, os.strerror(code))
        return sock, code

    return connect


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
