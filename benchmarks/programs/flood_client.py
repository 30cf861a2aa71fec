"""The flood benchmark's client: open N connections at once, send each a small
HTTP request, read each answer to the end; print one JSON document.

Usage: flood_client.py HOST PORT COUNT DEADLINE_SECONDS [PER_SOURCE]

With PER_SOURCE (HOST on loopback), the connections come from many client
addresses, PER_SOURCE from each: 127.0.1.1, 127.0.1.2, ... (all of 127/8 is
the loopback), as a flood from many clients does; without it, all from one.

Plain non-blocking sockets on one epoll, no framework: all N connects are
issued first (a few microseconds each), then one loop completes them, sends
the requests and reads the answers.  An event loop library would add tens of
microseconds per connection, and then the client, not the server side, would
set the pace.  Times are CLOCK_MONOTONIC (time.monotonic), the clock the
benchmark's service writes its ready time in.

Besides its times, each connection reports how often its SYN was sent again
(tcpi_total_retrans when the connect completes): a dropped SYN costs the
client a full second before the first retry.

Each connection ends as one of:
  answered   a complete HTTP 200 answer, then EOF
  reset      ECONNRESET (or EPIPE) before the answer was complete
  closed     EOF before any complete answer (closed unanswered)
  refused    ECONNREFUSED on connect
  timeout    nothing conclusive before the deadline (counted from the start)
  error:...  any other errno (named)
"""

from __future__ import annotations

import errno
import json
import resource
import select
import socket
import sys
import time

# struct tcp_info: 8 one-byte fields, then 32-bit ones; tcpi_total_retrans is
# the 24th of those (linux/tcp.h), and counts SYN retransmissions too.
_TOTAL_RETRANS = 8 + 23 * 4
_TCP_INFO_LEN = _TOTAL_RETRANS + 4
_IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; the socket module does not name it
REQUEST = b"GET / HTTP/1.0\r\nHost: flood\r\nUser-Agent: lazyd-bench\r\n\r\n"


def _error(code: int | None) -> str:
    return f"error:{errno.errorcode.get(code or 0, code)}"


def _syn_retransmits(sock: socket.socket) -> int:
    """tcpi_total_retrans of a just-connected socket: its SYN's retransmissions."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return int.from_bytes(info[_TOTAL_RETRANS:_TCP_INFO_LEN], sys.byteorder)


def _answered(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) == int(value.strip())
    return True


def main(argv: list[str]) -> int:
    host, port, count, deadline = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    per_source = int(argv[4]) if len(argv) > 4 else 0
    # Two fds per connection would be plenty; the epoll fd and stdio need a few.
    want = count + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        # Without CAP_SYS_RESOURCE the hard limit is as far as it goes.
        top = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    index: dict[int, int] = {}
    started = [0.0] * count
    connected: list[float | None] = [None] * count
    done: list[float | None] = [None] * count
    outcome = ["timeout"] * count
    retransmits = [0] * count
    data: dict[int, bytearray] = {}
    address = (host, port)
    t0 = time.monotonic()
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if per_source:
            n = i // per_source
            # The port is picked at connect(), per (source, destination).
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.{1 + n // 254}.{1 + n % 254}", 0))
        fd = sock.fileno()
        started[i] = time.monotonic()
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            outcome[i] = "refused" if code == errno.ECONNREFUSED else _error(code)
            done[i] = started[i]
            sock.close()
            continue
        socks[fd], index[fd] = sock, i
        ep.register(fd, select.EPOLLOUT)
    issued = time.monotonic()

    def finish(fd: int, result: str) -> None:
        i = index.pop(fd)
        outcome[i] = result
        done[i] = time.monotonic()
        ep.unregister(fd)
        socks.pop(fd).close()
        data.pop(fd, None)

    end = t0 + deadline
    while socks:
        left = end - time.monotonic()
        if left <= 0:
            break
        for fd, mask in ep.poll(left, 1024):
            sock = socks[fd]
            i = index[fd]
            if connected[i] is None:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == 0 and not mask & (select.EPOLLERR | select.EPOLLHUP):
                    connected[i] = time.monotonic()
                    retransmits[i] = _syn_retransmits(sock)
                    try:
                        sock.send(REQUEST)  # small: fits in an empty send buffer
                    except OSError as exc:
                        finish(fd, "reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE)
                               else _error(exc.errno))
                        continue
                    data[fd] = bytearray()
                    ep.modify(fd, select.EPOLLIN)
                    continue
                if code == errno.ECONNREFUSED:
                    finish(fd, "refused")
                elif code in (errno.ECONNRESET, 0):
                    finish(fd, "reset")
                else:
                    finish(fd, _error(code))
                continue
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                finish(fd, "reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE)
                       else _error(exc.errno))
                continue
            if chunk:
                data[fd] += chunk
            else:
                finish(fd, "answered" if _answered(bytes(data[fd])) else "closed")
    for sock in socks.values():
        sock.close()
    ep.close()
    json.dump({"t0": t0, "issued": issued, "started": started, "connected": connected,
               "done": done, "outcome": outcome,
               "syn_retransmits": retransmits}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
