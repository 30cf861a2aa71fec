"""Attacks on a real lazyd started as root, played by unprivileged processes (fork + setuid).

Each test plays one attacker position against the daemon and asserts what the
victim sees: a root file's owner and mode, what the daemon answers, what runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pwd
import resource
import shutil
import signal
import stat
import struct
import subprocess
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from lazyd.config import SocketConfig
from lazyd.errors import BindError
from lazyd.net.addresses import parse_address
from lazyd.runtime import control
from lazyd.runtime.binding import bind_socket, release_socket
from tests.conftest import PY, LazydProcess, free_port, program, run_lazyd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NOBODY = pwd.getpwnam("nobody")


# --- attackers ---------------------------------------------------------------------


def _become(account: pwd.struct_passwd) -> None:
    os.setgroups([])
    os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
    os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)


def _fork_as(account: pwd.struct_passwd, attack: Callable[[int], None]) -> tuple[int, int]:
    """Fork a child that becomes `account` and runs attack(fd of a pipe to the parent).

    Returns (pid, read end). The child writes what it wants to say to the fd
    and exits 0, or 1 with a traceback on stderr.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain system calls only, then _exit
        code = 1
        try:
            os.close(read)
            _become(account)
            attack(write)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def _collect(pid: int, read: int) -> bytes:
    """What the child said, once it has exited 0."""
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacker failed"
    return said


async def as_user(account: pwd.struct_passwd, attack: Callable[[], Any]) -> Any:
    """Run attack() as `account` in a forked child; return what it returned (JSON)."""

    def run(fd: int) -> None:
        os.write(fd, json.dumps(attack()).encode())

    def fork_and_wait() -> Any:
        return json.loads(_collect(*_fork_as(account, run)))

    return await trio.to_thread.run_sync(fork_and_wait)


_IN_CREATE = 0x100
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)


def _swap_on_create(directory: str, targets: dict[str, str], ready: int) -> None:
    """The symlink attack: whenever a file named in `targets` appears in `directory`,
    replace it at once with a symlink to its target (one rename(2) of a symlink made
    beforehand, so the name is never missing); inotify wakes us."""
    libc = ctypes.CDLL(None, use_errno=True)
    for name, target in targets.items():
        os.symlink(target, os.path.join(directory, name + ".evil"))
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, directory.encode(), _IN_CREATE) >= 0
    os.write(ready, b"watching")
    os.close(ready)
    while True:
        data = os.read(fd, 65536)
        offset = 0
        while offset < len(data):
            _wd, _mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, offset)
            start = offset + _INOTIFY_EVENT.size
            name = data[start:start + length].rstrip(b"\0").decode()
            offset = start + length
            if name in targets:
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):
                    os.rename(path + ".evil", path)


@asynccontextmanager
async def swapping(
    account: pwd.struct_passwd, directory: Path, targets: dict[str, Path]
) -> AsyncIterator[None]:
    """While inside, `account` swaps each new file named in `targets` for a symlink."""
    named = {name: str(target) for name, target in targets.items()}
    pid, read = _fork_as(account, lambda ready: _swap_on_create(str(directory), named, ready))
    try:
        with os.fdopen(read, "rb") as pipe:
            assert pipe.read(8) == b"watching"
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# --- a daemon started on a config of our own --------------------------------------


@asynccontextmanager
async def started(config: Path, prefix: Sequence[str] = ()) -> AsyncIterator[LazydProcess]:
    """`lazyd run -c config` with its stderr collected; stopped (or killed) on the way out."""
    process = await trio.lowlevel.open_process(
        [*prefix, PY, "-m", "lazyd", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    lz = LazydProcess(process, "")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lz._collect)
        try:
            yield lz
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await process.wait()
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            nursery.cancel_scope.cancel()


def _root_file(path: Path) -> Path:
    path.write_text("root's\n")
    path.chmod(0o600)
    return path


def _owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _open_to_others(directory: Path) -> None:
    """Let other users through the pytest directories down to `directory`."""
    for d in [directory, *directory.parents]:
        if d == Path("/tmp") or d == d.parent:
            break
        d.chmod(stat.S_IMODE(d.stat().st_mode) | stat.S_IXOTH)


# --- 1. symlinks on Unix socket paths ----------------------------------------------


async def test_a_control_socket_directory_nobody_owns_cannot_give_nobody_a_root_file(
    tmp_path: Path,
) -> None:
    """nobody, owning the control socket's directory, swaps the new socket for a symlink to
    a root file: lazyd refuses the directory (a config error naming it) and the root file
    keeps its owner and mode."""
    secret = _root_file(tmp_path / "secret")
    before = _owner_and_mode(secret)
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, NOBODY.pw_uid, NOBODY.pw_gid)
    _open_to_others(run)
    config = tmp_path / "lazyd.yaml"
    config.write_text(
        f"control: unix:{run / 'lazyd.sock'}\nservices:\n  web:\n    command: [/bin/true]\n"
        f"    user: nobody\n    sockets: {{s: 'tcp://127.0.0.1:{free_port()}'}}\n"
    )
    async with swapping(NOBODY, run, {"lazyd.sock": secret}), started(config) as lz:
        await lz.wait_line(r"^lazyd: holding|can be changed by a user other than root")
        assert _owner_and_mode(secret) == before
        assert await lz.process.wait() == 1
    assert (
        f"{config}:1:10: control: {run} can be changed by a user other than root: its owner, "
        "user nobody"
    ) in lz.log()


async def test_a_service_socket_directory_nobody_owns_cannot_open_up_root_files(
    tmp_path: Path,
) -> None:
    """nobody, owning the directory of a service's Unix sockets, swaps each new socket file
    for a symlink to a root-only file: lazyd refuses the directory at each socket's line and
    no root file is chmod'ed to the sockets' 0666."""
    app = tmp_path / "app"
    app.mkdir()
    os.chown(app, NOBODY.pw_uid, NOBODY.pw_gid)
    _open_to_others(app)
    count = 40  # each socket is one more chance for the race
    secrets = {f"s{i}.sock": _root_file(tmp_path / f"secret{i}") for i in range(count)}
    config = tmp_path / "lazyd.yaml"
    sockets = "".join(f"      s{i}: 'unix:{app / f's{i}.sock'}'\n" for i in range(count))
    config.write_text(
        f"control: unix:{tmp_path / 'control.sock'}\nservices:\n  web:\n"
        f"    command: [/bin/true]\n    user: nobody\n    sockets:\n{sockets}"
    )
    async with swapping(NOBODY, app, secrets), started(config) as lz:
        await lz.wait_line(r"^lazyd: holding|can be changed by a user other than root")
        opened = [str(p) for p in secrets.values() if _owner_and_mode(p) != (0, 0, 0o600)]
        assert opened == []
        assert await lz.process.wait() == 1
    assert (
        f"{config}:7:11: services.web.sockets.s0: {app} can be changed by a user other than "
        "root: its owner, user nobody"
    ) in lz.log()


async def test_a_socket_swapped_right_after_bind_is_never_chmoded_through(
    tmp_path: Path,
) -> None:
    """Binding (as root) in a directory nobody can write, as a socket of a lazyd not run as
    root would be: nobody replaces each new socket file with a symlink to a root-only file
    the moment it appears. Binding goes on until ten swaps landed right after a bind, and
    no root file is ever chmod'ed to the sockets' 0666: each such bind says what happened
    (lazyd changes only the file it bound)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, NOBODY.pw_uid, NOBODY.pw_gid)
    _open_to_others(shared)
    victims = [_root_file(tmp_path / f"file{i}") for i in range(10)]
    names = {f"s{i}.sock": victims[i % len(victims)] for i in range(12000)}
    refused: list[str] = []
    opened: list[str] = []
    async with swapping(NOBODY, shared, names):
        for name in names:
            sc = SocketConfig(name, parse_address(f"unix:{shared / name}"))
            try:
                release_socket(bind_socket(sc))
            except BindError as exc:
                refused.append(str(exc))
            opened = [str(p) for p in victims if _owner_and_mode(p) != (0, 0, 0o600)]
            if opened or len(refused) >= 10:
                break
    assert opened == []
    assert len(refused) >= 10, "the swap never landed right after a bind"
    assert all("was replaced by another file right after bind" in r for r in refused)


async def test_a_file_that_replaced_the_control_socket_survives_the_exit(
    tmp_path: Path,
) -> None:
    """When lazyd stops, it removes its control socket and socket files only while they are
    still the files it bound: a file put in their place since stays."""
    service_socket = tmp_path / "web.sock"
    config = (f"user: root\nservices:\n  web:\n    command: [/bin/true]\n    user: root\n"
              f"    sockets: {{s: 'unix:{service_socket}'}}\n")
    async with run_lazyd(tmp_path, config) as lz:
        control_path = Path(lz.control_path)
        for path in (control_path, service_socket):
            path.unlink()
            path.write_text("someone else's\n")
    for path in (control_path, service_socket):
        assert path.read_text() == "someone else's\n"


# --- 3. services sharing the daemon's uid -------------------------------------------


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "lazyd", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=20, check=False)


async def test_a_service_running_as_the_daemons_user_is_a_config_error(tmp_path: Path) -> None:
    """A service whose user is the daemon's own (top-level user:) is refused by check and run,
    naming the service and the way to opt in; it never runs. allow_shared_user: true is the
    operator's explicit choice, and then it runs."""
    out = tmp_path / "out"  # where the service, as nobody, may write
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    _open_to_others(out)
    marker = out / "ran"
    config = tmp_path / "lazyd.yaml"
    body = (
        f"services:\n  web:\n    command: [/bin/sh, -c, 'id -u > {marker}; exec sleep 60']\n"
        f"    user: nobody\n    activate: eager\n"
        f"    sockets: {{s: 'tcp://127.0.0.1:{free_port()}'}}\n"
    )
    config.write_text(f"control: unix:{tmp_path / 'control.sock'}\nuser: nobody\n{body}")
    problem = (
        f"{config}:6:11: services.web.user: nobody is the user lazyd itself runs as (the "
        "top-level user:); a service running as it could signal lazyd, lower its limits and "
        "use its control socket: give the service an account of its own, or write "
        "allow_shared_user: true at the top level to accept that"
    )
    result = await trio.to_thread.run_sync(_check, config)
    assert (result.returncode, result.stderr.strip()) == (1, problem)
    async with started(config) as lz:
        assert await lz.process.wait() == 1
    assert problem in lz.log()
    assert not marker.exists()

    config.write_text(f"control: unix:{tmp_path / 'control.sock'}\nuser: nobody\n"
                      f"allow_shared_user: true\n{body}")
    async with started(config) as lz:
        await lz.wait_line(r"^lazyd: holding")
        with trio.fail_after(10):
            while not marker.exists() or not marker.read_text():
                await trio.sleep(0.02)
        assert marker.read_text().strip() == str(NOBODY.pw_uid)


def _prlimit(pid: int, limits: tuple[int, int]) -> int:
    """prlimit(2) on another process's RLIMIT_NOFILE: 0, or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    new = (ctypes.c_ulong * 2)(*limits)
    if libc.prlimit(pid, resource.RLIMIT_NOFILE, new, None) == 0:
        return 0
    return ctypes.get_errno()


def _fd_limit(pid: int) -> str:
    """The process's 'Max open files' line (root here may lack CAP_SYS_RESOURCE for prlimit)."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return next(line for line in lines if line.startswith("Max open files"))


def _control_reply(path: str) -> Any:
    try:
        return control.request(path, "status")["ok"]
    except control.ControlError as exc:
        return str(exc)


async def test_a_services_user_can_neither_signal_limit_nor_command_the_daemon(
    tmp_path: Path,
) -> None:
    """With no user: and no lazyd account, a service runs as nobody, and a nobody process
    can neither signal the daemon, lower its fd limit, nor use the control socket (not
    even once the file is opened up: the daemon's peer check refuses uid 65534)."""
    config = ("services:\n  web:\n    command: [/bin/sleep, '60']\n    user: nobody\n"
              f"    activate: eager\n    sockets: {{s: 'tcp://127.0.0.1:{free_port()}'}}\n")
    async with run_lazyd(tmp_path, config) as lz:
        service = (await lz.wait_state("web", "running"))["pid"]
        assert os.stat(f"/proc/{service}").st_uid == NOBODY.pw_uid
        daemon = lz.process.pid
        before = _fd_limit(daemon)

        def attack() -> dict[str, Any]:
            try:
                os.kill(daemon, 0)  # what SIGSTOP and SIGKILL would need
                kill = 0
            except OSError as exc:
                kill = exc.errno or -1
            return {"kill": kill, "prlimit": _prlimit(daemon, (64, 64)),
                    "control": _control_reply(lz.control_path)}

        assert await as_user(NOBODY, attack) == {
            "kill": errno.EPERM, "prlimit": errno.EPERM,
            "control": f"cannot reach lazyd at {lz.control_path}: Permission denied",
        }
        assert _fd_limit(daemon) == before
        os.chmod(lz.control_path, 0o666)
        reply = await as_user(NOBODY, lambda: _control_reply(lz.control_path))
        assert reply.startswith(f"lazyd at {lz.control_path}: uid {NOBODY.pw_uid} may not "
                                "control lazyd")
        await lz.wait_line(rf"^lazyd: control: refused a request from uid {NOBODY.pw_uid}$")
        assert "web" in await lz.status()  # root still may


# --- 7. a config that others can change through an ACL ------------------------------


@pytest.fixture
def setfacl() -> str:
    found = shutil.which("setfacl")
    if found is None:
        pytest.fail("these tests need setfacl (Debian package acl)")
    return found


def _reload(control_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "lazyd", "reload", "--control", control_path],
                          capture_output=True, text=True, timeout=30, check=False)


def _evil(header: str, marker: Path) -> str:
    """What a user who may change the config writes: a command for root to run."""
    return (f"{header}\nservices:\n  evil:\n    command: [/bin/sh, -c, 'id -u > {marker}']\n"
            f"    user: root\n    activate: eager\n"
            f"    sockets: {{s: 'tcp://127.0.0.1:{free_port()}'}}\n")


_BACKEND = program("backend.py", "tcp:127.0.0.1:1")
_WEB = (
    "services:\n  web:\n    mode: proxy\n    command: " + _BACKEND + "\n    user: root\n"
    "    sockets: {http: {listen: 'tcp://127.0.0.1:%d', upstream: 'tcp://127.0.0.1:1'}}\n"
)


async def test_a_config_an_acl_lets_nobody_write_is_not_reloaded(
    tmp_path: Path, setfacl: str
) -> None:
    """An ACL entry lets nobody write the (root-owned, 0644) config; nobody rewrites it to
    run a command as root; the reload is refused, saying which ACL, and nothing runs."""
    marker = tmp_path / "ran-as-root"
    async with run_lazyd(tmp_path, _WEB % free_port()) as lz:
        config = tmp_path / "lazyd.yaml"
        subprocess.run([setfacl, "-m", f"u:{NOBODY.pw_name}:rw", str(config)], check=True)
        header = config.read_text().splitlines()[0]
        await as_user(NOBODY, lambda: config.write_text(_evil(header, marker)))
        result = await trio.to_thread.run_sync(_reload, lz.control_path)
        assert result.returncode == 1
        assert (f"{config}: not reloaded: {config} can be changed by a user other than root: "
                "user nobody (ACL)") in result.stderr
        await lz.wait_line(r"^lazyd: reload: .*: not reloaded: .* can be changed by a user "
                           r"other than root: user nobody \(ACL\)")
        assert set(await lz.status()) == {"web"}
    assert not marker.exists()


async def test_a_directory_an_acl_lets_nobody_write_is_not_trusted(
    tmp_path: Path, setfacl: str
) -> None:
    """An ACL lets nobody write the config's directory, so nobody could swap the file
    between the check and the read: the reload is refused at once, naming the directory's
    ACL, though the file itself is still root's."""
    async with run_lazyd(tmp_path, _WEB % free_port()) as lz:
        config = tmp_path / "lazyd.yaml"
        subprocess.run([setfacl, "-m", f"u:{NOBODY.pw_name}:rwx", str(tmp_path)], check=True)
        result = await trio.to_thread.run_sync(_reload, lz.control_path)
        assert result.returncode == 1
        assert (f"{config}: not reloaded: {tmp_path} can be changed by a user other than root: "
                "user nobody (ACL)") in result.stderr
        assert set(await lz.status()) == {"web"}


def test_a_socket_directory_an_acl_opens_to_nobody_is_refused_by_check(
    tmp_path: Path, setfacl: str
) -> None:
    """A root-owned 0755 socket directory whose ACL lets nobody write is refused as if
    nobody owned it: `lazyd check` names the directory and the ACL entry."""
    app = tmp_path / "app"
    app.mkdir(mode=0o755)
    subprocess.run([setfacl, "-m", f"u:{NOBODY.pw_name}:rwx", str(app)], check=True)
    config = tmp_path / "lazyd.yaml"
    config.write_text("services:\n  web:\n    command: [/bin/true]\n    user: nobody\n"
                      f"    sockets: {{s: 'unix:{app / 'web.sock'}'}}\n")
    result = _check(config)
    assert result.returncode == 1
    assert (f"{config}:5:18: services.web.sockets.s: {app} can be changed by a user other "
            "than root: user nobody (ACL)") in result.stderr
