"""Started as root, lazyd binds, then runs as an unprivileged user; the spawner stays root."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import trio

from lazyd import config as config_mod
from lazyd.errors import ConfigError
from lazyd.runtime.privileges import DYNAMIC_UIDS
from tests.conftest import PY, LazydProcess, alive, free_port, program, run_lazyd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NOBODY = pwd.getpwnam("nobody")


def free_privileged_port() -> int:
    """A port below 1024 that nobody listens on right now on 127.0.0.1."""
    for port in range(1023, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free privileged port")


def proc_status(pid: int, task: int | None = None) -> dict[str, str]:
    """/proc/PID/status (or one of its threads') as a mapping."""
    where = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    lines = Path(where).read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _ask(port: int, line: bytes = b"ping\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        return s.makefile("rb").read()


async def own_uid(lz: LazydProcess) -> int:
    """The uid of its own the daemon dropped to (no user: and no lazyd account)."""
    line = await lz.wait_line(r"^lazyd: dropped privileges: running as user \d+$")
    return int(line.rsplit(" ", 1)[1])


def _reload(control_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "lazyd", "reload", "--control", control_path],
        capture_output=True, text=True, timeout=20, check=False,
    )


def _proxy_service(name: str, port: int, upstream: int) -> str:
    return (
        f"  {name}:\n"
        "    mode: proxy\n"
        f"    command: {program('backend.py', f'tcp:127.0.0.1:{upstream}')}\n"
        "    user: root\n"
        f"    sockets: {{http: {{listen: 'tcp://127.0.0.1:{port}', "
        f"upstream: 'tcp://127.0.0.1:{upstream}'}}}}\n"
    )


async def test_the_daemon_runs_as_a_uid_of_its_own_and_still_proxies(tmp_path: Path) -> None:
    """With no user: and no lazyd account, the daemon binds a privileged port, becomes a uid
    that no account or group has, in every thread with no group and no capability left
    (saying so), and proxies through it."""
    port, upstream = free_privileged_port(), free_port()
    async with run_lazyd(tmp_path, "services:\n" + _proxy_service("web", port, upstream)) as lz:
        line = await lz.wait_line(r"^lazyd: no user: in the config and no lazyd account: "
                                  r"running as uid \d+, which no account, group or process has$")
        uid = await own_uid(lz)
        assert line.split("uid ")[1].startswith(f"{uid},")
        assert uid in DYNAMIC_UIDS
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)
        for task in os.listdir(f"/proc/{lz.process.pid}/task"):
            status = proc_status(lz.process.pid, int(task))
            assert status["Uid"].split() == [str(uid)] * 4
            assert status["Gid"].split() == [str(uid)] * 4
            assert status["Groups"].split() == []
            assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
        answer = await trio.to_thread.run_sync(_ask, port)
        assert answer.endswith(b" ping\n")
        # The spawner, which started the backend, is still root.
        backend = (await lz.status())["web"]["pid"]
        spawner = int(proc_status(backend)["PPid"])
        assert proc_status(spawner)["Uid"].split()[0] == "0"


async def test_services_still_start_as_their_own_users(tmp_path: Path) -> None:
    """After the daemon dropped its privileges, one service starts as nobody and one as
    root."""
    config = "services:\n" + "".join(
        f"  {name}:\n"
        "    command: [/bin/sleep, '60']\n"
        f"    user: {name}\n"
        "    activate: eager\n"
        f"    sockets: {{s: 'tcp://127.0.0.1:{free_port()}'}}\n"
        for name in ("nobody", "root")
    )
    async with run_lazyd(tmp_path, config) as lz:
        for name, uid in (("nobody", NOBODY.pw_uid), ("root", 0)):
            pid = (await lz.wait_state(name, "running"))["pid"]
            assert proc_status(pid)["Uid"].split() == [str(uid)] * 4


async def test_user_root_keeps_the_daemon_root(tmp_path: Path) -> None:
    """Top-level user: root means the daemon does not drop its privileges, with a warning."""
    config = "user: root\nservices:\n" + _proxy_service("web", free_port(), free_port())
    async with run_lazyd(tmp_path, config) as lz:
        await lz.wait_line(r"^lazyd: user: root: the daemon keeps every privilege")
        assert proc_status(lz.process.pid)["Uid"].split() == ["0"] * 4
        assert "dropped privileges" not in lz.log()


def test_an_unknown_top_level_user_is_a_config_error() -> None:
    """user: naming an account the system lacks is reported at its line and column."""
    with pytest.raises(ConfigError) as caught:
        config_mod.loads("user: lazyd-no-such-user\nservices: {}\n", "lazyd.yaml")
    assert "lazyd.yaml:1:7: user: unknown user 'lazyd-no-such-user'" in caught.value.problems


def test_not_started_as_root_a_user_is_ignored_with_a_warning() -> None:
    """Not root, lazyd keeps its own user and says that the configured one is ignored."""
    script = (
        "import os; from lazyd.runtime import privileges\n"
        "os.setgroups([]); os.setgid(1); os.setuid(1)\n"
        "print(privileges.daemon_user('nobody', print))\n"
        "print(privileges.daemon_user('daemon', print))\n"
    )
    result = subprocess.run([PY, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "lazyd: user: nobody is ignored: lazyd runs as daemon, not as root, and keeps running "
        "as daemon",
        "None",
        "None",
    ]


_CLIENT = """
import json, os, socket, sys
os.setgroups([]); os.setgid(1); os.setuid(1)  # the daemon account, not lazyd's
with socket.socket(socket.AF_UNIX) as s:
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        print(json.dumps({"connect": exc.strerror}))
        sys.exit()
    s.sendall(b'{"version": 1, "command": "status"}\\n')
    print(s.makefile().readline(), end="")
"""


async def test_the_control_socket_answers_only_lazyds_user_and_root(tmp_path: Path) -> None:
    """The control socket is 0600 and root's (lazyd runs as a uid of its own); another uid
    cannot connect, and even with the file opened up it gets an error line, and the log
    says so."""
    async with run_lazyd(tmp_path, "services:\n" + _proxy_service("web", free_port(), 1)) as lz:
        uid = await own_uid(lz)
        st = os.stat(lz.control_path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
        assert "web" in await lz.status()  # root may

        def ask_as_uid_1() -> dict[str, object]:
            result = subprocess.run(
                [PY, "-c", _CLIENT, lz.control_path],
                capture_output=True, text=True, timeout=10, check=True,
            )
            reply: dict[str, object] = json.loads(result.stdout)
            return reply

        assert await trio.to_thread.run_sync(ask_as_uid_1) == {"connect": "Permission denied"}
        os.chmod(lz.control_path, 0o666)
        assert await trio.to_thread.run_sync(ask_as_uid_1) == {
            "version": 1, "ok": False,
            "error": f"uid 1 may not control lazyd (only uid {uid} and root may)",
        }
        await lz.wait_line(r"^lazyd: control: refused a request from uid 1$")


async def test_a_reload_cannot_add_a_privileged_port(tmp_path: Path) -> None:
    """After the drop, a reload adding a port below 1024 is refused, naming it and the user,
    and changes nothing; a reload adding an unprivileged port works."""
    web, low, high = free_port(), free_privileged_port(), free_port()
    before = "services:\n" + _proxy_service("web", web, free_port())
    async with run_lazyd(tmp_path, before) as lz:
        uid = await own_uid(lz)
        config = tmp_path / "lazyd.yaml"
        header = config.read_text().splitlines()[0]
        config.write_text(f"{header}\n{before}" + _proxy_service("low", low, free_port()))
        result = await trio.to_thread.run_sync(_reload, lz.control_path)
        assert result.returncode == 1
        assert (
            f"services.low.sockets.http: cannot bind tcp://127.0.0.1:{low} as user {uid} "
            "after dropping privileges; restart lazyd to add it"
        ) in result.stderr
        assert set(await lz.status()) == {"web"}
        config.write_text(f"{header}\n{before}" + _proxy_service("high", high, free_port()))
        result = await trio.to_thread.run_sync(_reload, lz.control_path)
        assert result.returncode == 0, result.stderr
        assert (await trio.to_thread.run_sync(_ask, high)).endswith(b" ping\n")


async def test_a_reload_of_a_config_only_root_can_read_says_so(tmp_path: Path) -> None:
    """A config file lazyd's user cannot read fails the reload, naming the file and the user."""
    async with run_lazyd(tmp_path, "services:\n" + _proxy_service("web", free_port(), 1)) as lz:
        uid = await own_uid(lz)
        config = tmp_path / "lazyd.yaml"
        config.chmod(0o600)
        result = await trio.to_thread.run_sync(_reload, lz.control_path)
        assert result.returncode == 1
        assert (
            f"{config}: cannot read it as user {uid}, which lazyd runs as since it dropped its "
            f"privileges: make the file (and its directories) readable by {uid}"
        ) in result.stderr
        assert set(await lz.status()) == {"web"}


async def test_a_changed_command_is_read_by_the_spawner(tmp_path: Path) -> None:
    """A reload that changes a service's command starts the new one (the spawner read it)."""
    port = free_port()

    def service(word: str) -> str:
        return (
            "services:\n  web:\n"
            f"    command: [/bin/sh, -c, 'echo {word}; exec sleep 60']\n"
            "    user: nobody\n    activate: eager\n"
            f"    sockets: {{s: 'tcp://127.0.0.1:{port}'}}\n"
        )

    async with run_lazyd(tmp_path, service("before")) as lz:
        await lz.wait_line(r"^web: before$")
        old = (await lz.wait_state("web", "running"))["pid"]
        config = tmp_path / "lazyd.yaml"
        header = config.read_text().splitlines()[0]
        config.write_text(f"{header}\n{service('after')}")
        lz.process.send_signal(signal.SIGHUP)
        await lz.wait_line(r"^web: after$")
        assert not alive(old)


async def test_a_workdir_only_root_can_enter_survives_a_reload(tmp_path: Path) -> None:
    """A service whose workdir the dropped daemon cannot look into (root's, mode 0700) still
    reloads and starts there: the spawner, which can, checks it."""
    port = free_port()
    (tmp_path / "private").mkdir(mode=0o700)
    private = tmp_path / "private" / "app"  # inside a directory only root may enter
    private.mkdir()

    def service(word: str) -> str:
        return (
            "services:\n  web:\n"
            f"    command: [/bin/sh, -c, 'echo {word} in $PWD; exec sleep 60']\n"
            f"    user: root\n    workdir: {private}\n    activate: eager\n"
            f"    sockets: {{s: 'tcp://127.0.0.1:{port}'}}\n"
        )

    async with run_lazyd(tmp_path, service("before")) as lz:
        await lz.wait_line(rf"^web: before in {private}$")
        config = tmp_path / "lazyd.yaml"
        header = config.read_text().splitlines()[0]
        config.write_text(f"{header}\n{service('after')}")
        lz.process.send_signal(signal.SIGHUP)
        await lz.wait_line(rf"^web: after in {private}$")


_PTRACE_ATTACH = (
    "import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
    "os.setgroups([]); os.setresgid({gid}, {gid}, {gid}); os.setresuid({uid}, {uid}, {uid}); "
    "print(libc.ptrace(16, int(sys.argv[1]), 0, 0), ctypes.get_errno())"
)


async def test_the_daemons_user_cannot_ptrace_the_daemon_or_the_spawner(tmp_path: Path) -> None:
    """A process running as lazyd's user can attach to neither the dropped daemon nor the
    root spawner (the kernel leaves the daemon non-dumpable after the drop)."""
    port, upstream = free_privileged_port(), free_port()
    async with run_lazyd(tmp_path, "services:\n" + _proxy_service("web", port, upstream)) as lz:
        uid = await own_uid(lz)
        await trio.to_thread.run_sync(_ask, port)
        backend = (await lz.status())["web"]["pid"]
        spawner = int(proc_status(backend)["PPid"])
        code = _PTRACE_ATTACH.format(uid=uid, gid=uid)
        for pid in (lz.process.pid, spawner):
            result = subprocess.run([PY, "-c", code, str(pid)], capture_output=True, text=True,
                                    timeout=10, check=True)
            assert result.stdout.split() == ["-1", "1"]  # EPERM


async def test_a_config_lazyds_user_can_rewrite_is_not_reloaded(tmp_path: Path) -> None:
    """A config file owned by lazyd's user cannot make the root spawner run a new command:
    the reload fails, naming the file, and nothing changes."""
    marker = tmp_path / "ran-as-root"
    async with run_lazyd(tmp_path, "services:\n" + _proxy_service("web", free_port(), 1)) as lz:
        uid = await own_uid(lz)
        config = tmp_path / "lazyd.yaml"
        os.chown(config, uid, uid)
        header = config.read_text().splitlines()[0]
        # What a daemon taken over could write there.
        config.write_text(
            f"{header}\nservices:\n  evil:\n    command: [/bin/sh, -c, 'id -u > {marker}']\n"
            "    user: root\n"
            f"    activate: eager\n    sockets: {{s: 'tcp://127.0.0.1:{free_port()}'}}\n"
        )
        result = await trio.to_thread.run_sync(_reload, lz.control_path)
        assert result.returncode == 1
        assert f"{config} can be changed by a user other than root" in result.stderr
        assert set(await lz.status()) == {"web"}
    assert not marker.exists()


async def test_an_inheritable_capability_is_gone_after_the_drop(tmp_path: Path) -> None:
    """Started with an inheritable capability (which an exec of a program with file
    capabilities would turn back into a real one), the dropped daemon has none in any
    thread."""
    port = free_port()
    config = "services:\n" + _proxy_service("web", port, free_port())
    async with run_lazyd(tmp_path, config, prefix=["setpriv", "--inh-caps", "+net_raw"]) as lz:
        for task in os.listdir(f"/proc/{lz.process.pid}/task"):
            status = Path(f"/proc/{lz.process.pid}/task/{task}/status").read_text()
            caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
            assert all(int(caps[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapAmb"))


def test_a_failed_drop_is_one_error_line_and_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """If becoming the unprivileged user fails, `lazyd run` says so in one line and exits 1
    (no traceback)."""
    from lazyd import cli
    from lazyd.errors import LazydError
    from lazyd.runtime import privileges

    def refuse(user: privileges.User) -> None:
        raise LazydError(f"cannot become user {user.name}: Operation not permitted")

    monkeypatch.setattr(privileges, "drop", refuse)
    config = tmp_path / "lazyd.yaml"
    config.write_text(f"control: unix:{tmp_path / 'control.sock'}\nservices:\n"
                      + _proxy_service("web", free_port(), free_port()))
    assert cli.main(["run", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"^lazyd: cannot become user \d+: Operation not permitted$", err, re.M)
    assert "Traceback" not in err


def test_check_says_which_user_the_daemon_becomes(tmp_path: Path) -> None:
    """`lazyd check`, run as root, prints the plan and the user lazyd will run as after
    binding, with the same warning `run` gives when the config names none."""
    config = tmp_path / "lazyd.yaml"
    config.write_text("services:\n" + _proxy_service("web", free_port(), free_port()))
    result = subprocess.run([PY, "-m", "lazyd", "check", "-c", str(config)],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"lazyd: binds as root, then runs as user \d+",
                        result.stdout.splitlines()[-1])
    assert re.search(r"no user: in the config and no lazyd account: running as uid \d+, which "
                     "no account, group or process has", result.stderr)
