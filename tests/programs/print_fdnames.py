"""A pass-mode service that prints what it was handed, then serves one client.

Prints LISTEN_FDNAMES, its uid and user name, and the type of each passed fd
(one line each, so they reach lazyd's log as `SERVICE: ...`), then answers
the first connection on fd 3 with "hello" and exits 0.
"""

import os
import pwd
import socket

print(f"LISTEN_FDNAMES={os.environ.get('LISTEN_FDNAMES', '')}", flush=True)
print(f"uid={os.getuid()} user={pwd.getpwuid(os.getuid()).pw_name}", flush=True)
types = []
for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))):
    with socket.socket(fileno=os.dup(fd)) as sock:
        types.append("stream" if sock.type == socket.SOCK_STREAM else "dgram")
print(f"fds={','.join(types)}", flush=True)
listener = socket.socket(fileno=3)
conn, _ = listener.accept()
conn.sendall(b"hello\n")
conn.close()
