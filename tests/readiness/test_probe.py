"""The connect probe (readiness `connect`): it runs in an idle-class thread,
hands over the connection it made, stops when cancelled, and still sees a
listener at once when every CPU is busy with other work."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from lazyd.net.addresses import Address, Kind
from lazyd.readiness import probe
from lazyd.readiness.probe import wait_connectable

LOCALHOST = "127.0.0.1"


def unbound() -> tuple[socket.socket, Address]:
    """A bound, not yet listening TCP socket and its address: nothing accepts
    there until the test calls listen()."""
    sock = socket.socket()
    sock.bind((LOCALHOST, 0))
    return sock, Address(Kind.TCP, host=LOCALHOST, port=sock.getsockname()[1])


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_the_connection_found_is_handed_over_connected() -> None:
    sock, upstream = unbound()
    with sock:
        sock.listen()
        with trio.fail_after(2):
            connection = await wait_connectable(upstream, keep=True)
        assert connection is not None
        with connection:
            accepted, _ = sock.accept()
            with accepted:
                accepted.sendall(b"hello")
                with trio.fail_after(2):
                    await trio.lowlevel.wait_readable(connection)
                assert connection.recv(5) == b"hello"
                assert not connection.getblocking()


async def test_the_probes_run_in_an_idle_class_thread() -> None:
    """The probes must not take the CPU from the service they wait for."""
    sock, upstream = unbound()
    seen: list[int] = []

    async def listen_soon() -> None:
        await trio.sleep(0.02)
        for thread in threading.enumerate():
            if thread.name == "lazyd-watch" and thread.native_id is not None:
                seen.append(os.sched_getscheduler(thread.native_id))
        sock.listen()

    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen_soon)
            with trio.fail_after(2):
                assert await wait_connectable(upstream) is None
    assert seen and set(seen) == {os.SCHED_IDLE}


async def test_a_cancelled_probe_stops_and_leaves_no_socket() -> None:
    sock, upstream = unbound()
    before = open_fds()
    with sock:
        with trio.move_on_after(0.05):
            await wait_connectable(upstream, keep=True)
        sock.listen()  # what the thread would have found now is not for anyone
        with trio.fail_after(2):
            while open_fds() - before - {str(sock.fileno())}:
                await trio.sleep(0.005)
            await trio.sleep(0.05)  # a probe after the cancel would show up here
        assert not open_fds() - before - {str(sock.fileno())}
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.accept()  # nothing was left connected


@contextmanager
def every_thread_on(cpu: int) -> Iterator[None]:
    """Pin each of this process's threads (the watch threads too) to `cpu`."""
    tasks = os.listdir("/proc/self/task")
    saved = {tid: os.sched_getaffinity(int(tid)) for tid in tasks}
    for tid in tasks:
        os.sched_setaffinity(int(tid), {cpu})
    try:
        yield
    finally:
        for tid, cpus in saved.items():
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), cpus)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CPU to pin to and one for the rest")
async def test_a_listener_is_seen_soon_while_other_work_keeps_the_cpu_busy() -> None:
    """With a busy loop on the only CPU lazyd may use, the idle-class thread
    hardly runs (3 ms to 1.3 s late, median ~100 ms, measured); trio's own
    probe sees the listener within BACKUP_INTERVAL."""
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "print(flush=True)\nwhile True: pass"],
                           stdout=subprocess.PIPE,
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    late: list[float] = []
    try:
        assert hog.stdout is not None
        hog.stdout.readline()  # it spins from now on
        with every_thread_on(cpu):
            for _ in range(5):
                sock, upstream = unbound()
                with sock:
                    listening = [0.0]

                    async def listen_soon(sock: socket.socket = sock,
                                          listening: list[float] = listening) -> None:
                        await trio.sleep(0.03)
                        sock.listen()
                        listening[0] = trio.current_time()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(listen_soon)
                        with trio.fail_after(5):
                            await wait_connectable(upstream)
                        late.append(trio.current_time() - listening[0])
    finally:
        hog.kill()
        hog.wait()
        assert hog.stdout is not None
        hog.stdout.close()
    # BACKUP_INTERVAL (20 ms) and a scheduler slice or two behind the busy loop.
    assert probe.BACKUP_INTERVAL <= 0.02
    assert statistics.median(late) <= 0.04, late
