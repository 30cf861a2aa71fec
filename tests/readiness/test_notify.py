"""lazyd.readiness.notify: parsing, the notify socket with real senders, whose a sender is."""

from __future__ import annotations

import array
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from lazyd.readiness.notify import (
    NOTIFY_MAX_BYTES,
    NOTIFY_MAX_FDS,
    NotifyError,
    NotifyMessage,
    NotifySocket,
    belongs_to,
    open_notify_socket,
    parse_notify,
)
from tests.conftest import needs

SYSTEMD_NOTIFY = "/usr/bin/systemd-notify"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def kernel_address(notify: NotifySocket) -> str:
    """The NOTIFY_SOCKET value as Python's socket module wants it ('@' -> NUL)."""
    assert notify.address.startswith("@")
    return "\0" + notify.address[1:]


def send(notify: NotifySocket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one datagram to the notify socket from this process."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.sendmsg([data], ancillary, 0, kernel_address(notify))


def fd_count() -> int:
    """How many fds this process has open (listdir's own is in every count)."""
    return len(os.listdir("/proc/self/fd"))


async def eof(read_end: int) -> None:
    """Wait for EOF on a pipe: the closer threads have closed every write end."""
    os.set_blocking(read_end, False)
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(read_end)
    assert os.read(read_end, 1) == b""


async def receive(notify: NotifySocket) -> NotifyMessage:
    with trio.fail_after(5):
        return await notify.receive()


async def receive_error(notify: NotifySocket) -> NotifyError:
    with trio.fail_after(5), pytest.raises(NotifyError) as caught:
        await notify.receive()
    return caught.value


@asynccontextmanager
async def service(script: str, env: dict[str, str] | None = None) -> AsyncIterator[trio.Process]:
    """`sh -c script` in its own session, as lazyd starts a service; stdin stays open.

    The script ends with `read x`, so the shell lives until the block ends.
    """
    process = await trio.lowlevel.open_process(
        ["sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
        with trio.fail_after(5):
            await process.wait()
        assert process.stdin is not None and process.stdout is not None
        await process.stdin.aclose()
        await process.stdout.aclose()


async def read_line(process: trio.Process) -> str:
    """One line of the process's stdout (byte by byte, so nothing is read ahead)."""
    assert process.stdout is not None
    line = b""
    with trio.fail_after(5):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            assert chunk, f"stdout ended after {line!r}"
            line += chunk
    return line.decode().strip()


# -- parse_notify --------------------------------------------------------------


def test_parse_assignments() -> None:
    """Lines are KEY=VALUE; values keep '=' and spaces; empty lines are skipped."""
    assert parse_notify(b"READY=1\nSTATUS=up = ok \n\nX=") == {
        "READY": "1",
        "STATUS": "up = ok ",
        "X": "",
    }


def test_parse_later_assignment_wins() -> None:
    """A key given twice keeps its last value."""
    assert parse_notify(b"STATUS=a\nSTATUS=b\n") == {"STATUS": "b"}


def test_parse_empty() -> None:
    """An empty datagram is an empty message."""
    assert parse_notify(b"") == {}
    assert parse_notify(b"\n\n") == {}


def test_parse_carriage_returns_separate_lines() -> None:
    """'\\r' separates lines as in systemd, so 'READY=1\\r\\n' means ready."""
    assert parse_notify(b"READY=1\r\nSTATUS=x\r\n") == {"READY": "1", "STATUS": "x"}


def test_parse_utf8() -> None:
    """Values may be any UTF-8 text."""
    assert parse_notify("STATUS=prêt ✓".encode()) == {"STATUS": "prêt ✓"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"STATUS=\xff\xfe", "not UTF-8"),
        (b"READY=1\0", "NUL byte"),
        (b"READY=1\nREADY", "line 2 is not KEY=VALUE"),
        (b"=1", "empty key"),
    ],
)
def test_parse_rejects_malformed(data: bytes, reason: str) -> None:
    """Malformed input raises ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=reason):
        parse_notify(data)


# -- NotifyMessage -------------------------------------------------------------


def test_message_properties() -> None:
    """ready/stopping/status/mainpid read their fields; absent means False/None."""
    fields = {"READY": "1", "STOPPING": "1", "STATUS": "", "MAINPID": "42"}
    message = NotifyMessage(1, 0, 0, fields)
    assert (message.ready, message.stopping, message.status, message.mainpid) == (
        True,
        True,
        "",
        42,
    )
    empty = NotifyMessage(1, 0, 0, {})
    assert (empty.ready, empty.stopping, empty.status, empty.mainpid) == (False, False, None, None)
    assert not NotifyMessage(1, 0, 0, {"READY": "0"}).ready


@pytest.mark.parametrize("value", ["", "0", "-3", "+5", " 5", "5_0", "x", "99999999999"])
def test_message_bad_mainpid_is_none(value: str) -> None:
    """A MAINPID that is not a pid reads as None instead of raising."""
    assert NotifyMessage(1, 0, 0, {"MAINPID": value}).mainpid is None


# -- the socket ------------------------------------------------------------------


def test_address_names_lazyd_pid_and_service() -> None:
    """The address is @lazyd/<pid>/<service>/<8 hex>, unique per socket."""
    with open_notify_socket("web") as a, open_notify_socket("web") as b:
        prefix = f"@lazyd/{os.getpid()}/web/"
        assert a.address.startswith(prefix)
        token = a.address[len(prefix) :]
        assert len(token) == 8 and int(token, 16) >= 0
        assert a.address != b.address


def test_address_fits_sun_path() -> None:
    """A long or odd service name is cut and cleaned so the name fits in 107 bytes."""
    with open_notify_socket("ß/x\n" + "s" * 300) as notify:
        assert len(notify.address.encode()) == 1 + 107  # '@' + the abstract name
        assert notify.address.isascii() and notify.address.isprintable()
        assert notify.address.startswith(f"@lazyd/{os.getpid()}/__x_sss")


def test_close_is_idempotent() -> None:
    """close() may be called twice, outside trio too, and the context manager closes."""
    notify = open_notify_socket("svc")
    notify.close()
    notify.close()
    assert notify.closed
    with open_notify_socket("svc") as other:
        pass
    assert other.closed


async def test_receive_after_close_raises() -> None:
    """receive() on a closed socket, or one closed while waiting, raises ClosedResourceError."""
    notify = open_notify_socket("svc")
    notify.close()
    with pytest.raises(trio.ClosedResourceError):
        await notify.receive()

    notify = open_notify_socket("svc")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_close_soon, notify)
            with pytest.raises(trio.ClosedResourceError):
                await notify.receive()


async def _close_soon(notify: NotifySocket) -> None:
    await trio.testing.wait_all_tasks_blocked()
    notify.close()


async def test_receive_carries_kernel_credentials() -> None:
    """A message comes with the sender's pid, uid and gid as the kernel saw them."""
    with open_notify_socket("svc") as notify:
        send(notify, b"READY=1\nSTATUS=serving\nMAINPID=1234\nX-CUSTOM=y")
        message = await receive(notify)
    assert (message.pid, message.uid, message.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert message.ready and message.status == "serving" and message.mainpid == 1234
    assert message.fields["X-CUSTOM"] == "y"


async def test_barrier_fd_is_closed_without_leak() -> None:
    """BARRIER=1: the passed fd is closed at once, off the loop (the sender sees EOF)."""
    with open_notify_socket("svc") as notify:
        read_end, write_end = os.pipe()
        try:
            before = fd_count()
            send(notify, b"BARRIER=1", [write_end])
            os.close(write_end)
            message = await receive(notify)
            assert message.fields == {"BARRIER": "1"}
            await eof(read_end)  # no write end is open anywhere
            assert fd_count() == before - 1  # only the write end we closed is gone
        finally:
            os.close(read_end)


async def test_fds_closed_on_malformed_and_overfull_messages() -> None:
    """fds are closed even when the message is refused, and past the fd room too."""
    with open_notify_socket("svc") as notify:
        read_end, write_end = os.pipe()
        try:
            before = fd_count()
            send(notify, b"READY=1\0", [write_end])
            send(notify, b"BARRIER=1", [write_end] * (NOTIFY_MAX_FDS + 4))
            os.close(write_end)
            assert "NUL" in str(await receive_error(notify))
            error = await receive_error(notify)
            assert error.pid == os.getpid() and "file descriptors" in str(error)
            await eof(read_end)
            assert fd_count() == before - 1  # only the write end we closed is gone
        finally:
            os.close(read_end)


async def test_malformed_datagrams_raise_and_socket_keeps_working() -> None:
    """Each malformed datagram raises NotifyError with the pid; the next good one arrives."""
    bad = [b"\xff", b"READY=1\0", b"READY", b"=1", b"READY=1\nMAINPID=abc"]
    with open_notify_socket("svc") as notify:
        for data in bad:
            send(notify, data)
        send(notify, b"READY=1")
        for _ in bad:
            error = await receive_error(notify)
            assert error.pid == os.getpid()
            assert isinstance(error, ValueError) and f"from pid {os.getpid()}" in str(error)
        assert (await receive(notify)).ready


async def test_datagram_size_limit() -> None:
    """4096 bytes are accepted; 4097 bytes are malformed, not silently cut."""
    with open_notify_socket("svc") as notify:
        largest = b"STATUS=" + b"x" * (NOTIFY_MAX_BYTES - len(b"STATUS="))
        send(notify, largest)
        send(notify, largest + b"y")
        send(notify, b"READY=1")
        assert (await receive(notify)).status == "x" * (NOTIFY_MAX_BYTES - 7)
        assert "longer than 4096 bytes" in str(await receive_error(notify))
        assert (await receive(notify)).ready


# -- real senders -------------------------------------------------------------------


@needs_root
@needs("systemd-notify")
async def test_systemd_notify_from_a_shell_script() -> None:
    """`systemd-notify --ready --status=...` in a service's shell script is believed and
    returns at once (its barrier fd is closed)."""
    with open_notify_socket("svc") as notify:
        env = {"PATH": os.environ["PATH"], "NOTIFY_SOCKET": notify.address}
        script = f'{SYSTEMD_NOTIFY} --ready --status="warming up"; echo "rc=$?"; read x'
        async with service(script, env) as shell:
            message = await receive(notify)
            # systemd-notify 252, run as root, sends this one on behalf of its
            # parent: SCM_CREDENTIALS name the shell, not systemd-notify.
            assert message.pid == shell.pid
            assert belongs_to(message.pid, shell.pid)
            assert message.ready and message.status == "warming up"
            # Then, from its own pid, the barrier, which it waits on.
            barrier = await receive(notify)
            assert barrier.fields == {"BARRIER": "1"}
            assert barrier.pid != shell.pid
            # Exit status 0 long before systemd-notify's 5 s barrier timeout.
            assert await read_line(shell) == "rc=0"
            assert not belongs_to(barrier.pid, shell.pid)  # it has exited: unverifiable


@needs_root
@needs("systemd-notify")
async def test_systemd_notify_as_another_user() -> None:
    """A service running as nobody reaches the abstract socket; then systemd-notify
    cannot speak for its parent and the message carries its own pid."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    with open_notify_socket("svc") as notify:
        env = {"PATH": os.environ["PATH"], "NOTIFY_SOCKET": notify.address}
        script = (
            "setpriv --reuid=nobody --regid=nogroup --clear-groups "
            f"sh -c 'echo $$; exec {SYSTEMD_NOTIFY} --ready'; read x"
        )
        async with service(script, env) as shell:
            notify_pid = int(await read_line(shell))
            message = await receive(notify)
            assert message.ready
            assert message.pid == notify_pid != shell.pid
            assert (message.uid, message.gid) == (65534, 65534)
            # Checked while it is alive: it has not exited yet, as it waits on
            # the barrier that comes in next.
            assert belongs_to(message.pid, shell.pid)
            assert (await receive(notify)).fields == {"BARRIER": "1"}


async def test_sender_outside_the_service_does_not_belong() -> None:
    """READY=1 from a process neither descended from the service nor in its session
    does not belong to it."""
    sender_code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'READY=1', b'\\0' + sys.argv[1][1:].encode())\n"
        "s.close()\n"
        "sys.stdin.read()\n"  # stay alive until the test has looked
    )
    with open_notify_socket("svc") as notify:
        async with service("read x") as main:
            outsider = await trio.lowlevel.open_process(
                [sys.executable, "-c", sender_code, notify.address],
                stdin=subprocess.PIPE,
                start_new_session=True,
            )
            assert outsider.stdin is not None
            try:
                message = await receive(notify)
                assert message.ready and message.pid == outsider.pid
                assert not belongs_to(message.pid, main.pid)
                assert belongs_to(message.pid, os.getpid())  # our child, though
            finally:
                await outsider.stdin.aclose()
                with trio.fail_after(5):
                    await outsider.wait()


async def test_daemonised_grandchild_belongs_by_session() -> None:
    """A grandchild reparented away from the service still belongs through its session."""
    # The subshell starts sleep in the background and exits; "orphaned" is
    # printed only after the shell has reaped it, so sleep is reparented by then.
    script = "(sleep 30 >/dev/null & echo $!); echo orphaned; read x"
    async with service(script) as main:
        grandchild = int(await read_line(main))
        assert await read_line(main) == "orphaned"
        with open(f"/proc/{grandchild}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[1]) != main.pid  # not a descendant any more
        assert int(fields[3]) == main.pid  # but in the session the service leads
        assert belongs_to(grandchild, main.pid)
        assert not belongs_to(grandchild, os.getpid())


async def test_belongs_to_reads_odd_process_names() -> None:
    """A process name with spaces and parentheses does not confuse the /proc parse."""
    code = (
        "import sys\n"
        "open('/proc/self/comm', 'w').write(') 1 2 3 (x')\n"
        "print('named', flush=True)\n"
        "sys.stdin.read()\n"
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert await read_line(process) == "named"
        with open(f"/proc/{process.pid}/comm") as f:
            assert f.read() == ") 1 2 3 (x\n"
        assert belongs_to(process.pid, os.getpid())
        assert not belongs_to(process.pid, 2**22 + 1)
    finally:
        await process.stdin.aclose()
        with trio.fail_after(5):
            await process.wait()
        await process.stdout.aclose()


async def test_belongs_to_edge_cases() -> None:
    """Same pid is True; a pid that has exited, or a non-positive pid, is False."""
    assert belongs_to(os.getpid(), os.getpid())
    assert belongs_to(os.getpid(), os.getppid())
    process = await trio.lowlevel.open_process(["true"])
    with trio.fail_after(5):
        await process.wait()
    assert not belongs_to(process.pid, os.getpid())  # reaped: cannot be verified
    assert not belongs_to(0, os.getpid())
    assert not belongs_to(os.getpid(), 0)
    assert not belongs_to(-1, -1)
