"""The kernel data path: steering new TCP connections straight into a warm service.

This package owns everything lazyd puts into the kernel and asks of it:
`insn` (an eBPF instruction encoder), `syscall` (bpf(2), pidfd_open and
pidfd_getfd through ctypes), `steering` (the sk_lookup program, its maps and
the `Steering` object that adds and removes entries) and `diag` (open
connections to an address and the listener fd of a process, from the kernel's
socket table over NETLINK_SOCK_DIAG). It is pure Python on the standard
library: no compiler, bcc or libbpf at run time. It imports nothing from the
rest of lazyd.

Linux only (sk_lookup came in 5.9, pidfd_getfd in 5.6), x86-64 and the other
architectures `syscall` knows the bpf() number of.

Root is needed for `Steering.open()` (CAP_BPF and CAP_NET_ADMIN: creating the
maps, loading and attaching the program) and for taking another process's
socket (`syscall.take_fd`: ptrace-level access) or reading its /proc/PID/fd.
Adding, removing and reading entries needs only the map fds, so it works in a
daemon that opened the steering as root and then dropped to `nobody`.
`supported()` says whether this process can use it at all.
"""

from __future__ import annotations

import os
import platform
import re

_MINIMUM = (5, 9)


def supported() -> str | None:
    """None if this process can steer connections, else why not (one line).

    Checks the system, the kernel version and the privileges, then really
    creates the maps and loads the program (nothing is attached, and all of it
    is closed again), so a kernel built without sk_lookup or a seccomp filter
    that denies bpf() is caught here rather than at the first warm service.
    """
    if platform.system() != "Linux":
        return f"the kernel data path needs Linux (this is {platform.system()})"
    release = platform.release()
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        return f"cannot read the kernel version from {release!r}"
    if (int(match[1]), int(match[2])) < _MINIMUM:
        return f"kernel {release} is too old: BPF sk_lookup needs Linux 5.9 or later"
    if os.geteuid() != 0:
        return "loading the BPF program needs root (CAP_BPF and CAP_NET_ADMIN)"
    from . import steering, syscall

    made: list[int] = []
    try:
        for map_type, value_size, name in (
            (syscall.MAP_SOCKHASH, 8, "lazyd_probe_s"),
            (syscall.MAP_HASH, 8, "lazyd_probe_c"),
        ):
            made.append(syscall.map_create(map_type, steering.KEY.size, value_size, 1, name))
        made.append(steering.load(made[0], made[1]))
    except OSError as e:
        return f"the kernel refused the BPF program: {e}"
    finally:
        for fd in made:
            os.close(fd)
    return None
