"""`lazyd import`: systemd units in, a config `lazyd check` accepts (and runs) out."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import trio
import yaml

from lazyd import config as config_mod
from lazyd.config.units import (
    UnitError,
    UnitFiles,
    convert,
    convert_listen,
    parse_timespan,
    split_words,
)
from lazyd.net.addresses import parse_address
from tests.conftest import PROGRAMS, PY, free_port, run_lazyd

# The seed's four units exactly as the article prints them (a copy of shared/seed/units).
SEED = Path(__file__).resolve().parent.parent / "data" / "seed-units"
SEED_UNITS = ("lehu-http.socket", "lehu-https.socket", "lehu-quic.socket", "lehu.service")
# The service runs as nobody, who cannot reach the test's own interpreter under /root.
SYSTEM_PY = "/usr/bin/python3"
needs_seed = pytest.mark.skipif(not SEED.is_dir(), reason="the seed's units are not here")


def lazyd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "lazyd", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def seed_copy(tmp_path: Path) -> Path:
    units = tmp_path / "units"
    units.mkdir()
    for name in SEED_UNITS:
        shutil.copy(SEED / name, units / name)
    return units


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "imported.yaml"
    path.write_text(text)
    return lazyd("check", "-c", str(path))


def service(text: str, name: str) -> dict[str, object]:
    services = yaml.safe_load(text)["services"]
    assert isinstance(services, dict)
    found: dict[str, object] = services[name]
    return found


@needs_seed
def test_seed_units_as_written(tmp_path: Path) -> None:
    """The seed's four units become one service lehu with sockets http, https, quic
    in that order, as nobody; Group=nobody (no such group on Debian) is reported, not
    kept; the only thing `lazyd check` then objects to is the article's `ExecStart=...`."""
    units = seed_copy(tmp_path)
    done = lazyd("import", *(str(units / name) for name in SEED_UNITS))
    assert done.returncode == 0, done.stderr
    lehu = service(done.stdout, "lehu")
    assert list(lehu["sockets"]) == ["http", "https", "quic"]  # type: ignore[call-overload]
    assert lehu["sockets"] == {"http": 80, "https": 443, "quic": "udp://0.0.0.0:443"}
    assert lehu["user"] == "nobody" and lehu["command"] == ["..."]
    assert lehu["restart"] == "on-failure"
    if not _group_exists("nobody"):
        assert "group" not in lehu
        assert "# not converted: Group=nobody (no group 'nobody' on this machine" in done.stdout
        assert f"{units}/lehu.service:9: not converted: Group=nobody" in done.stderr
    assert f"{units}/lehu.service:10: not converted: KillMode=process" in done.stderr
    assert "# not converted: ListenDatagram=443 (IPv4 only" in done.stdout
    problems = check(tmp_path, done.stdout)
    assert problems.returncode == 1
    assert problems.stderr.strip().endswith("services.lehu.command: command not found: '...'")
    assert len(problems.stderr.strip().splitlines()) == 1, problems.stderr


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def seed_with_dropins(tmp_path: Path) -> tuple[Path, int, int, int]:
    """The seed's units with the drop-ins its README shows: a real program, free ports."""
    units = seed_copy(tmp_path)
    http, https, quic = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    write(units, "lehu.service.d/exec.conf",
          f"[Service]\nExecStart=\nExecStart={SYSTEM_PY} {PROGRAMS / 'print_fdnames.py'}\n")
    for name, key, port in (("http", "ListenStream", http), ("https", "ListenStream", https),
                            ("quic", "ListenDatagram", quic)):
        write(units, f"lehu-{name}.socket.d/port.conf",
              f"[Socket]\n{key}=\n{key}=127.0.0.1:{port}\n")
    return units, http, https, quic


@needs_seed
def test_seed_with_dropins_passes_check(tmp_path: Path) -> None:
    """Importing one socket unit brings its service and the service's other sockets;
    the drop-ins' reset ExecStart= and ListenStream= take effect; `lazyd check` (as root
    here) accepts the config."""
    units, http, https, quic = seed_with_dropins(tmp_path)
    done = lazyd("import", str(units / "lehu-http.socket"))
    assert done.returncode == 0, done.stderr
    lehu = service(done.stdout, "lehu")
    assert lehu["sockets"] == {"http": f"tcp://127.0.0.1:{http}",
                               "https": f"tcp://127.0.0.1:{https}",
                               "quic": f"udp://127.0.0.1:{quic}"}
    assert lehu["command"] == [SYSTEM_PY, str(PROGRAMS / "print_fdnames.py")]
    assert f"{units}/lehu.service.d/exec.conf" in done.stdout  # where it came from
    checked = check(tmp_path, done.stdout)
    assert checked.returncode == 0, checked.stderr
    assert "lehu: pass mode, user nobody" in checked.stdout


@needs_seed
async def test_seed_imported_config_runs(tmp_path: Path) -> None:
    """The imported config, run by a real daemon: three sockets held, the service
    started by the first connection as nobody, with LISTEN_FDNAMES=http:https:quic."""
    units, http, _, _ = seed_with_dropins(tmp_path)
    done = lazyd("import", str(units / "lehu.service"))
    assert done.returncode == 0, done.stderr
    async with run_lazyd(tmp_path, done.stdout) as lz:
        await lz.wait_line(r"^lazyd: holding 3 sockets")
        stream = await trio.open_tcp_stream("127.0.0.1", http)
        async with stream:
            with trio.fail_after(10):
                assert await stream.receive_some(100) == b"hello\n"
        await lz.wait_line(r"^lehu: LISTEN_FDNAMES=http:https:quic$")
        await lz.wait_line(r"^lehu: uid=65534 user=nobody$")
        await lz.wait_line(r"^lehu: fds=stream,stream,dgram$")


def test_names_dirs_and_dropins_in_systemd_order(tmp_path: Path) -> None:
    """A name is found in the first unit directory that has it; drop-ins come from
    every directory, sorted by file name, the earlier directory winning a file name;
    an empty assignment resets a list."""
    first, second = tmp_path / "etc", tmp_path / "lib"
    write(second, "web.service", "[Service]\nExecStart=/bin/false\nUser=nobody\n")
    write(first, "web.service", "[Service]\nExecStart=/bin/sleep 1\nUser=nobody\n"
          "Environment=A=1 B=2\n")
    write(second, "web.socket", "[Socket]\nListenStream=127.0.0.1:1\n")
    write(second, "web.service.d/10-env.conf", "[Service]\nEnvironment=C=lost\n")
    write(first, "web.service.d/10-env.conf", "[Service]\nEnvironment=\nEnvironment=C=3\n")
    write(second, "web.service.d/20-more.conf", "[Service]\nEnvironment=D=4\n")
    write(second, "web-.service.d/05-prefix.conf", "[Service]\nWorkingDirectory=/tmp\n")
    write(first, "web.service.d/note.txt", "[Service]\nUser=root\n")  # not a .conf
    result = convert(["web.socket"], UnitFiles(dirs=[str(first), str(second)]))
    assert result.usable, result.problems
    web = service(result.config, "web")
    assert web["command"] == ["/bin/sleep", "1"]
    assert web["environment"] == {"C": "3", "D": "4"}
    assert web["user"] == "nobody"
    # web-.service.d is a prefix of web-foo, not of web: it does not apply here.
    assert "workdir" not in web


def test_a_file_here_or_a_name_in_the_unit_dirs(tmp_path: Path) -> None:
    """`lazyd import web.socket` takes ./web.socket when there is one, else looks the
    name up (here in --unit-dir), bringing its service either way."""
    here, units = tmp_path / "here", tmp_path / "units"
    for directory, path in ((here, "/run/here.sock"), (units, "/run/units.sock")):
        write(directory, "web.socket", f"[Socket]\nListenStream={path}\n")
        write(directory, "web.service", "[Service]\nExecStart=/bin/true\nUser=nobody\n")
    from_here = lazyd("import", "--unit-dir", str(units), "web.socket", cwd=here)
    assert service(from_here.stdout, "web")["sockets"] == {"web.socket": "unix:/run/here.sock"}
    by_name = lazyd("import", "--unit-dir", str(units), "web.socket", cwd=tmp_path)
    assert service(by_name.stdout, "web")["sockets"] == {"web.socket": "unix:/run/units.sock"}


def test_dash_prefix_and_template_dropins(tmp_path: Path) -> None:
    """foo-bar@x.service gets drop-ins from foo-.service.d, foo-bar@.service.d and
    foo-bar@x.service.d, the most specific last; %i and %n are expanded."""
    write(tmp_path, "foo-bar@.service",
          "[Service]\nExecStart=/bin/echo %i %n %p %%\nUser=nobody\n")
    write(tmp_path, "foo-bar@.socket", "[Socket]\nListenStream=/run/foo-%i.sock\n")
    write(tmp_path, "foo-.service.d/a.conf", "[Service]\nEnvironment=LEVEL=prefix\n")
    write(tmp_path, "foo-bar@.service.d/b.conf", "[Service]\nEnvironment=LEVEL=template\n")
    write(tmp_path, "foo-bar@x.service.d/c.conf", "[Service]\nRestart=always\n")
    result = convert(["foo-bar@x.socket"], UnitFiles(dirs=[str(tmp_path)]))
    assert result.usable, result.problems
    svc = service(result.config, "foo-bar-x")
    assert svc["command"] == ["/bin/echo", "x", "foo-bar@x.service", "foo-bar", "%"]
    assert svc["environment"] == {"LEVEL": "template"}
    assert svc["restart"] == "always"
    assert svc["sockets"] == {"foo-bar@x.socket": "unix:/run/foo-x.sock"}


@pytest.mark.parametrize(("key", "value", "ipv6_only", "address"), [
    ("ListenStream", "80", None, "80"),
    ("ListenStream", "80", True, "tcp://[::]:80"),
    ("ListenStream", "[::]:8080", False, "8080"),
    ("ListenStream", "0.0.0.0:80", None, "tcp://0.0.0.0:80"),
    ("ListenStream", "127.0.0.1:8080", None, "tcp://127.0.0.1:8080"),
    ("ListenStream", "[::1]:8080", None, "tcp://[::1]:8080"),
    ("ListenDatagram", "10.0.0.1:53", None, "udp://10.0.0.1:53"),
    ("ListenDatagram", "[2001:db8::1]:53", None, "udp://[2001:db8::1]:53"),
    ("ListenDatagram", "443", True, "udp://[::]:443"),
    ("ListenStream", "/run/app.sock", None, "unix:/run/app.sock"),
    ("ListenDatagram", "/run/log.sock", None, "unix-dgram:/run/log.sock"),
    ("ListenStream", "@app", None, "unix:@app"),
    ("ListenDatagram", "@log", None, "unix-dgram:@log"),
])
def test_address_forms(key: str, value: str, ipv6_only: bool | None, address: str) -> None:
    """Every address form systemd accepts becomes the lazyd address of the same socket."""
    converted, remark = convert_listen(key, value, ipv6_only)
    assert converted == address and remark is None
    parse_address(converted)  # and lazyd reads it back


@pytest.mark.parametrize(("key", "value", "why"), [
    ("ListenDatagram", "443", "IPv4 only"),
])
def test_dual_stack_udp_is_remarked(key: str, value: str, why: str) -> None:
    """A bare UDP port, dual-stack under systemd, becomes IPv4 with a remark saying so."""
    converted, remark = convert_listen(key, value, None)
    assert converted == "udp://0.0.0.0:443" and remark is not None and why in remark


@pytest.mark.parametrize(("key", "value", "why"), [
    ("ListenSequentialPacket", "/run/x", "SOCK_SEQPACKET"),
    ("ListenFIFO", "/run/fifo", "not ListenFIFO="),
    ("ListenNetlink", "audit 1", "not ListenNetlink="),
    ("ListenStream", "vsock:2:1234", "AF_VSOCK"),
    ("ListenStream", "[fe80::1]:80%eth0", "interface scopes"),
    ("ListenStream", "example.com:80", "bad host"),
    ("ListenStream", "1.2.3.4:99999", "bad port"),
])
def test_addresses_lazyd_cannot_hold(key: str, value: str, why: str) -> None:
    """What lazyd cannot hold is refused with the reason, never guessed at."""
    with pytest.raises(ValueError, match=why):
        convert_listen(key, value, None)


def test_quoting() -> None:
    """systemd.syntax(7) quoting: both quotes, C escapes, \\s, \\x, octal, unicode."""
    assert split_words(r"""a "b c" 'd "e"' f\sg \x41\102\u00e9 "h\"i" ''""") == [
        "a", "b c", 'd "e"', "f g", "ABé", 'h"i', ""]
    with pytest.raises(UnitError, match="unclosed quote"):
        split_words('a "b')
    with pytest.raises(UnitError, match="unknown escape"):
        split_words(r"a\qb")


def test_timespans() -> None:
    """systemd time spans: plain seconds, units, sums; infinity."""
    assert parse_timespan("90") == 90
    assert parse_timespan("1min 30s") == 90
    assert parse_timespan("2h") == 7200
    assert parse_timespan("500ms") == 0.5
    assert parse_timespan("infinity") is None
    with pytest.raises(UnitError):
        parse_timespan("5 parsecs")


def one_service(tmp_path: Path, body: str, socket_body: str = "ListenStream=/run/t.sock\n",
                ) -> tuple[dict[str, object], str, list[str]]:
    write(tmp_path, "t.service", body)
    write(tmp_path, "t.socket", "[Socket]\n" + socket_body)
    result = convert([str(tmp_path / "t.service")], UnitFiles(dirs=[]))
    assert result.usable, result.problems
    return service(result.config, "t"), result.config, result.problems


def test_exec_start_prefixes_and_variables(tmp_path: Path) -> None:
    """ExecStart=: '@' drops argv[0] with a remark, '-' is reported, '+' and '!' run as
    root, ':' leaves $VARS alone; $VAR splits into words, ${VAR} stays one, $$ is $."""
    env = 'Environment="WORDS=one two" "ONE=a b"\n'
    cases = [
        ("@/bin/echo myname x", ["/bin/echo", "x"], "nobody", "argv[0] 'myname'"),
        ("-/bin/echo x", ["/bin/echo", "x"], "nobody", "the '-' of ExecStart"),
        ("+/bin/echo x", ["/bin/echo", "x"], "root", None),
        ("!/bin/echo x", ["/bin/echo", "x"], "root", None),
        ("!!/bin/echo x", ["/bin/echo", "x"], "nobody", None),
        (":/bin/echo $WORDS", ["/bin/echo", "$WORDS"], "nobody", None),
        ("/bin/echo $WORDS ${ONE} x${ONE}y $$HOME", ["/bin/echo", "one", "two", "a b",
                                                    "xa by", "$HOME"], "nobody", None),
        ("-@:/bin/echo zero $WORDS", ["/bin/echo", "$WORDS"], "nobody", "argv[0] 'zero'"),
        ("echo x", [shutil.which("echo", path="/usr/bin:/bin"), "x"], "nobody", None),
    ]
    for line, argv, user, remark in cases:
        svc, text, problems = one_service(
            tmp_path, f"[Service]\nUser=nobody\n{env}ExecStart={line}\n")
        assert svc["command"] == argv, line
        assert svc["user"] == user, line
        if remark:
            assert remark in text and any(remark in p for p in problems), line


def test_exec_start_it_cannot_convert(tmp_path: Path) -> None:
    """Two commands (';'), a missing ExecStart= and bad quoting leave nothing usable:
    exit status 1, each reason on stderr with FILE:LINE."""
    for body, why in (("ExecStart=/bin/echo a ; /bin/echo b\n", "one command per service"),
                      ("Type=simple\n", "no ExecStart="),
                      ("ExecStart=/bin/echo 'a\n", "unclosed quote")):
        write(tmp_path, "t.service", "[Service]\nUser=nobody\n" + body)
        write(tmp_path, "t.socket", "[Socket]\nListenStream=/run/t.sock\n")
        done = lazyd("import", str(tmp_path / "t.socket"))
        assert done.returncode == 1 and done.stdout == ""
        assert why in done.stderr, done.stderr
        assert "nothing usable remains" in done.stderr


def test_service_settings(tmp_path: Path) -> None:
    """Type, Restart, timeouts, KillSignal, WorkingDirectory and EnvironmentFile= (which
    wins over Environment=, as in systemd) carry over; what does not is said."""
    envfile = write(tmp_path, "env", '# comment\nA=from-file\nexport B="quoted value"\n')
    svc, text, problems = one_service(tmp_path, (
        "[Service]\nType=notify\nUser=nobody\nExecStart=/bin/true\nRestart=on-abnormal\n"
        "TimeoutStartSec=1min 30s\nTimeoutStopSec=500ms\nKillSignal=SIGINT\n"
        f"WorkingDirectory=-/tmp\nEnvironment=A=1 C=3\nEnvironmentFile={envfile}\n"
        "EnvironmentFile=-/nonexistent/env\nProtectSystem=strict\nNotifyAccess=all\n"))
    assert svc["ready"] == "notify"
    assert svc["start_timeout"] == "90s" and svc["stop_timeout"] == "500ms"
    assert svc["stop_signal"] == "SIGINT" and svc["workdir"] == "/tmp"
    assert svc["environment"] == {"A": "from-file", "C": "3", "B": "quoted value"}
    assert "restart" not in svc
    assert "not converted: Restart=on-abnormal" in text
    assert any(p.endswith("not converted: ProtectSystem=strict (lazyd has no such setting)")
               and ":13:" in p for p in problems)


def test_requires_between_imported_services(tmp_path: Path) -> None:
    """Requires=/Wants= of another imported service becomes `requires`; of anything
    else, a remark."""
    for name in ("a", "b"):
        write(tmp_path, f"{name}.socket", f"[Socket]\nListenStream=/run/{name}.sock\n")
    write(tmp_path, "a.service", "[Unit]\nRequires=b.service\nWants=c.service\n"
          "[Service]\nExecStart=/bin/true\nUser=nobody\n")
    write(tmp_path, "b.service", "[Service]\nExecStart=/bin/true\nUser=nobody\n")
    done = lazyd("import", str(tmp_path / "a.socket"), str(tmp_path / "b.socket"))
    assert done.returncode == 0, done.stderr
    assert service(done.stdout, "a")["requires"] == ["b"]
    assert "# not converted: Wants=c.service (not an imported lazyd service)" in done.stdout
    assert check(tmp_path, done.stdout).returncode == 0


def test_accept_yes_is_not_supported(tmp_path: Path) -> None:
    """Accept=yes (a service instance per connection) is reported, not changed."""
    write(tmp_path, "echo.socket", "[Socket]\nListenStream=127.0.0.1:7\nAccept=yes\n")
    write(tmp_path, "echo@.service", "[Service]\nExecStart=/bin/cat\nStandardInput=socket\n")
    done = lazyd("import", str(tmp_path / "echo.socket"))
    assert done.returncode == 1 and done.stdout == ""
    assert (f"{tmp_path}/echo.socket:3: not converted: Accept=yes (lazyd has no "
            "per-connection service instances") in done.stderr


def test_errors_name_file_and_line(tmp_path: Path) -> None:
    """Syntax errors and bad values say FILE:LINE; a missing unit says where it looked."""
    write(tmp_path, "t.socket", "[Socket]\nListenStream=/run/t.sock\nnonsense\n"
          "Backlog=lots\n")
    write(tmp_path, "t.service", "Stray=1\n[Service]\nExecStart=/bin/true\nUser=nobody\n"
          "ExecStart=/bin/x \\\n  --continued %H\n")
    done = lazyd("import", str(tmp_path / "t.socket"))
    assert f"{tmp_path}/t.socket:3: expected Key=value, got 'nonsense'" in done.stderr
    assert f"{tmp_path}/t.socket:4: not converted: Backlog=lots" in done.stderr
    assert f"{tmp_path}/t.service:1: Stray= is outside any section" in done.stderr
    assert f"{tmp_path}/t.service:5: not converted: ExecStart=/bin/x --continued %H" \
        in done.stderr
    missing = lazyd("import", "--unit-dir", str(tmp_path / "none"), "nothere.service")
    assert missing.returncode == 1
    assert f"nothere.service: no such unit in {tmp_path}/none" in missing.stderr


def test_socket_settings(tmp_path: Path) -> None:
    """Backlog, ReusePort, SocketMode/User/Group (on socket files) and
    FileDescriptorName carry over; two sockets of one name get distinct lazyd names."""
    svc, _, problems = one_service(
        tmp_path, "[Service]\nExecStart=/bin/true\nUser=nobody\n",
        "ListenStream=/run/t/a.sock\nListenStream=127.0.0.1:9\nFileDescriptorName=api\n"
        "Backlog=128\nReusePort=yes\nSocketMode=0660\nSocketUser=root\nSocketGroup=root\n")
    assert svc["sockets"] == {
        "api": {"listen": "unix:/run/t/a.sock", "backlog": 128, "reuse_port": True,
                "mode": 0o660, "owner": "root", "group": "root"},
        "api-2": {"listen": "tcp://127.0.0.1:9", "backlog": 128, "reuse_port": True},
    }
    assert any("fd name 'api' for a second socket" in p for p in problems)


DEBIAN_SOCKETS = sorted(glob.glob("/lib/systemd/system/*.socket"))


@pytest.mark.skipif(not DEBIAN_SOCKETS, reason="no socket units in /lib/systemd/system")
def test_units_shipped_by_debian(tmp_path: Path) -> None:
    """Every socket unit this machine's packages ship converts to a config lazyd
    accepts (as root), or says what it cannot do; never a traceback."""
    converted = 0
    for path in DEBIAN_SOCKETS:
        result = convert([path])
        if "@." in os.path.basename(path):
            assert not result.usable and "a template: name an instance" in result.problems[0]
            continue
        if result.usable:
            converted += 1
            config_mod.loads(result.config, path, as_root=True)  # raises what check says
        else:
            assert any("not converted" in p or "no such unit" in p for p in result.problems)
    assert converted >= 1
    if os.path.exists("/lib/systemd/system/systemd-journald.socket"):
        journald = convert(["systemd-journald.socket"])
        assert "# not converted: ListenNetlink=audit 1" in journald.config
        assert "syslog.socket" not in journald.config.splitlines()[0]


def test_dbus_socket_converts(tmp_path: Path) -> None:
    """dbus.socket, if installed, with its service: the bus socket handed to dbus-daemon."""
    if not os.path.exists("/lib/systemd/system/dbus.socket"):
        pytest.skip("dbus is not installed")
    result = convert(["dbus.socket"])
    assert result.usable, result.problems
    dbus = service(result.config, "dbus")
    assert dbus["sockets"] == {"dbus.socket": "unix:/run/dbus/system_bus_socket"}
    assert dbus["ready"] in ("notify", "started")
