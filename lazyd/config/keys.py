"""The keys of each section of the config, with what reads each one.

One table per section (top level, service, socket), in the order README lists
the keys.  A key whose value is one scalar says here everything about it: its
converter (pure, `lazyd.config.convert`), what the message says was expected,
the check against the machine that follows (a `Host` method), and whether it
applies only to mode: proxy.  Reading it needs nothing more: the section
walker reads every such key from the table.  A structured key (a list or a
mapping: command, sockets, ready, ...) has `convert=None` and its own walker
in `lazyd.config.sections` (or `lazyd.config.sockets`).

The default of every key is its dataclass field's default in
`lazyd.config.model`, and nowhere else; a key is a field of the same name
(tests check that the tables and the fields agree).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lazyd.config import convert as c
from lazyd.config.datapath import Datapath
from lazyd.config.host import Host, Machine
from lazyd.config.model import Activate, Mode

Converter = Callable[[object], Any]


@dataclass(frozen=True)
class Key:
    """How one key is read."""

    convert: Converter | None = None  # None: a structured value, read by its own walker
    what: str = ""  # what the message says was expected ("a duration")
    on_host: Callable[[Host, Any], Any] | None = None  # then checked against the machine
    proxy_only: bool = False  # a problem in mode: pass


def _user(host: Host, name: str) -> str:
    return host.user(name)


def _group(host: Host, name: str) -> str:
    return host.group(name)


def _workdir(host: Host, path: str) -> str:
    return host.workdir(path)


_USER = Key(c.string, "a user name", _user)
_GROUP = Key(c.string, "a group name", _group)
_DURATION = Key(c.positive_duration, "a duration")
_WHOLE = Key(c.whole, "a whole number")
_FLAG = Key(c.flag, "true or false")
_STRUCTURED = Key()

_TOP_KEYS: Mapping[str, Key] = {
    "control": Key(c.control, "unix:/PATH"),
    "metrics": Key(c.metrics, "a TCP address"),
    "user": _USER,
    "allow_shared_user": _FLAG,
    "services": _STRUCTURED,
}
_SERVICE_KEYS: Mapping[str, Key] = {
    "command": _STRUCTURED,
    "mode": Key(c.choice(Mode), "pass or proxy"),
    "user": _USER,
    "group": _GROUP,
    "sockets": _STRUCTURED,
    "ready": _STRUCTURED,
    "environment": _STRUCTURED,
    "workdir": Key(c.string, "a directory", _workdir),
    "start_timeout": _DURATION,
    "stop_signal": Key(c.parse_signal, "a signal"),
    "stop_timeout": _DURATION,
    "restart": Key(c.restart, "no, on-failure or always"),
    "start_limit": _WHOLE,
    "start_limit_interval": Key(c.parse_duration, "a duration"),
    "requires": _STRUCTURED,
    "activate": Key(c.choice(Activate), "lazy or eager"),
    "queue_limit": _WHOLE,
    "datagram_queue_limit": _WHOLE,
    # proxy_only, with its own explanation (sections._IDLE_IN_PASS_MODE).
    "idle_timeout": _DURATION,
    "max_connections": Key(c.whole, "a whole number", proxy_only=True),
    "flow_timeout": Key(c.positive_duration, "a duration", proxy_only=True),
    "max_connections_per_source": Key(c.whole, "a whole number", proxy_only=True),
    "connection_idle_timeout": Key(c.positive_duration, "a duration", proxy_only=True),
    "datapath": Key(c.choice(Datapath), "userspace, kernel or auto", proxy_only=True),
    # A container instead of a command (lazyd.config.containers).
    "container": _STRUCTURED,
    "engine": _STRUCTURED,
    "engine_tls": _STRUCTURED,
}
# listen and mode are read by the socket walker (the short form, a mode's text
# as written); allow and deny apply only to mode: proxy too, with their own message.
_SOCKET_KEYS: Mapping[str, Key] = {
    "listen": _STRUCTURED,
    "upstream": Key(c.address, "an address", proxy_only=True),
    "backlog": _WHOLE,
    "reuse_port": _FLAG,
    "mode": _STRUCTURED,
    "owner": _USER,
    "group": _GROUP,
    "proxy_protocol": Key(c.one_of("v1", "v2"), "v1 or v2", proxy_only=True),
    "allow": _STRUCTURED,
    "deny": _STRUCTURED,
}


def scalars(table: Mapping[str, Key], host: Host) -> dict[str, tuple[Converter, str]]:
    """Each key of `table` whose value is one scalar: its converter followed by its check
    on `host`, and what it expects."""
    return {name: (_on(key.convert, key.on_host, host), key.what)
            for name, key in table.items() if key.convert is not None}


def _on(convert: Converter, check: Callable[[Host, Any], Any] | None, host: Host) -> Converter:
    if check is None:
        return convert
    return lambda value: check(host, convert(value))


# As this machine reads them (what the fuzz tests feed any value).
_TOP_VALUES = scalars(_TOP_KEYS, Machine.current())
_SERVICE_VALUES = scalars(_SERVICE_KEYS, Machine.current())
_SOCKET_VALUES = scalars(_SOCKET_KEYS, Machine.current())
