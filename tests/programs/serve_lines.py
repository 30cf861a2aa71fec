"""A pass-mode line server: sleeps argv[1] seconds (its own start-up time),
then answers every connection on fd 3 with "PID LINE" for each line the client
sends.  With argv[2] == "exit-when-idle" it exits after argv[3] seconds
without connections, as a pass-mode service that goes idle does.
"""

import os
import socket
import sys
import threading
import time

time.sleep(float(sys.argv[1]))
listener = socket.socket(fileno=3)
idle_exit = len(sys.argv) > 2 and sys.argv[2] == "exit-when-idle"
if idle_exit:
    listener.settimeout(float(sys.argv[3]))
print(f"serving on fd 3 as pid {os.getpid()}", flush=True)


def serve(conn):
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(b"%d %s" % (os.getpid(), line))


while True:
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        sys.exit(0)
    conn.settimeout(None)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
