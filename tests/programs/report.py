"""A pass-mode service that reports what it was given, then serves one line.

Writes a JSON report (pid, uid, gid, groups, cwd, environment, and each passed
fd's type and address) to the path in argv[1], then answers every connection
on fd 3 with a line and exits after the first one.
"""

import json
import os
import socket
import sys

report = {
    "pid": os.getpid(),
    "uid": os.getuid(),
    "gid": os.getgid(),
    "groups": sorted(os.getgroups()),
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "fds": [],
}
for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))):
    sock = socket.socket(fileno=os.dup(fd))
    report["fds"].append(
        {
            "fd": fd,
            "type": "stream" if sock.type == socket.SOCK_STREAM else "dgram",
            "address": list(sock.getsockname()),
            "blocking": sock.getblocking(),
        }
    )
    sock.close()
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(report, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])

listener = socket.socket(fileno=3)
conn, _ = listener.accept()
conn.sendall(b"reported\n")
conn.close()
