"""The privileged helper's protocol: what each side builds, the other reads back,
and anything else is refused with an error naming the field."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lazyd
from lazyd.privileged import boot, entries, protocol
from lazyd.privileged.entries import BrokenEntry, ProcessEntry
from lazyd.privileged.fields import ProtocolError
from lazyd.privileged.handoff import identity, socket_identity

# The directory holding the lazyd package in use (the source tree, or site-packages).
INSTALLED_AT = Path(lazyd.__file__).resolve().parent.parent

# -- strategies -----------------------------------------------------------------------

_texts = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                 min_size=1, max_size=12)
_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
_ids = st.integers(0, entries.ID_BITS)
_sockets = st.builds(
    lambda name, family, kind, address, listening: entries.socket_entry(
        name, identity(family, kind, address, listening=listening, connected=False)
    ),
    _names,
    st.sampled_from([int(socket.AF_INET), int(socket.AF_INET6), int(socket.AF_UNIX)]),
    st.sampled_from([int(socket.SOCK_STREAM), int(socket.SOCK_DGRAM)]),
    st.one_of(st.tuples(_texts, st.integers(0, 65535)).map(list), _texts),
    st.booleans(),
)


@st.composite
def _process_entries(draw: st.DrawFn) -> dict[str, Any]:
    creds = draw(st.one_of(st.none(), st.tuples(_ids, _ids, st.lists(_ids, max_size=4))))
    uid, gid, groups = creds if creds is not None else (None, None, None)
    env_keys = _names.filter(lambda k: k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
                                                 "NOTIFY_SOCKET"))
    return entries.process_entry(
        executable="/" + draw(_names),
        argv=draw(st.lists(st.text(st.characters(blacklist_characters="\0",
                                                 blacklist_categories=("Cs",))),
                           min_size=1, max_size=4)),
        env=draw(st.dictionaries(env_keys, st.text(st.characters(
            blacklist_characters="\0", blacklist_categories=("Cs",))), max_size=4)),
        uid=uid, gid=gid, groups=groups,
        workdir=draw(st.one_of(st.none(), _texts)),
        nofile_soft=draw(st.one_of(st.none(), st.integers(0, entries.MAX_NOFILE))),
        sockets=draw(st.lists(_sockets, max_size=3)),
        notify=draw(st.booleans()),
        steer=draw(st.dictionaries(_names, st.tuples(
            st.sampled_from(["127.0.0.1", "::1", "10.1.2.3"]), st.integers(1, 65535)),
            max_size=2)),
    )


_entries = st.one_of(_process_entries(), _texts.map(entries.broken_entry))
_tables = st.dictionaries(_names, _entries, max_size=4)


def _wire(message: dict[str, Any]) -> bytes:
    """As it goes through the socket: encoded, and no larger than a message may be."""
    data = protocol.encode(message)
    assert len(data) <= protocol.MAX_MESSAGE
    return data


def _same_entry(parsed: ProcessEntry | BrokenEntry, built: dict[str, Any]) -> None:
    if isinstance(parsed, BrokenEntry):
        assert built == {"error": parsed.error}
        return
    assert built["kind"] == parsed.kind == entries.PROCESS
    for field in entries.PROCESS_FIELDS[1:]:
        assert getattr(parsed, field) == built[field], field


# -- round trips ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(table=_tables, request_id=st.integers(0, protocol.MAX_ID), seal=st.booleans(),
       config=st.one_of(st.none(), _texts), nofile=st.one_of(st.none(), st.integers(0, 2**40)))
def test_a_define_reads_back_as_built(
    table: dict[str, Any], request_id: int, seal: bool, config: str | None, nofile: int | None
) -> None:
    """Every define the daemon can build is read by the helper as it was built."""
    built = protocol.define_request(request_id, table, config=config, path="/usr/bin",
                                    nofile_soft=nofile, seal=seal)
    parsed = protocol.parse_request(_wire(built))
    assert isinstance(parsed, protocol.Define)
    assert (parsed.id, parsed.seal, parsed.config, parsed.path, parsed.nofile_soft) == (
        request_id, seal, config, "/usr/bin", nofile)
    assert list(parsed.services) == list(table)
    for name, entry in parsed.services.items():
        _same_entry(entry, table[name])


def test_the_other_requests_read_back_as_built() -> None:
    """Reload, commit, spawn and signal requests are read back field for field."""
    reload = protocol.parse_request(_wire(protocol.reload_request(1)))
    assert isinstance(reload, protocol.Reload) and reload.id == 1
    commit = protocol.parse_request(_wire(protocol.commit_request(2)))
    assert isinstance(commit, protocol.Commit) and commit.id == 2
    env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "NOTIFY_SOCKET": "@lazyd/1/web/00"}
    spawn = protocol.parse_request(_wire(protocol.spawn_request(3, "web", env)), fds=2)
    assert isinstance(spawn, protocol.Spawn)
    assert (spawn.id, spawn.service, spawn.env) == (3, "web", env)
    sig = protocol.parse_request(_wire(protocol.signal_request(4, 1234, 15, group=True)))
    assert isinstance(sig, protocol.Signal)
    assert (sig.id, sig.pid, sig.signal, sig.group) == (4, 1234, 15, True)
    listener = protocol.parse_request(_wire(protocol.listener_request(5, 1234, "http")))
    assert isinstance(listener, protocol.Listener)
    assert (listener.id, listener.pid, listener.socket) == (5, 1234, "http")


@given(request_id=st.one_of(st.none(), st.integers(0, protocol.MAX_ID)),
       stage=_names, errno=st.integers(0, 200), reason=_texts,
       problems=st.one_of(st.none(), st.lists(_texts, max_size=3)))
def test_an_error_reply_reads_back_as_built(
    request_id: int | None, stage: str, errno: int, reason: str, problems: list[str] | None
) -> None:
    """An error reply gives the daemon the reason alone, its stage, errno and problems."""
    reply = protocol.parse_reply(
        _wire(protocol.error_reply(request_id, stage, errno, reason, problems))
    )
    assert isinstance(reply, protocol.Failed)
    assert (reply.id, reply.reason, reply.stage, reply.errno, reply.problems) == (
        request_id, reason, stage, errno, problems or [])


def test_the_other_replies_read_back_as_built() -> None:
    """ok, reloaded, spawned and the exit notice are read back field for field."""
    done = protocol.parse_reply(_wire(protocol.ok_reply(5)))
    assert isinstance(done, protocol.Done) and (done.id, done.services) == (5, None)
    reloaded = protocol.parse_reply(_wire(protocol.reloaded_reply(6, ["b", "a"])))
    assert isinstance(reloaded, protocol.Done) and reloaded.services == ["a", "b"]
    spawned = protocol.parse_reply(_wire(protocol.spawned_reply(7, 4321)))
    assert isinstance(spawned, protocol.Spawned) and (spawned.id, spawned.pid) == (7, 4321)
    exited = protocol.parse_reply(_wire(protocol.exited_notice(4321, -9)))
    assert isinstance(exited, protocol.Exited) and (exited.pid, exited.returncode) == (4321, -9)
    taken = protocol.parse_reply(_wire(protocol.listener_reply(8, "http")))
    assert isinstance(taken, protocol.Taken) and (taken.id, taken.socket) == (8, "http")


def test_the_table_readers_answer_reads_back() -> None:
    """The reader's table is checked like a define; its problems come back as printed."""
    table = {"web": entries.process_entry(
        executable="/bin/true", argv=["true"], env={"PATH": "/bin"}, uid=None, gid=None,
        groups=None, workdir=None, nofile_soft=None, sockets=[], notify=False)}
    read, problems = protocol.parse_table_answer(protocol.encode(protocol.table_answer(table)))
    assert problems is None and list(read) == ["web"]
    _same_entry(read["web"], table["web"])
    answer = protocol.encode(protocol.problems_answer(["a.yaml:1:1: bad"]))
    assert protocol.parse_table_answer(answer) == ({}, ["a.yaml:1:1: bad"])


def test_a_sockets_identity_is_what_the_table_describes() -> None:
    """A bound socket's identity plus its name has exactly the fields an entry's socket must."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        described = entries.socket_entry("http", socket_identity(sock.fileno()))
        port = sock.getsockname()[1]
    assert set(described) == set(entries.SOCKET_FIELDS)
    assert entries.describe_socket(described) == f"AF_INET/SOCK_STREAM 127.0.0.1:{port} listening"


# -- what is refused --------------------------------------------------------------------

_ENTRY = {"executable": "/bin/true", "argv": ["true"], "env": {}}


def _define(**entry: Any) -> bytes:
    return json.dumps({"id": 1, "op": "define", "services": {"s": {**_ENTRY, **entry}}}).encode()


def _msg(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


REFUSED_REQUESTS: list[tuple[bytes, int, str]] = [
    (b"not json", 0, "not a JSON message"),
    (b"[1, 2]", 0, "not a JSON object"),
    (b"[" * 50000 + b"]" * 50000, 0, "not a JSON message"),
    (_msg(op="spawn"), 0, "id must be an integer in 0..9007199254740992"),
    (_msg(id=True, op="commit"), 0, "id must be an integer"),
    (_msg(id=-1, op="commit"), 0, "id must be an integer"),
    (_msg(id=1, op="exec"), 0, "unknown op 'exec'"),
    (_msg(id=1, op=None), 0, "unknown op None"),
    (_msg(id=1, op="signal", pid=1, signal=9, group=False), 1, "signal takes no fds"),
    (_msg(id=1, op="define", services={}), 2, "define takes no fds"),
    (_msg(id=1, op="reload", config="/x"), 0, "reload takes no fields"),
    (_msg(id=1, op="commit", x=1), 0, "commit takes no fields"),
    (_msg(id=1, op="spawn", service="s", env={}, executable="/bin/sh"), 0,
     "unknown field 'executable'"),
    (_msg(id=1, op="spawn", service=1, env={}), 0, "service must be a non-empty string"),
    (_msg(id=1, op="spawn", service="s", env=[]), 0, "env must be an object"),
    (_msg(id=1, op="spawn", service="s", env={"LD_PRELOAD": "/x.so"}), 0,
     "environment variable 'LD_PRELOAD' cannot be set"),
    (_msg(id=1, op="spawn", service="s", env={"LISTEN_FDS": ""}), 0,
     "LISTEN_FDS must be a non-empty string"),
    (_msg(id=1, op="signal", pid=0, signal=9, group=False), 0, "pid must be an integer"),
    (_msg(id=1, op="signal", pid=1, signal=0, group=False), 0, "signal must be an integer"),
    (_msg(id=1, op="signal", pid=1, signal=9, group="yes"), 0, "group must be true or false"),
    (_msg(id=1, op="signal", pid=1, signal=9, group=False, x=1), 0, "unknown field 'x'"),
    (_msg(id=1, op="define", services={}, seal="yes"), 0, "seal must be true or false"),
    (_msg(id=1, op="define", services={}, config=""), 0, "config must be a non-empty string"),
    (_msg(id=1, op="define", services={}, nofile_soft=-1), 0, "nofile_soft must be an integer"),
    (_msg(id=1, op="define", services=[]), 0, "services must be an object of at most 65536"),
    (_msg(id=1, op="define", services={"s": 1}), 0, "service 's': each service must be an object"),
    (_msg(id=1, op="define", services={"s": {"error": "x", "argv": []}}), 0,
     "service 's': an entry with an error has nothing else"),
    (_define(kind="cluster"), 0, "kind must be one of ['process', 'container'], not 'cluster'"),
    (_msg(id=1, op="define", services={"s": {"kind": "container", "container": "../x",
                                             "engine": "unix:/e", "tls": None}}), 0,
     "container '../x' is not a container name"),
    (_msg(id=1, op="define", services={"s": {"kind": "container", "container": "x",
                                             "engine": "http://e", "tls": None}}), 0,
     "engine must be unix:/PATH or tcp://HOST:PORT"),
    (_msg(id=1, op="define", services={"s": {"kind": "container", "container": "x",
                                             "engine": "unix:/e", "tls": {"ca": "/a"}}}), 0,
     "tls must be null or an object of ['ca', 'cert', 'key']"),
    (_msg(id=1, op="container", service="s", action="exec", timeout=None, signal=None), 0,
     "action must be one of ['start', 'stop', 'kill', 'inspect', 'health']"),
    (_msg(id=1, op="container", service="s", action="stop", timeout=None, signal=None), 0,
     "a stop takes a timeout, nothing else does"),
    (_msg(id=1, op="container", service="s", action="start", timeout=None, signal=9), 0,
     "a kill takes a signal, nothing else does"),
    (_msg(id=1, op="container", service="s", action="start", timeout=None, signal=None,
          container="other"), 0, "unknown field 'container'"),
    (_msg(id=1, op="container", service="s", action="start", timeout=None, signal=None), 1,
     "container takes no fds"),
    (_define(executable="true"), 0, "executable must be an absolute path"),
    (_define(argv=[]), 0, "argv must be a non-empty list"),
    (_define(argv=["a\0b"]), 0, "each argument must be a string without NUL"),
    (_define(env={"A=B": "x"}), 0, "environment variable 'A=B' cannot be set"),
    (_define(env={"LISTEN_PID": "1"}), 0, "environment variable 'LISTEN_PID' cannot be set"),
    (_define(env={"NOTIFY_SOCKET": "@x"}), 0, "environment variable 'NOTIFY_SOCKET' cannot"),
    (_define(uid=True, gid=0, groups=[]), 0, "uid must be an integer in 0..4294967294"),
    (_define(uid=-1, gid=0, groups=[]), 0, "uid must be an integer"),
    (_define(uid=2**32 - 1, gid=0, groups=[]), 0, "uid must be an integer"),
    (_define(uid=0), 0, "uid, gid and groups are given together or not at all"),
    (_define(groups=0), 0, "groups must be a list of at most 65536 group ids"),
    (_define(uid=0, gid=0, groups=[True]), 0, "groups must be integers"),
    (_define(shell=1), 0, "service 's': unknown field 'shell'"),
    (_define(notify=1), 0, "notify must be true or false"),
    (_define(workdir=""), 0, "workdir must be a non-empty string"),
    (_define(sockets={}), 0, "sockets must be a list of at most 253"),
    (_define(sockets=[{"name": "a"}]), 0, "each socket must have exactly"),
    (_define(sockets=[{"name": "a:b", "family": 2, "type": 1, "address": "/x",
                       "listening": True, "connected": False}]), 0,
     "socket name 'a:b' cannot be passed in LISTEN_FDNAMES"),
    (_define(sockets=[{"name": "a", "family": "2", "type": 1, "address": "/x",
                       "listening": True, "connected": False}]), 0,
     "socket family must be an integer"),
    (_define(sockets=[{"name": "a", "family": 2, "type": 1, "address": "/x",
                       "listening": 1, "connected": False}]), 0,
     "socket listening must be true or false"),
    (_define(sockets=[{"name": "a", "family": 2, "type": 1, "address": ["h"],
                       "listening": True, "connected": False}]), 0,
     "socket address must be [host, port] or a path"),
    (_define(steer=[]), 0, "steer must be an object of at most 253 sockets"),
    (_define(steer={"http": ["127.0.0.1"]}), 0, "each steer address must be [host, port]"),
    (_define(steer={"http": ["127.0.0.1", 0]}), 0, "each steer address must be [host, port]"),
    (_define(steer={"http": ["localhost", 80]}), 0, "steer host 'localhost' is not an IP"),
    (_msg(id=1, op="listener", pid=0, socket="http"), 0, "pid must be an integer"),
    (_msg(id=1, op="listener", pid=5, socket=""), 0, "socket must be a non-empty string"),
    (_msg(id=1, op="listener", pid=5, socket="a", signal=9), 0, "unknown field 'signal'"),
    (_msg(id=1, op="listener", pid=5, socket="a"), 1, "listener takes no fds"),
]


@pytest.mark.parametrize(("data", "fds", "error"), REFUSED_REQUESTS)
def test_malformed_requests_are_refused_saying_what_is_wrong(
    data: bytes, fds: int, error: str
) -> None:
    """Each malformed request raises ProtocolError whose text names the field and the fault."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(data, fds)
    assert error in str(caught.value)


def test_a_refusal_carries_the_request_id_once_read() -> None:
    """The error reply can name the request: its id, once it was read, and None before."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(_msg(id=42, op="exec"))
    assert caught.value.request_id == 42
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(b"x" * 10, truncated=True)
    assert caught.value.request_id is None
    assert str(caught.value) == "message too long (limit 65536 bytes, 253 fds)"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)
_fields = st.sampled_from(["id", "op", "services", "config", "path", "nofile_soft", "seal",
                           "service", "env", "pid", "signal", "group", "exited", "returncode",
                           "ok", "error", "stage", "errno", "problems", "kind"])


@settings(max_examples=500, deadline=None)
@given(message=st.one_of(
    st.binary(max_size=64),
    _json.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(_fields, _json, max_size=6).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda op, d: json.dumps({"id": 1, "op": op, **d}).encode(),
              st.sampled_from(list(protocol.REQUEST_FIELDS)),
              st.dictionaries(_fields, _json, max_size=4)),
), fds=st.integers(0, 3))
def test_any_message_is_read_or_refused_with_a_protocol_error(message: bytes, fds: int) -> None:
    """Whatever arrives, each parser either returns a checked message or raises
    ProtocolError: no other exception, so no input crashes either side."""
    for parse in (lambda: protocol.parse_request(message, fds), lambda: protocol.parse_reply(
            message), lambda: protocol.parse_table_answer(message)):
        try:
            parse()
        except ProtocolError as exc:
            assert str(exc)


@settings(max_examples=200, deadline=None)
@given(entry=_process_entries(), field=st.sampled_from(entries.PROCESS_FIELDS[1:]),
       value=_json)
def test_a_process_entry_with_any_field_changed_is_checked_again(
    entry: dict[str, Any], field: str, value: object
) -> None:
    """Changing one field of a good entry to any JSON value gives a checked entry
    whose fields are what was sent, or a ProtocolError naming the service."""
    entry = {**entry, field: value}
    try:
        parsed = entries.parse_table({"s": entry})["s"]
    except ProtocolError as exc:
        assert str(exc).startswith("service 's': ")
    else:
        assert isinstance(parsed, ProcessEntry)
        assert getattr(parsed, field) == value


REFUSED_REPLIES = [
    (b"", "not a JSON message"),
    (_msg(exited=0, returncode=0), "exited must be an integer"),
    (_msg(exited=5, returncode=0, id=1), "unknown field 'id'"),
    (_msg(id=1, error="x", stage=1, errno=0), "error and stage must be strings"),
    (_msg(id=1, error="x", stage="s", errno=-1), "errno must be an integer"),
    (_msg(id=1, error="x", stage="s", errno=0, problems=[1]), "problems must be a list of str"),
    (_msg(id=1, pid=0), "pid must be an integer"),
    (_msg(id=1, pid=5, ok=True), "unknown field 'ok'"),
    (_msg(id=1), "a reply is ok, an error, or a spawned pid"),
    (_msg(id=1, ok=True, services="a"), "services must be a list of strings"),
    (_msg(ok=True), "id must be an integer"),
    (_msg(id=1, listener=""), "listener must be a non-empty string"),
    (_msg(id=1, listener="a", pid=5), "unknown field 'listener'"),
]


@pytest.mark.parametrize(("data", "error"), REFUSED_REPLIES)
def test_malformed_replies_are_refused_saying_what_is_wrong(data: bytes, error: str) -> None:
    """A reply the helper should never send is a ProtocolError for the daemon, naming the fault."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_reply(data)
    assert error in str(caught.value)


@pytest.mark.parametrize(("data", "error"), [
    (b"", "the table reader failed (see lazyd's log)"),
    (b"Traceback (most recent call last):", "the table reader failed"),
    (b"[]", "the table reader printed no object"),
    (b'{"problems": "x"}', "the table reader printed bad problems"),
    (b'{"services": {"s": {"error": ""}}}', "service 's': error must be a non-empty string"),
    (b" " * (protocol.MAX_TABLE + 1), f"the table exceeds {protocol.MAX_TABLE} bytes"),
])
def test_a_bad_table_answer_is_refused(data: bytes, error: str) -> None:
    """What a failed or misbehaving table reader prints is refused, saying why."""
    with pytest.raises(ProtocolError, match="^" + error.replace("(", r"\(").replace(")", r"\)")):
        protocol.parse_table_answer(data)


# -- what the helper imports ------------------------------------------------------------

HELPER_MODULES = {
    "lazyd", "lazyd.backends", "lazyd.backends.process", "lazyd.privileged.handoff",
    "lazyd.privileged", "lazyd.privileged.boot", "lazyd.privileged.checks",
    "lazyd.privileged.child", "lazyd.privileged.entries", "lazyd.privileged.fields",
    "lazyd.privileged.protocol", "lazyd.privileged.read_table", "lazyd.privileged.reloading",
    "lazyd.privileged.spawnerd", "lazyd.privileged.listeners",
    # The kernel's socket table, for the listener a kernel-path service binds.
    "lazyd.datapath", "lazyd.datapath.bpf", "lazyd.datapath.bpf.diag",
    "lazyd.datapath.bpf.syscall",
    "lazyd.privileged.containers", "lazyd.backends.container",
    "lazyd.backends.container.engine",
}


@pytest.mark.parametrize("module", sorted(HELPER_MODULES - {
    "lazyd", "lazyd.backends", "lazyd.backends.process", "lazyd.backends.container"}))
def test_the_helpers_modules_import_only_the_standard_library(module: str) -> None:
    """Under python -I -S, each module the helper loads imports nothing outside the
    standard library and lazyd's helper modules, and not typing."""
    check = (
        "import sys; sys.path.append(sys.argv[1]); import importlib; "
        "importlib.import_module(sys.argv[2]); "
        "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
        " - {'__main__'})); print('typing' in sys.modules); "
        "print(sorted(m for m in sys.modules if m.startswith('lazyd')))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", check, str(INSTALLED_AT), module],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["['lazyd']", "False"]
    assert set(json.loads(out[2].replace("'", '"'))) <= HELPER_MODULES


def test_the_helper_refuses_an_interpreter_with_site_or_environment() -> None:
    """Started without -I -S (site packages and the environment in reach), the
    helper exits at once, saying how it must run, before importing any of itself."""
    result = subprocess.run([sys.executable, boot.__file__, "100"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, env={**os.environ})
    assert result.returncode == 1
    assert result.stderr == "lazyd spawner: must run as python -I -S (see lazyd.privileged.boot)\n"
