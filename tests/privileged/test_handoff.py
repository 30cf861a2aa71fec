from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyd.privileged.handoff import arrange_fds, service_environment

HIGH = 100  # fds the tests keep out of every range under test


def in_forked_child(body: Callable[[], Any]) -> Any:
    """Run `body` in a real forked child; return what it returned (as JSON), or raise."""
    read_end, write_end = os.pipe()
    # Out of reach of whatever the child does to low fds.
    high_write = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, HIGH)
    os.close(write_end)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 0
        try:
            result: Any = {"ok": body()}
        except BaseException as exc:
            result = {"error": type(exc).__name__, "message": str(exc)}
            status = 1
        try:
            os.write(high_write, json.dumps(result).encode())
        finally:
            os._exit(status)
    os.close(high_write)
    try:
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return json.loads(data)


def open_fds(start: int, stop: int) -> list[int]:
    """Open fds in [start, stop), found without opening any (fstat only)."""
    found = []
    for fd in range(start, stop):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return found


@contextmanager
def marked_files(tmp_path: Path, count: int) -> Iterator[list[tuple[int, int]]]:
    """`count` distinct open files, each at an fd >= HIGH, with their inodes."""
    files = []
    try:
        for i in range(count):
            path = tmp_path / f"f{i}"
            path.write_text(str(i))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH)
            os.close(fd)
            files.append((high, os.fstat(high).st_ino))
        yield files
    finally:
        for high, _ in files:
            os.close(high)


def check_arrangement(tmp_path: Path, sources: Sequence[int]) -> None:
    distinct = sorted(set(sources))
    with marked_files(tmp_path, len(distinct)) as files:
        file_of = dict(zip(distinct, files, strict=True))
        end = 3 + len(sources)

        def child() -> dict[str, Any]:
            # Put a known file at every source number (the naive dup2 is safe
            # here: the files all sit at HIGH and above).
            for number, (high, _) in file_of.items():
                os.dup2(high, number)
            before = open_fds(end, 2 * HIGH)
            arrange_fds(sources)
            return {
                "inodes": [os.fstat(3 + i).st_ino for i in range(len(sources))],
                "cloexec": [
                    bool(fcntl.fcntl(3 + i, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                    for i in range(len(sources))
                ],
                "left_open": sorted(set(open_fds(end, 2 * HIGH)) - set(before)),
            }

        report = in_forked_child(child)["ok"]
    assert report["inodes"] == [file_of[fd][1] for fd in sources]
    assert report["cloexec"] == [False] * len(sources)
    assert report["left_open"] == []


@pytest.mark.parametrize(
    "sources",
    [[5, 3, 4], [4, 3], [3, 3, 4], [4, 4, 4], [6, 5, 4, 3], [9, 8], [3], [1, 3], []],
)
def test_arrange_fds_with_overlaps(tmp_path: Path, sources: list[int]) -> None:
    """Sources inside the target range, repeated, or below it all land on 3.. correctly."""
    check_arrangement(tmp_path, sources)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=9), max_size=6))
def test_arrange_fds_any_input(
    tmp_path_factory: pytest.TempPathFactory, sources: list[int]
) -> None:
    """For any list of sources, fd 3+i refers to what fds[i] referred to, inheritable."""
    check_arrangement(tmp_path_factory.mktemp("arrange"), sources)


def test_service_environment_with_sockets() -> None:
    """PATH, the configured variables, LISTEN_FDS, LISTEN_FDNAMES and NOTIFY_SOCKET; no pid."""
    env = service_environment(
        path="/usr/bin:/bin",
        environment={"GREETING": "hello"},
        fd_names=["http", "https", "quic"],
        notify_socket="/run/lazyd/notify",
    )
    assert env == {
        "PATH": "/usr/bin:/bin",
        "GREETING": "hello",
        "LISTEN_FDS": "3",
        "LISTEN_FDNAMES": "http:https:quic",
        "NOTIFY_SOCKET": "/run/lazyd/notify",
    }


def test_service_environment_without_sockets() -> None:
    """No sockets: no LISTEN_* at all; the config may override PATH."""
    env = service_environment(
        path="/bin", environment={"PATH": "/opt/bin"}, fd_names=[], notify_socket=None
    )
    assert env == {"PATH": "/opt/bin"}


def test_service_environment_protocol_variables_are_lazyds() -> None:
    """LISTEN_* and NOTIFY_SOCKET from the config never reach the service."""
    env = service_environment(
        path="/bin",
        environment={
            "LISTEN_PID": "1",
            "LISTEN_FDS": "9",
            "LISTEN_FDNAMES": "x",
            "NOTIFY_SOCKET": "y",
        },
        fd_names=["a"],
        notify_socket=None,
    )
    assert env == {"PATH": "/bin", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a"}


@pytest.mark.parametrize(
    ("environment", "names"),
    [({"A=B": "x"}, []), ({"": "x"}, []), ({"A": "x\0y"}, []), ({}, ["a:b"]), ({}, [""])],
)
def test_service_environment_rejects_what_cannot_be_passed(
    environment: dict[str, str], names: list[str]
) -> None:
    """A variable the C environment cannot hold, or a name LISTEN_FDNAMES cannot, is refused."""
    with pytest.raises(ValueError):
        service_environment(
            path="/bin", environment=environment, fd_names=names, notify_socket=None
        )
