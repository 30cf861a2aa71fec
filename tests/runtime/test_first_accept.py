"""The first-accept sampler: how closely it times a real accept, and that it stops when told."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from lazyd.runtime.first_accept import prepare, sample_first_accept, watch_first_accept

# On a shared machine a thread's wake-up may come late; the promise is for
# samples that come on time, so each bound gets this much room.
LATE = 0.003


@contextmanager
def listener_with(clients: int) -> Iterator[socket.socket]:
    """A listening TCP socket with `clients` connections in its accept queue."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        connections = [socket.create_connection(listener.getsockname()) for _ in range(clients)]
        try:
            yield listener
        finally:
            for connection in connections:
                connection.close()


@pytest.mark.parametrize("delay", [0.002, 0.015, 0.12])
def test_the_time_recorded_is_within_an_eighth_plus_half_a_millisecond(delay: float) -> None:
    """A connection accepted `delay` after sampling began is timed within
    delay/8 + 0.5 ms (and the slack a late thread needs)."""
    with listener_with(2) as listener:
        accepted: list[float] = []

        def accept_later() -> None:
            time.sleep(delay)
            before = time.perf_counter()
            connection, _ = listener.accept()
            accepted.extend([before, time.perf_counter()])
            connection.close()

        thread = threading.Thread(target=accept_later)
        start = time.perf_counter()
        thread.start()
        found = sample_first_accept([listener], 2, 2.0, threading.Event())
        thread.join()
    assert found is not None
    before, after = accepted
    elapsed = before - start
    assert before - elapsed / 8 - 0.0005 - LATE <= found <= after + elapsed / 8 + 0.0005 + LATE


def test_nothing_is_recorded_without_an_accept_queue() -> None:
    """A UDP socket has no accept queue to read: nothing to record, at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        started = time.perf_counter()
        assert sample_first_accept([sock], 1, 2.0, threading.Event()) is None
        assert time.perf_counter() - started < 0.5


async def test_the_thread_stops_as_soon_as_the_service_does() -> None:
    """When the service stops running, the sampling thread returns at once (not at
    the end of its window), with nothing recorded, and closes its copies."""
    stopped = trio.Event()
    found: list[float] = []

    async def running() -> bool:
        await stopped.wait()
        return False

    with listener_with(1) as listener:
        before = set(os.listdir("/proc/self/fd"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_first_accept, [listener], 1, 30.0, running, found.append)
            await trio.sleep(0.05)
            assert len(set(os.listdir("/proc/self/fd")) - before) >= 1  # its copy
            stopped.set()
        with trio.fail_after(1):
            while set(os.listdir("/proc/self/fd")) - before:
                await trio.sleep(0.005)
        assert found == []
        assert listener.fileno() >= 0  # the daemon's own listener is untouched


async def forever() -> bool:
    """A service that never stops, as watch_first_accept's `running` sees it."""
    await trio.sleep_forever()
    return True  # pragma: no cover


async def test_the_thread_records_the_accept_itself() -> None:
    """The time comes from the thread, in trio's clock, between the sample before
    the accept and the one after."""
    found: list[float] = []

    with listener_with(1) as listener:
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            nursery.start_soon(watch_first_accept, [listener], 1, 30.0, forever, found.append)
            await trio.sleep(0.02)
            before = trio.current_time()
            listener.accept()[0].close()
            after = trio.current_time()
            with trio.fail_after(1):
                while not found:
                    await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
    (first,) = found
    slack = (before - start) / 8 + 0.0005 + LATE
    assert before - slack <= first <= after + slack


def _samplers() -> int:
    return sum(t.name == "lazyd-watch" for t in threading.enumerate())


async def test_a_watch_uses_the_thread_prepared_for_it() -> None:
    """`prepare` starts a sampler thread ahead of need; a watch then runs on a
    waiting thread instead of starting one (which would cost the start ~0.2 ms)."""
    prepare()
    with trio.fail_after(1):
        while not _samplers():
            await trio.sleep(0.005)
    threads = _samplers()
    found: list[float] = []

    with listener_with(1) as listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_first_accept, [listener], 1, 30.0, forever, found.append)
            await trio.sleep(0.01)
            listener.accept()[0].close()
            with trio.fail_after(1):
                while not found:
                    await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
    assert _samplers() == threads


async def test_threads_started_for_starts_at_once_end_when_done() -> None:
    """Three services starting at once get a sampler each; once they have
    accepted, one thread is left waiting, not three."""
    found: list[float] = []
    with listener_with(1) as a, listener_with(1) as b, listener_with(1) as c:
        async with trio.open_nursery() as nursery:
            for listener in (a, b, c):
                nursery.start_soon(watch_first_accept, [listener], 1, 30.0, forever,
                                   found.append)
            await trio.sleep(0.02)
            assert _samplers() >= 3
            for listener in (a, b, c):
                listener.accept()[0].close()
            with trio.fail_after(1):
                while len(found) < 3:
                    await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
    with trio.fail_after(2):
        while _samplers() > 1:
            await trio.sleep(0.005)
