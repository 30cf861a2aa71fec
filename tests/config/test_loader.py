"""The config loader: every value checked, every problem located in the YAML."""

from __future__ import annotations

import os
import shutil
import signal
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyd.config import (
    Activate,
    Config,
    Mode,
    Ready,
    ReadyKind,
    Restart,
    ServiceConfig,
    SocketConfig,
    load,
    loads,
    parse_duration,
    parse_signal,
    plan,
)
from lazyd.config import keys as config_module
from lazyd.errors import ConfigError
from lazyd.net.addresses import Address, Kind, parse_address
from tests.conftest import assert_config_or_located_problems

TRUE = shutil.which("true") or "/bin/true"


def check(text: str, *, as_root: bool = False) -> Config:
    return loads(textwrap.dedent(text), "lazyd.yaml", as_root=as_root)


def problems(text: str, *, as_root: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        check(text, as_root=as_root)
    return caught.value.problems


def web(*lines: str) -> str:
    """One service `web` whose keys are `lines` from line 3 (column 5), then a command
    and sockets unless `lines` has them."""
    keys = {line.split(":")[0] for line in lines}
    lines += () if "command" in keys else (f"command: {TRUE}",)
    lines += () if "sockets" in keys else ("sockets: {http: 8080}",)
    return "services:\n  web:\n" + "".join(f"    {line}\n" for line in lines)


@pytest.fixture
def blog(tmp_path: Path) -> str:
    """An executable standing in for the seed's Go blog."""
    path = tmp_path / "blog"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


def test_readme_example_loads(blog: str) -> None:
    """The README's "Configuration" example, plus a second service, loads into exactly the
    expected dataclasses."""
    config = check(f"""\
        control: unix:/run/lazyd-test.sock      # status socket
        metrics: tcp://127.0.0.1:9464
        user: nobody
        services:
          blog:
            command: [{blog}, --root, /srv/blog]
            mode: pass
            user: nobody
            group: nogroup
            sockets:
              http:  tcp://0.0.0.0:80
              https: tcp://0.0.0.0:443
              quic:  udp://0.0.0.0:443
            ready: started
          wiki:
            command: sh -c 'exec python3 -m http.server --bind 127.0.0.1 8081'
            user: nobody
            sockets:
              http: 8080
        """)
    assert config == Config(
        path="lazyd.yaml",
        control="/run/lazyd-test.sock",
        metrics=Address(Kind.TCP, host="127.0.0.1", port=9464),
        user="nobody",
        services={
            "blog": ServiceConfig(
                name="blog",
                command=(blog, "--root", "/srv/blog"),
                sockets=(
                    SocketConfig("http", Address(Kind.TCP, host="0.0.0.0", port=80)),
                    SocketConfig("https", Address(Kind.TCP, host="0.0.0.0", port=443)),
                    SocketConfig("quic", Address(Kind.UDP, host="0.0.0.0", port=443)),
                ),
                mode=Mode.PASS,
                user="nobody",
                group="nogroup",
                ready=Ready(ReadyKind.STARTED),
            ),
            "wiki": ServiceConfig(
                name="wiki",
                command=("sh", "-c", "exec python3 -m http.server --bind 127.0.0.1 8081"),
                sockets=(SocketConfig("http", parse_address(8080)),),
                user="nobody",
                group="nogroup",  # nobody's primary group
            ),
        },
    )
    assert list(config.services) == ["blog", "wiki"]


def test_every_key_is_read(tmp_path: Path) -> None:
    """Every service and socket key the design names is accepted and converted."""
    config = check(f"""\
        services:
          db:
            command: [{TRUE}]
            sockets: {{db: 5432}}
          app:
            command: [{TRUE}, 8080, yes]
            user: root
            group: nogroup
            sockets:
              http: {{listen: tcp://127.0.0.1:8080, backlog: 16, reuse_port: true}}
              ctl: {{listen: unix:/run/lazyd-test.sock, mode: 0660, owner: nobody,
                    group: nogroup}}
              log: {{listen: unix-dgram:/run/lazyd-log.sock, mode: "0640"}}
            ready: {{delay: 200ms}}
            environment: {{MODE: 0660, DEBUG: yes, NAME: app, RATIO: 1.5}}
            workdir: {tmp_path}
            start_timeout: 1.5s
            stop_signal: int
            stop_timeout: 250ms
            restart: on-failure
            start_limit: 3
            start_limit_interval: 1m
            requires: [db]
            activate: eager
            queue_limit: 10
            datagram_queue_limit: 20
        """)
    app = config.services["app"]
    assert app.command == (TRUE, "8080", "yes")  # arguments exactly as written
    assert (app.user, app.group) == ("root", "nogroup")
    assert app.sockets == (
        SocketConfig("http", parse_address("tcp://127.0.0.1:8080"), backlog=16, reuse_port=True),
        SocketConfig("ctl", parse_address("unix:/run/lazyd-test.sock"), mode=0o660,
                     owner="nobody", group="nogroup"),
        SocketConfig("log", parse_address("unix-dgram:/run/lazyd-log.sock"), mode=0o640),
    )
    assert app.ready == Ready(ReadyKind.DELAY, 0.2)
    assert app.environment == {"MODE": "0660", "DEBUG": "yes", "NAME": "app", "RATIO": "1.5"}
    assert app.workdir == str(tmp_path)
    assert (app.start_timeout, app.stop_timeout, app.start_limit_interval) == (1.5, 0.25, 60.0)
    assert app.stop_signal is signal.SIGINT
    assert app.restart is Restart.ON_FAILURE
    assert (app.start_limit, app.queue_limit, app.datagram_queue_limit) == (3, 10, 20)
    assert app.requires == ("db",)
    assert app.activate is Activate.EAGER


def test_every_field_is_a_key() -> None:
    """The keys the loader accepts are exactly the config fields (the name and path aside)."""
    assert set(config_module._SERVICE_KEYS) == {f.name for f in fields(ServiceConfig)} - {"name"}
    assert set(config_module._SOCKET_KEYS) == {f.name for f in fields(SocketConfig)} - {"name"}
    assert set(config_module._TOP_KEYS) == {f.name for f in fields(Config)} - {"path"}
    assert list(config_module._SERVICE_KEYS) == SERVICE_KEYS


def test_defaults_are_the_dataclass_defaults() -> None:
    """A service that says only what it must gets every other field's dataclass default."""
    config = check(web())
    assert config.services["web"] == ServiceConfig(
        name="web", command=(TRUE,), sockets=(SocketConfig("http", parse_address(8080)),)
    )
    assert (config.control, config.metrics, config.user) == (None, None, None)


@pytest.mark.parametrize(
    ("line", "field", "value"),
    [
        ("restart: no", "restart", Restart.NO),  # YAML 1.1 reads this as false
        ("restart: 'no'", "restart", Restart.NO),
        ("restart: always", "restart", Restart.ALWAYS),
        ("stop_signal: SIGHUP", "stop_signal", signal.SIGHUP),
        ("stop_signal: sigterm", "stop_signal", signal.SIGTERM),
        ("stop_signal: 9", "stop_signal", signal.SIGKILL),
        ("ready: notify", "ready", Ready(ReadyKind.NOTIFY)),
        ("ready: {delay: 2}", "ready", Ready(ReadyKind.DELAY, 2.0)),
        ("start_limit_interval: 0", "start_limit_interval", 0.0),
        ("stop_timeout: 0.5", "stop_timeout", 0.5),
        ("start_timeout: 1h", "start_timeout", 3600.0),
        ("user: nobody", "group", "nogroup"),  # the user's primary group
        ("user: root", "group", "root"),
        ("group: nogroup", "user", None),
        ("workdir: /", "workdir", "/"),
        ("environment: {PATH: /usr/bin}", "environment", {"PATH": "/usr/bin"}),
    ],
)
def test_values(line: str, field: str, value: object) -> None:
    """Each way of writing a value gives the expected field."""
    assert getattr(check(web(line)).services["web"], field) == value


def test_file_mode_forms() -> None:
    """A Unix socket's mode may be YAML octal or an octal string."""
    config = check(web("sockets:", "  a: {listen: 'unix:/run/a', mode: 0660}",
                       "  b: {listen: 'unix:/run/b', mode: '0640'}",
                       "  c: {listen: 'unix:/run/c', mode: '0o600'}",
                       "  d: {listen: 'unix:/run/d', mode: 0}"))  # fmt: skip
    assert [s.mode for s in config.services["web"].sockets] == [0o660, 0o640, 0o600, 0]


def test_command_is_found_on_the_service_path(tmp_path: Path) -> None:
    """A bare command name is looked up on the PATH the service's environment gives it."""
    program = tmp_path / "only-here"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    config = check(web(f"environment: {{PATH: {tmp_path}}}", "command: only-here --flag"))
    assert config.services["web"].command == ("only-here", "--flag")
    relative = check(web(f"workdir: {tmp_path}", "command: ./only-here"))
    assert relative.services["web"].command == ("./only-here",)


def test_anchors_and_aliases_are_allowed() -> None:
    """A YAML alias may repeat a value written once."""
    config = check(f"""\
        services:
          a:
            command: &cmd [{TRUE}, serve]
            sockets: {{http: 8080}}
          b:
            command: *cmd
            sockets: {{http: 8081}}
        """)
    assert config.services["a"].command == config.services["b"].command == (TRUE, "serve")


SINGLE_PROBLEMS = [
    # keys
    (web("comand: x"), "3:5: services.web: unknown key 'comand' (did you mean 'command'?)"),
    (web("colour: red"), "3:5: services.web: unknown key 'colour'"),
    (web(f"command: {TRUE}", f"command: {TRUE}"),
     "4:5: services.web.command: duplicate key 'command' (first at line 3)"),
    (web("<<: {user: nobody}"),
     "3:5: services.web: merge keys (<<) are not supported; write the keys out"),
    ("services:\n  web:\n    sockets: {http: 8080}\n",
     "2:3: services.web: missing required key 'command'"),
    (f"services:\n  web:\n    command: {TRUE}\n",
     "2:3: services.web: missing required key 'sockets'"),
    # modes and what only proxy mode may say
    (web("max_connections: 10"),
     "3:22: services.web.max_connections: max_connections only applies to mode: proxy"),
    (web("mode: proxy", "sockets: {http: {listen: 8080}}"),
     "4:15: services.web.sockets.http: mode: proxy needs an upstream address for each socket"),
    (web("mode: lazy"), "3:11: services.web.mode: expected pass or proxy, got 'lazy'"),
    (web("idle_timeout: 10m"), "3:19: services.web.idle_timeout: idle_timeout needs mode: "
     "proxy (in pass mode lazyd cannot see traffic; the service exits by itself when idle "
     "and lazyd holds its sockets again)"),
    (web("ready: connect"), "3:12: services.web.ready: ready: connect only applies to mode: "
     "proxy"),
    (web("sockets:", "  http:", "    listen: 8080", "    upstream: 8081"),
     "6:19: services.web.sockets.http.upstream: upstream only applies to mode: proxy"),
    (web("sockets:", "  http:", "    listen: 8080", "    proxy_protocol: v1"),
     "6:25: services.web.sockets.http.proxy_protocol: proxy_protocol only applies to mode: "
     "proxy"),
    # sockets
    (web("sockets:", "  http: tcp://0.0.0.0:99999"),
     "4:13: services.web.sockets.http: bad port 99999: expected a number from 1 to 65535"),
    (web("sockets:", "  http: {listen: 'tcp://example.com:80'}"),
     "4:22: services.web.sockets.http.listen: bad host 'example.com': expected an IP address "
     "such as 127.0.0.1 or [::1]"),
    (web("sockets:", "  http: {backlog: 5}"),
     "4:7: services.web.sockets.http: missing required key 'listen'"),
    (web("sockets:", "  http: [8080]"), "4:13: services.web.sockets.http: expected an address "
     "or a mapping with listen:, got a list"),
    (web("sockets:", "  http: {listen: 8080, backlog: true}"),
     "4:37: services.web.sockets.http.backlog: expected a whole number from 1 to 2147483647, "
     "got true"),
    (web("sockets:", "  http: {listen: 8080, reuse_port: 1}"),
     "4:40: services.web.sockets.http.reuse_port: expected true or false, got 1"),
    (web("sockets:", "  http: {listen: 8080, mode: 0660}"),
     "4:34: services.web.sockets.http.mode: mode only applies to a Unix socket with a path "
     "(unix:/PATH or unix-dgram:/PATH)"),
    (web("sockets:", "  http: {listen: 'unix:@abstract', owner: nobody}"),
     "4:47: services.web.sockets.http.owner: owner only applies to a Unix socket with a path "
     "(unix:/PATH or unix-dgram:/PATH)"),
    (web("sockets:", "  http: {listen: 'unix:/run/x', mode: 660}"),
     "4:43: services.web.sockets.http.mode: file mode 660 would be read as a decimal number; "
     "write it in octal with a leading 0, such as 0660"),
    (web("sockets:", "  http: {listen: 'unix:/run/x', mode: '0o17777'}"),
     "4:43: services.web.sockets.http.mode: bad file mode '0o17777': expected octal 0000 to "
     "7777, such as 0660"),
    (web("sockets:", "  http: {listen: 'unix:/run/x', group: nogrup}"),
     "4:44: services.web.sockets.http.group: unknown group 'nogrup'"),
    (web("sockets: {'a:b': 8080}"), "3:15: services.web.sockets: bad socket name 'a:b': it "
     "becomes the fd name, so 1 to 255 printable ASCII characters without ':' or spaces"),
    (web("sockets: {}"), "3:14: services.web.sockets: no sockets: a service needs at least one"),
    (web("sockets: {a: 8080, b: 'tcp://[::]:8080'}"),
     "3:27: services.web.sockets.b: address tcp://[::]:8080 is already used by "
     "services.web.sockets.a"),
    # the command
    (web("command: nosuch-lazyd-program --x"),
     "3:14: services.web.command: command not found: 'nosuch-lazyd-program'"),
    (web("command: [/nonexistent/lazyd-program]"),
     "3:14: services.web.command: command not found: '/nonexistent/lazyd-program'"),
    (web("command: [/etc/passwd]"),
     "3:14: services.web.command: command is not an executable file: '/etc/passwd'"),
    (web("command: []"), "3:14: services.web.command: the command is empty"),
    (web("command: ''"), "3:14: services.web.command: the command is empty"),
    (web("command: \"sh -c 'exit\""),
     "3:14: services.web.command: cannot split the command line: No closing quotation"),
    (web("command: [sh, {a: b}]"), "3:19: services.web.command: expected a string, got a "
     "mapping"),
    (web("environment: {PATH: /nonexistent-lazyd}", "command: true"),
     "4:14: services.web.command: command not found: 'true'"),
    # users and groups
    (web("user: nobdy"), "3:11: services.web.user: unknown user 'nobdy'"),
    (web("group: nogrup"), "3:12: services.web.group: unknown group 'nogrup'"),
    (web("user: 65534"), "3:11: services.web.user: expected a non-empty string, got 65534"),
    # the other service keys
    (web("ready: soon"), "3:12: services.web.ready: expected started, notify, connect or "
     "health, got 'soon'"),
    (web("ready: {delay: forever}"), "3:20: services.web.ready.delay: bad duration 'forever': "
     "expected seconds or a number with ms, s, m or h"),
    (web("ready: {}"), "3:12: services.web.ready: missing required key 'delay'"),
    (web("environment: {LISTEN_PID: 1}"),
     "3:19: services.web.environment: LISTEN_PID is set by lazyd itself; remove it"),
    (web("environment: {NOTIFY_SOCKET: /x}"),
     "3:19: services.web.environment: NOTIFY_SOCKET is set by lazyd itself; remove it"),
    (web("environment: {1X: a}"), "3:19: services.web.environment: bad variable name '1X': "
     "use letters, digits and '_', not starting with a digit"),
    (web("environment: {A: ~}"),
     "3:22: services.web.environment.A: expected a string or number, got null"),
    (web("environment: [A=1]"), "3:18: services.web.environment: expected a mapping of "
     "variable names to values, got a list"),
    (web("workdir: srv"), "3:14: services.web.workdir: expected an absolute path, got 'srv'"),
    (web("workdir: /nonexistent-lazyd"),
     "3:14: services.web.workdir: '/nonexistent-lazyd' does not exist"),
    (web("workdir: /etc/passwd"), "3:14: services.web.workdir: '/etc/passwd' is not a directory"),
    (web("start_timeout: 10 parsecs"), "3:20: services.web.start_timeout: bad duration "
     "'10 parsecs': expected seconds or a number with ms, s, m or h"),
    (web("stop_timeout: -1"), "3:19: services.web.stop_timeout: bad duration -1: expected "
     "seconds or a number with ms, s, m or h"),
    (web("start_timeout: 0ms"),
     "3:20: services.web.start_timeout: expected a duration of more than 0, got '0ms'"),
    (web("stop_signal: SIGFOO"), "3:18: services.web.stop_signal: unknown signal 'SIGFOO'"),
    (web("stop_signal: 99"), "3:18: services.web.stop_signal: unknown signal 99"),
    (web("restart: yes"),
     "3:14: services.web.restart: true is not a restart policy: write on-failure or always"),
    (web("restart: sometimes"),
     "3:14: services.web.restart: expected no, on-failure or always, got 'sometimes'"),
    (web("start_limit: 0"), "3:18: services.web.start_limit: expected a whole number from 1 to "
     "2147483647, got 0"),
    (web("queue_limit: 1.5"), "3:18: services.web.queue_limit: expected a whole number from 1 "
     "to 2147483647, got 1.5"),
    (web("datagram_queue_limit: '5'"), "3:27: services.web.datagram_queue_limit: expected a "
     "whole number from 1 to 2147483647, got '5'"),
    (web("activate: later"), "3:15: services.web.activate: expected lazy or eager, got 'later'"),
    (web('start_limit: !!int ""'), "3:18: services.web.start_limit: cannot read '' as !!int"),
    (web("requires: [web]"), "3:16: services.web.requires: a service cannot require itself"),
    (web("requires: [wbe]"),
     "3:16: services.web.requires: unknown service 'wbe' (did you mean 'web'?)"),
    (web("requires: web"), "3:15: services.web.requires: expected a list of service names, got "
     "'web'"),
    # the top level
    ("", "1:1: the config is empty; it needs at least services:"),
    ("# nothing here\n", "1:1: the config is empty; it needs at least services:"),
    ("- web\n", "1:1: expected a mapping with a services: key, got a list"),
    ("user: nobody\n", "1:1: missing required key 'services'"),
    ("services:\n", "1:10: services: expected a mapping of service names to services, got "
     "nothing"),
    ("services: {}\n", "1:11: services: no services: define at least one"),
    ("services:\n  web: 3\n", "2:8: services.web: expected a mapping, got 3"),
    (f"services:\n  -web: {{command: {TRUE}, sockets: {{x: 1}}}}\n", "2:3: services: bad "
     "service name '-web': use letters, digits, '-', '_' and '.', starting with a letter or "
     "digit"),
    ("control: tcp://127.0.0.1:1\n" + web(),
     "1:10: control: expected unix:/PATH, got 'tcp://127.0.0.1:1'"),
    ("control: unix:@lazyd\n" + web(), "1:10: control: expected unix:/PATH, got 'unix:@lazyd'"),
    ("metrics: udp://127.0.0.1:9464\n" + web(), "1:10: metrics: expected a TCP address such "
     "as tcp://127.0.0.1:9464, got 'udp://127.0.0.1:9464'"),
    ("metrics: 8080\n" + web(),
     "5:21: services.web.sockets.http: address 8080 is already used by metrics"),
    ("user: nobdy\n" + web(), "1:7: user: unknown user 'nobdy'"),
    # YAML itself
    ("services: [\n", "2:1: YAML syntax error: expected the node content, but found "
     "'<stream end>'"),
    ("services:\n\tweb: {}\n",
     "2:1: YAML syntax error: found character '\\t' that cannot start any token"),
    ("services: {}\n---\nservices: {}\n", "2:1: YAML syntax error: expected a single document "
     "in the stream, but found another document"),
    ("services: \x01\n", "1:11: YAML syntax error: character #x0001 is not allowed"),
]


@pytest.mark.parametrize(("text", "expected"), SINGLE_PROBLEMS)
def test_one_problem(text: str, expected: str) -> None:
    """Each kind of mistake gives its exact message, at its line and column."""
    assert problems(text) == [f"lazyd.yaml:{expected}"]


def test_root_needs_a_user_per_service() -> None:
    """When lazyd runs as root, a service without `user` is refused; `user: root` is allowed."""
    assert problems(web(), as_root=True) == [
        "lazyd.yaml:2:3: services.web: lazyd runs as root, so this service must name a user "
        "(write 'user: root' to run it as root)"
    ]
    assert check(web("user: root"), as_root=True).services["web"].user == "root"
    assert check(web(), as_root=False).services["web"].user is None


def test_as_root_defaults_to_the_effective_uid() -> None:
    """Without as_root, the loader asks whether this process runs as root."""
    if os.geteuid() == 0:
        with pytest.raises(ConfigError, match="must name a user"):
            loads(web())
    else:
        assert loads(web()).services["web"].user is None


def test_address_used_by_another_service() -> None:
    """Two services cannot bind one address; a bare port overlaps 0.0.0.0 on that port."""
    assert problems(f"""\
        services:
          a:
            command: {TRUE}
            sockets: {{web: 8080}}
          b:
            command: {TRUE}
            sockets: {{http: tcp://0.0.0.0:8080}}
        """) == [
        "lazyd.yaml:7:21: services.b.sockets.http: address tcp://0.0.0.0:8080 is already used "
        "by services.a.sockets.web"
    ]


def test_dependency_cycles_are_named() -> None:
    """A requires cycle is reported once, at its first service, naming every step."""
    text = f"""\
        services:
          a:
            command: {TRUE}
            sockets: {{http: 8080}}
            requires: [b]
          b:
            command: {TRUE}
            sockets: {{http: 8081}}
            requires: [c]
          c:
            command: {TRUE}
            sockets: {{http: 8082}}
            requires: [a, b]
        """
    assert problems(text) == [
        "lazyd.yaml:5:15: services.a.requires: dependency cycle: a -> b -> c -> a",
        "lazyd.yaml:9:15: services.b.requires: dependency cycle: b -> c -> b",
    ]
    a = f"  a: {{command: {TRUE}, sockets: {{x: 1}}, requires: [b]}}"
    b = f"  b: {{command: {TRUE}, sockets: {{x: 2}}, requires: [a]}}"
    assert problems(f"services:\n{a}\n{b}\n") == [
        f"lazyd.yaml:2:{a.index('[b]') + 1}: services.a.requires: dependency cycle: a -> b -> a"
    ]


def test_many_problems_are_reported_together() -> None:
    """One pass reports every problem, in file order."""
    assert problems(f"""\
        contrl: unix:/run/x.sock
        services:
          web:
            command: {TRUE}
            sockets:
              http: tcp://0.0.0.0:99999
            stop_signal: SIGFOO
          db:
            command: nosuch-lazyd-program
            user: nobdy
            sockets: {{pg: 5432}}
            requires: [wbe]
        """) == [
        "lazyd.yaml:1:1: unknown key 'contrl' (did you mean 'control'?)",
        "lazyd.yaml:6:13: services.web.sockets.http: bad port 99999: expected a number from 1 "
        "to 65535",
        "lazyd.yaml:7:18: services.web.stop_signal: unknown signal 'SIGFOO'",
        "lazyd.yaml:9:14: services.db.command: command not found: 'nosuch-lazyd-program'",
        "lazyd.yaml:10:11: services.db.user: unknown user 'nobdy'",
        "lazyd.yaml:12:16: services.db.requires: unknown service 'wbe' (did you mean 'web'?)",
    ]


def test_plan_shows_the_seeds_blog(blog: str) -> None:
    """plan() lists the blog's sockets at fds 3, 4, 5 in config order, aligned."""
    config = check(f"""\
        services:
          blog:
            command: [{blog}, --root, /srv/blog]
            user: nobody
            sockets:
              http:  tcp://0.0.0.0:80
              https: tcp://0.0.0.0:443
              quic:  udp://0.0.0.0:443
        """)
    assert plan(config) == textwrap.dedent(f"""\
        lazyd.yaml: 1 service, config OK
        blog: pass mode, user nobody, group nogroup, ready started, activate lazy
          fd 3  http   tcp://0.0.0.0:80
          fd 4  https  tcp://0.0.0.0:443
          fd 5  quic   udp://0.0.0.0:443
          command: {blog} --root /srv/blog""")


def test_plan_shows_what_differs() -> None:
    """plan() names lazyd's own user when none is given, requirements and socket settings."""
    config = check(f"""\
        services:
          db:
            command: [{TRUE}]
            sockets: {{db: 'unix:/run/db.sock'}}
          app:
            command: [{TRUE}, 'two words']
            sockets:
              ctl: {{listen: 'unix:/run/app.sock', mode: 0600, backlog: 8}}
            requires: [db]
            ready: {{delay: 1.5s}}
            environment: {{SECRET: hunter2}}
        """)
    assert plan(config).splitlines()[4:] == [
        "app: pass mode, user (lazyd's own), group (lazyd's own), ready delay 1500 ms, "
        "activate lazy",
        "  fd 3  ctl  unix:/run/app.sock  (backlog 8, mode 0600)",
        f"  command: {TRUE} 'two words'",
        "  requires: db",
        "  environment: SECRET",
    ]


def test_plan_shows_connection_limits() -> None:
    """plan() lists a proxied service's connection limits, when it has any."""
    config = check(f"""\
        services:
          wiki:
            mode: proxy
            command: [{TRUE}]
            max_connections: 100
            max_connections_per_source: 10
            sockets:
              http: {{listen: 'tcp://127.0.0.1:8080', upstream: 'tcp://127.0.0.1:8081'}}
        """)
    assert "  limits: max_connections 100, max_connections_per_source 10" in plan(
        config).splitlines()


def test_load_reads_a_file(tmp_path: Path) -> None:
    """load() reads the file and names it in every message."""
    path = tmp_path / "lazyd.yaml"
    path.write_text(web())
    assert load(str(path), as_root=False).path == str(path)
    path.write_text(web("user: nobdy"))
    with pytest.raises(ConfigError) as caught:
        load(str(path), as_root=False)
    assert caught.value.problems == [f"{path}:3:11: services.web.user: unknown user 'nobdy'"]


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    """A missing file, a directory and bytes that are not UTF-8 each give one clear line."""
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load(str(missing))
    assert caught.value.problems == [f"{missing}: cannot read: No such file or directory"]
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path))
    assert caught.value.problems == [f"{tmp_path}: cannot read: Is a directory"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"services:\n  w\xffb: {}\n")
    with pytest.raises(ConfigError) as caught:
        load(str(binary))
    assert caught.value.problems == [f"{binary}:2:4: not UTF-8 text"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("1.5s", 1.5), ("10m", 600.0), ("1h", 3600.0),
     (" 2 s ", 2.0), ("7", 7.0), (".5", 0.5), (3, 3.0), (0.25, 0.25), (0, 0.0)],
)  # fmt: skip
def test_parse_duration(text: object, seconds: float) -> None:
    """Durations are numbers of seconds, or numbers with ms, s, m or h."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10 parsecs", "", "s", "-1s", "1d", "1e3", True, -1, None,
                                  float("inf"), float("nan"), 10**400])  # fmt: skip
def test_parse_duration_refuses(text: object) -> None:
    """Anything else is a ValueError that shows the value and the accepted forms."""
    with pytest.raises(ValueError, match=r"^bad duration .*: expected seconds or a number with "):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("SIGTERM", signal.SIGTERM), ("TERM", signal.SIGTERM), ("sigterm", signal.SIGTERM),
     ("hup", signal.SIGHUP), (15, signal.SIGTERM), ("9", signal.SIGKILL)],
)  # fmt: skip
def test_parse_signal(text: object, expected: signal.Signals) -> None:
    """Signals are named with or without SIG, in any case, or given by number."""
    assert parse_signal(text) is expected


@pytest.mark.parametrize(("text", "message"), [("SIGFOO", "unknown signal 'SIGFOO'"),
                         (0, "unknown signal 0"), (True, "unknown signal true"),
                         ("", "unknown signal ''"), (None, "unknown signal null")])  # fmt: skip
def test_parse_signal_refuses(text: object, message: str) -> None:
    """An unknown signal is a ValueError naming it."""
    with pytest.raises(ValueError) as caught:
        parse_signal(text)
    assert str(caught.value) == message


# --- Whatever is written, the answer is a Config or located problems -------------------

SERVICE_KEYS = [
    "command", "mode", "user", "group", "sockets", "ready", "environment", "workdir",
    "start_timeout", "stop_signal", "stop_timeout", "restart", "start_limit",
    "start_limit_interval", "requires", "activate", "queue_limit", "datagram_queue_limit",
    "idle_timeout", "max_connections", "flow_timeout", "max_connections_per_source",
    "connection_idle_timeout", "datapath", "container", "engine", "engine_tls",
]  # fmt: skip
SOCKET_KEYS = ["listen", "upstream", "backlog", "reuse_port", "mode", "owner", "group",
               "proxy_protocol", "allow", "deny"]  # fmt: skip
TOP_KEYS = ["control", "metrics", "user", "services"]

plausible = st.sampled_from([
        "250ms", "1.5s", "0", "-3", "SIGTERM", "term", "no", "on-failure", "always", "pass",
        "proxy", "lazy", "eager", "started", "notify", "connect", "nobody", "nogroup", "root",
        "0660", "v1", "v2", "/", "/tmp", TRUE, "true --flag", "web", "db", "tcp://0.0.0.0:8080",
        "8080", "udp://[::1]:53", "unix:/run/lazyd-x.sock", "unix:@x", "unix-dgram:/run/y",
        "LISTEN_FDS", "PATH", "'unclosed", "a\0b", 0o660, 660, 1, 3.5,
        "10.0.0.0/8", "10.0.0.1/8", "::1", "::ffff:10.0.0.0/104", ["127.0.0.1", "::1/128"],
])  # fmt: skip
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), plausible
)
keys = st.one_of(st.text(max_size=8), st.sampled_from(SERVICE_KEYS + SOCKET_KEYS + TOP_KEYS))
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)
values = st.one_of(plausible, scalars, trees)  # mostly values that could be right


@settings(max_examples=300, deadline=None)
@given(trees, st.booleans())
def test_any_document(document: Any, as_root: bool) -> None:
    """Any YAML document gives a Config or ConfigError lines that all start FILE:LINE:COL."""
    assert_config_or_located_problems(yaml.safe_dump(document), as_root)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(SERVICE_KEYS), values, max_size=6),
    st.dictionaries(st.sampled_from(SOCKET_KEYS), values, max_size=4),
    st.dictionaries(st.sampled_from(TOP_KEYS[:3]), values, max_size=2),
    st.booleans(),
)
def test_any_value_for_every_key(
    service: dict[str, Any], socket: dict[str, Any], top: dict[str, Any], as_root: bool
) -> None:
    """Random values for known keys in an otherwise valid config never raise anything else."""
    web = {"command": [TRUE], "user": "nobody", "sockets": {"http": {"listen": 8080, **socket}}}
    db = {"command": TRUE, "sockets": {"pg": 5432}, "requires": ["web"]}
    document = {**top, "services": {"web": {**web, **service}, "db": db}}
    assert_config_or_located_problems(yaml.safe_dump(document), as_root)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="services:web -[]{}&*!<>|'\"#%@,?\n\t\x01\\0123.", max_size=60))
def test_any_text(text: str) -> None:
    """Even text that is barely YAML gives located problems, never a traceback."""
    assert_config_or_located_problems(text)
