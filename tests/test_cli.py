"""The command line as a person meets it: --version, help with examples, the man
page, the systemd unit, and `status --watch` in a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import trio

from lazyd import cli, manpage
from lazyd.config.units import parse_unit_text, split_words
from tests.conftest import PROGRAMS, PY, ROOT, needs, run_lazyd

SYSTEM_PY = "/usr/bin/python3"  # services run as nobody, who cannot reach /root's Python
COMMANDS = list(cli.COMMANDS)


def lazyd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "lazyd", *args], capture_output=True, text=True, timeout=30)


def test_version_is_the_installed_package() -> None:
    """`lazyd --version` prints the version of the installed distribution."""
    done = lazyd("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"lazyd {metadata.version('lazyd')}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`lazyd COMMAND --help` ends with an example of that command."""
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"example:\n  {cli.EXAMPLES[command]}" in out
    assert cli.EXAMPLES[command].startswith(f"lazyd {command}")


def test_top_level_help_lists_commands_and_an_example() -> None:
    """`lazyd --help` names every command and shows an example."""
    done = lazyd("--help")
    assert done.returncode == 0
    for command in COMMANDS:
        assert command in done.stdout
    assert f"example:\n  {cli.EXAMPLES['lazyd']}" in done.stdout


def test_manpage_lists_every_subcommand() -> None:
    """lazyd(8) has a section and the example for each subcommand, and its options."""
    page = manpage.render()
    assert page.startswith(".TH LAZYD 8")
    for command in COMMANDS:
        assert f"\n.SS {command}\n" in page
        assert cli.EXAMPLES[command].replace("-", "\\-") in page
    assert "\\fB\\-\\-watch\\fR" in page and "\\fB\\-\\-unit\\-dir\\fR" in page


@needs("man")
def test_manpage_renders_with_man(tmp_path: Path) -> None:
    """`python -m lazyd.manpage > lazyd.8; man -l lazyd.8` shows the page, without
    warnings from troff."""
    page = tmp_path / "lazyd.8"
    with page.open("w") as out:
        subprocess.run([PY, "-m", "lazyd.manpage"], stdout=out, check=True, timeout=30)
    shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                           timeout=30, env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"})
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for heading in ("NAME", "SYNOPSIS", "COMMANDS", "EXIT STATUS", "SEE ALSO"):
        assert f"\n{heading}\n" in text
    for command in COMMANDS:
        assert f"\n   {command}\n" in text
    assert "lazyd import lehu.service > /etc/lazyd/lazyd.yaml" in text
    assert "warning" not in shown.stderr


def test_systemd_unit_runs_lazyd_as_a_notify_service() -> None:
    """conf/lazyd.service starts `lazyd run -c FILE` with Type=notify and reloads by
    SIGHUP, as lazyd expects."""
    assignments, problems = parse_unit_text((ROOT / "conf/lazyd.service").read_text(),
                                            "lazyd.service")
    assert problems == []
    service = {a.key: a.value for a in assignments if a.section == "Service"}
    assert service["Type"] == "notify"
    argv = split_words(service["ExecStart"])
    assert os.path.basename(argv[0]) == "lazyd" and argv[1:3] == ["run", "-c"]
    assert split_words(service["ExecReload"])[-2:] == ["-HUP", "$MAINPID"]
    assert any(a.section == "Install" and a.key == "WantedBy" for a in assignments)


@needs("systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd itself finds nothing wrong with conf/lazyd.service (and lazyd.socket),
    with ExecStart= pointing at this lazyd."""
    lazyd_bin = shutil.which("lazyd", path=os.path.dirname(PY))
    assert lazyd_bin is not None
    text = (ROOT / "conf/lazyd.service").read_text()
    (tmp_path / "lazyd.service").write_text(text.replace("/usr/local/bin/lazyd", lazyd_bin))
    shutil.copy(ROOT / "conf/lazyd.socket", tmp_path / "lazyd.socket")
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "lazyd.service")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lazyd.service" not in done.stderr, done.stderr


# --- status --watch ------------------------------------------------------------------


def watched_config(port: int) -> str:
    return f"""services:
  web:
    command: ["{SYSTEM_PY}", "{PROGRAMS / 'serve_lines.py'}", "0"]
    user: nobody
    sockets:
      http: tcp://127.0.0.1:{port}
"""


class Tmux:
    """A tmux server of our own with one shell, driven as a person would."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = ["tmux", "-S", str(tmp_path / "tmux.sock")]

    def __call__(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=10,
                              check=True)
        return done.stdout

    def start(self) -> None:
        self("new-session", "-d", "-x", "120", "-y", "24",
             "env", "-i", f"PATH={os.environ['PATH']}", "TERM=xterm-256color",
             "PS1=prompt$ ", "bash", "--norc", "--noprofile")

    def screen(self) -> list[str]:
        return [line.rstrip() for line in self("capture-pane", "-p").splitlines()]

    async def wait_screen(self, predicate: str, check: object, timeout: float = 10.0) -> list[str]:
        """Poll the pane, as the eye does, until `check(lines)` holds."""
        assert callable(check)
        with trio.fail_after(timeout):
            while True:
                lines = self.screen()
                if check(lines):
                    return lines
                await trio.sleep(0.05)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


def _row(lines: list[str], service: str) -> list[str]:
    return next((line.split() for line in lines if line.split()[:1] == [service]), [])


@needs("tmux")
async def test_watch_in_tmux(tmp_path: Path, port: int) -> None:
    """In a terminal, `lazyd status --watch` shows web idle, then running after a
    connection, redrawn in place; q quits, and the shell's screen, prompt and echo
    are back as they were."""
    tmux = Tmux(tmp_path)
    async with run_lazyd(tmp_path, watched_config(port)) as lz:
        tmux.start()
        try:
            await tmux.wait_screen("prompt", lambda lines: "prompt$" in lines[0])
            tmux("send-keys", f"{PY} -m lazyd status --watch --interval 0.2 "
                 f"--control {lz.control_path}", "Enter")
            lines = await tmux.wait_screen("idle", lambda ls: _row(ls, "web")[1:2] == ["idle"])
            assert lines[0].startswith(f"lazyd status at {lz.control_path}, every 0.2s")
            assert tmux("display", "-p", "#{alternate_on}").strip() == "1"
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"hi\n")
                await lz.wait_state("web", "running")
                lines = await tmux.wait_screen(
                    "running", lambda ls: _row(ls, "web")[1:2] == ["running"])
            # Redrawn in place: one heading, one header row, one row per service.
            assert sum(line.startswith("lazyd status at") for line in lines) == 1
            assert sum(line.startswith("SERVICE") for line in lines) == 1
            tmux("send-keys", "q")
            lines = await tmux.wait_screen(
                "prompt", lambda ls: [line for line in ls if line][-1:] == ["prompt$"])
            assert tmux("display", "-p", "#{alternate_on}").strip() == "0"
            assert not any("SERVICE" in line for line in lines)  # the table went with its screen
            tmux("send-keys", "echo typed-$((40+2))", "Enter")  # echo and line editing work
            lines = await tmux.wait_screen("echo", lambda ls: "typed-42" in ls)
            assert "prompt$ echo typed-$((40+2))" in lines
        finally:
            tmux.kill()


@needs("tmux")
async def test_watch_ctrl_c_restores_the_terminal(tmp_path: Path, port: int) -> None:
    """Ctrl-C ends the watch too, with the normal screen and the prompt back."""
    tmux = Tmux(tmp_path)
    async with run_lazyd(tmp_path, watched_config(port)) as lz:
        tmux.start()
        try:
            await tmux.wait_screen("prompt", lambda lines: "prompt$" in lines[0])
            tmux("send-keys", f"{PY} -m lazyd status --watch --control {lz.control_path}",
                 "Enter")
            await tmux.wait_screen("table", lambda ls: bool(_row(ls, "web")))
            tmux("send-keys", "C-c")
            await tmux.wait_screen(
                "prompt", lambda ls: [line for line in ls if line][-1:] == ["prompt$"])
            assert tmux("display", "-p", "#{alternate_on}").strip() == "0"
            tmux("send-keys", "echo back-$((1+1))", "Enter")
            await tmux.wait_screen("echo", lambda ls: "back-2" in ls)
        finally:
            tmux.kill()


async def test_watch_without_a_terminal_repeats_plain_tables(tmp_path: Path, port: int) -> None:
    """With stdout a pipe, --watch prints the table again every interval, with no
    escape sequences."""
    async with run_lazyd(tmp_path, watched_config(port)) as lz:
        process = await trio.lowlevel.open_process(
            [PY, "-m", "lazyd", "status", "--watch", "--interval", "0.1",
             "--control", lz.control_path],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert process.stdout is not None
        output = b""
        try:
            with trio.fail_after(10):
                while output.count(b"lazyd status at") < 3:
                    output += await process.stdout.receive_some(65536)
        finally:
            process.terminate()
            await process.wait()
        text = output.decode()
        assert "\x1b" not in text
        frames = [frame for frame in text.split("\n\n") if frame.startswith("lazyd status at")]
        assert len(frames) >= 2
        assert _row(frames[1].splitlines(), "web")[1:2] == ["idle"]


def test_watch_bad_interval_is_a_usage_error() -> None:
    """--interval must be a duration from 50ms to 1h: anything else is exit status 2."""
    done = lazyd("status", "--watch", "--interval", "0")
    assert done.returncode == 2
    assert "expected an interval from 50ms to 1h" in done.stderr
