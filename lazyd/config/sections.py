"""The walkers of the config's sections: the top level, each service, and what spans them.

One function per section, in the order of the file's nesting; each reads the
scalar keys of its table in `lazyd.config.keys` (`Reader.values`) and then the
structured ones and the checks across keys.  Sockets are `lazyd.config.sockets`'.
Everything asked of the machine goes through the `Host` passed down.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shlex
from collections.abc import Collection, Mapping, Sequence

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lazyd.config import datapath as datapath_mod
from lazyd.config.containers import read_container
from lazyd.config.convert import choice, parse_duration, string
from lazyd.config.datapath import Datapath
from lazyd.config.host import Host
from lazyd.config.keys import _SERVICE_KEYS, _TOP_KEYS, scalars
from lazyd.config.model import DEFAULT_USER, Config, Mode, ServiceConfig
from lazyd.config.reader import Entry, Reader, join
from lazyd.config.sockets import Claimed, read_sockets
from lazyd.core.policy import Ready, ReadyKind
from lazyd.net.addresses import Address, Kind

_Requires = dict[str, tuple[Node, dict[str, Node]]]  # service -> (its list, name -> item)

_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SET_BY_LAZYD = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
_SERVICE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServiceConfig)}
# Beside idle_timeout, which has its own explanation.
_PROXY_ONLY = tuple(name for name, key in _SERVICE_KEYS.items() if key.proxy_only)
_AS_ROOT = (
    "lazyd runs as root, so this service must name a user (write 'user: root' to run it as root)"
)
_IDLE_IN_PASS_MODE = (
    "idle_timeout needs mode: proxy (in pass mode lazyd cannot see traffic; the service exits "
    "by itself when idle and lazyd holds its sockets again)"
)


def read_config(r: Reader, root: Node, host: Host) -> Config | None:
    """The whole config from its root node; None (with the problems recorded) if it has any."""
    keys = r.mapping(root, "", _TOP_KEYS, what="a mapping with a services: key")
    if keys is None:
        return None
    args = r.values(keys, "", scalars(_TOP_KEYS, host))
    # The daemon's own sockets must not collide with a service's either.
    claimed: Claimed = [(args["metrics"], "metrics")] if "metrics" in args else []
    if "control" in args:
        claimed.append((Address(Kind.UNIX, path=args["control"]), "control"))
        if problem := host.socket_directory_problem(args["control"]):
            r.problem(keys["control"].value, "control", problem)
    if "services" not in keys:
        r.problem(root, "", "missing required key 'services'")
        return None
    node = keys["services"].value
    entries = r.mapping(node, "services", what="a mapping of service names to services")
    if entries is None:
        return None
    if not entries:
        r.problem(node, "services", "no services: define at least one")
    services: dict[str, ServiceConfig] = {}
    requires: _Requires = {}
    for name, entry in entries.items():
        if not _SERVICE_NAME.fullmatch(name):
            r.problem(entry.key, "services", f"bad service name {name!r}: use letters, digits, "
                      "'-', '_' and '.', starting with a letter or digit")
        if service := _service(r, name, entry, host, claimed, requires):
            services[name] = service
    if host.as_root and not args.get("allow_shared_user", False):
        _check_shared_user(r, host, args.get("user"), entries, services)
    _check_requires(r, entries.keys(), requires)
    return Config(path=r.filename, services=services, **args)


def _service(
    r: Reader, name: str, entry: Entry, host: Host, claimed: Claimed, requires: _Requires
) -> ServiceConfig | None:
    path = join("services", name)
    keys = r.mapping(entry.value, path, _SERVICE_KEYS)
    if keys is None:
        return None
    for key in ("sockets",) if "container" in keys else ("command", "sockets"):
        if key not in keys:
            r.problem(entry.key, path, f"missing required key {key!r}")
    args = r.values(keys, path, scalars(_SERVICE_KEYS, host))
    # With an unreadable mode, `mode` is None and the checks that depend on it stay quiet.
    mode = None if "mode" in keys else _SERVICE_DEFAULTS["mode"]
    mode = args.get("mode", mode)
    if "container" in keys:
        # A container is reached through lazyd's proxy only: proxy is its default.
        if "mode" not in keys:
            mode = args["mode"] = Mode.PROXY
        args.update(read_container(r, keys, path, mode))
    if mode is Mode.PASS and "idle_timeout" in keys:
        r.problem(keys["idle_timeout"].value, join(path, "idle_timeout"), _IDLE_IN_PASS_MODE)
    for key in _PROXY_ONLY:
        if mode is Mode.PASS and key in keys:
            r.problem(keys[key].value, join(path, key), f"{key} only applies to mode: proxy")
    if host.as_root and "user" not in keys and "container" not in keys:
        r.problem(entry.key, path, _AS_ROOT)
    if "user" in args and "group" not in keys:
        # A gid without a name (None): the group stays unset and the launcher uses the gid.
        if (group := host.primary_group(args["user"])) is not None:
            args["group"] = group
    if "ready" in keys:
        args["ready"] = _ready(r, keys["ready"].value, join(path, "ready"), mode,
                               "container" in keys)
    elif mode is Mode.PROXY:
        args["ready"] = Ready(ReadyKind.CONNECT)
    if "environment" in keys:
        args["environment"] = _environment(r, keys["environment"].value, path)
    if "requires" in keys:
        args["requires"] = _requires(r, name, keys["requires"].value, path, requires)
    command = sockets = None
    if "command" in keys:
        # The PATH the service is started with: its environment's, else lazyd's own.
        search = (args.get("environment") or {}).get("PATH")
        search = os.environ.get("PATH", os.defpath) if search is None else search
        command = _command(r, keys["command"].value, join(path, "command"), search,
                           args.get("workdir"), host)
    if "sockets" in keys:
        sockets = read_sockets(r, keys["sockets"].value, join(path, "sockets"), mode, claimed,
                               host)
    if "container" in keys:
        command = ()
    if command is None or sockets is None or None in args.values():
        return None  # its problems are recorded
    service = ServiceConfig(name=name, command=command, sockets=sockets, **args)
    if service.datapath is Datapath.KERNEL and (found := datapath_mod.obstacles(service)):
        # What the kernel path cannot honour (lazyd.config.datapath); `auto` falls back.
        for reason in found:
            r.problem(keys["datapath"].value, join(path, "datapath"),
                      f"the kernel data path cannot be used: {reason}; use datapath: auto or "
                      "userspace")
        return None
    return service


def _ready(
    r: Reader, node: Node, path: str, mode: Mode | None, container: bool = False
) -> Ready | None:
    if isinstance(node, MappingNode):
        keys = r.mapping(node, path, ("delay",))
        if keys is None:
            return None
        if "delay" not in keys:
            r.problem(node, path, "missing required key 'delay'")
            return None
        delay = r.convert(keys["delay"].value, join(path, "delay"), parse_duration, "a duration")
        return None if delay is None else Ready(ReadyKind.DELAY, delay)
    kinds = choice(ReadyKind, "started", "notify", "connect", "health")
    kind = r.convert(node, path, kinds, "started, notify, connect, health or {delay: DURATION}")
    if kind is ReadyKind.HEALTH and not container:
        r.problem(node, path, "ready: health only applies to a container (its own healthcheck)")
        return None
    if kind is ReadyKind.CONNECT and mode is Mode.PASS:
        r.problem(node, path, "ready: connect only applies to mode: proxy")
        return None
    return None if kind is None else Ready(kind)


def _environment(r: Reader, node: Node, service: str) -> dict[str, str] | None:
    path = join(service, "environment")
    entries = r.mapping(node, path, what="a mapping of variable names to values")
    if entries is None:
        return None
    environment: dict[str, str] = {}
    for name, entry in entries.items():
        if not _ENV_NAME.fullmatch(name):
            r.problem(entry.key, path, f"bad variable name {name!r}: use letters, digits and "
                      "'_', not starting with a digit")
        elif name in _SET_BY_LAZYD:
            r.problem(entry.key, path, f"{name} is set by lazyd itself; remove it")
        if (value := r.text(entry.value, join(path, name), "a string or number")) is not None:
            environment[name] = value
    return environment if len(environment) == len(entries) else None


def _requires(r: Reader, name: str, node: Node, service: str, all_: _Requires) -> tuple[str, ...]:
    path = join(service, "requires")
    names: dict[str, Node] = {}
    for item in r.items(node, path, "a list of service names") or ():
        dep = r.convert(item, path, string, "a service name")
        if dep in names:
            r.problem(item, path, f"{dep!r} is listed twice")
        elif dep is not None:
            names[dep] = item
    all_[name] = (node, names)
    return tuple(names)


def _command(
    r: Reader, node: Node, path: str, search: str, workdir: str | None, host: Host
) -> tuple[str, ...] | None:
    if isinstance(node, SequenceNode):
        items = r.items(node, path, "a list of strings") or []
        words = [word for item in items if (word := r.text(item, path, "a string")) is not None]
        if len(words) < len(items):
            return None
    elif (line := r.text(node, path, "a list of strings or a command line")) is None:
        return None
    else:
        try:
            words = shlex.split(line)
        except ValueError as exc:  # an unclosed quote
            r.problem(node, path, f"cannot split the command line: {exc}")
            return None
    if problem := host.program_problem(words, search, workdir):
        r.problem(node, path, problem)
        return None
    return tuple(words)


def _check_shared_user(
    r: Reader, host: Host, top_user: str | None, entries: Mapping[str, Entry],
    services: Mapping[str, ServiceConfig],
) -> None:
    """No service may run as the user the daemon drops to, unless allow_shared_user says so.

    A process of the daemon's own uid can signal it, lower its limits with
    prlimit(2) and pass the control socket's peer check. A daemon with a uid
    of its own (no user:, no lazyd account) shares it with no service.
    """
    name = top_user if top_user is not None else DEFAULT_USER
    uid = host.uid(name)
    if uid is None:
        return  # no such account: the daemon runs as a uid of its own
    if uid == 0:
        return  # user: root: the daemon keeps root, and said so
    which = "the top-level user:" if top_user is not None else (
        f"the {DEFAULT_USER} account, which it becomes when the config names no user:")
    for service in services.values():
        if service.user is None or host.uid(service.user) != uid:
            continue
        entry = entries[service.name]
        node = next((value for key, value in entry.value.value
                     if isinstance(key, ScalarNode) and key.value == "user"), entry.key)
        r.problem(node, join(join("services", service.name), "user"),
                  f"{service.user} is the user lazyd itself runs as ({which}); a service "
                  "running as it could signal lazyd, lower its limits and use its control "
                  "socket: give the service an account of its own, or write "
                  "allow_shared_user: true at the top level to accept that")


def _check_requires(r: Reader, names: Collection[str], requires: _Requires) -> None:
    graph: dict[str, list[str]] = {}
    for name, (_, deps) in requires.items():
        path = join(join("services", name), "requires")
        graph[name] = []
        for dep, node in deps.items():
            if dep == name:
                r.problem(node, path, "a service cannot require itself")
            elif dep not in names:
                close = difflib.get_close_matches(dep, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                r.problem(node, path, f"unknown service {dep!r}{hint}")
            else:
                graph[name].append(dep)
    for cycle in _cycles(graph):
        path = join(join("services", cycle[0]), "requires")
        r.problem(requires[cycle[0]][0], path, "dependency cycle: " + " -> ".join(cycle))


def _cycles(graph: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Each cycle a depth-first walk meets, as [a, b, ..., a]; iterative, so no depth limit."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    for root in graph:
        stack, pending = [root], [iter(graph[root])]
        while stack:
            dep = next(pending[-1], None)
            if dep is None:
                done.add(stack.pop())
                pending.pop()
            elif dep in stack:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in done:
                stack.append(dep)
                pending.append(iter(graph.get(dep, ())))
    return cycles
