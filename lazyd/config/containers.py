"""The keys of a service that is a container: ``container`` (instead of
``command``), ``engine`` and ``engine_tls``, and what they rule out.

A container is reached through lazyd's proxy only (the engine's API cannot
hand it lazyd's listening sockets), so its mode is proxy, and a process's
keys (command, user, group, workdir, environment, stop_signal) mean nothing
for it: each is refused, saying why.  Whether the container exists on its
engine is asked of the engine by `lazyd check`, at start-up and on a reload
(`lazyd.backends.container.checks`), not here: reading a config asks no
engine anything.
"""

from __future__ import annotations

import re
from typing import Any

from yaml.nodes import ScalarNode

from lazyd.config.convert import string
from lazyd.config.model import Mode
from lazyd.config.reader import Entry, Reader, join

# Keys of a process that mean nothing for a container, and why.
_NOT_FOR_CONTAINERS = {
    "command": "command and container are exclusive: a service is one or the other",
    "user": "the container runs as its image and the engine say",
    "group": "the container runs as its image and the engine say",
    "workdir": "the container's working directory is its own",
    "environment": "a container's environment is set when it is created",
    "stop_signal": "the engine stops a container with its own stop signal (podman/docker create "
                   "--stop-signal)",
}
# Docker's own rule for container names (lazyd.backends.container.engine checks it too).
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")


def read_container(r: Reader, keys: dict[str, Entry], path: str, mode: Mode | None
                   ) -> dict[str, Any]:
    """The container keys of a service that has `container:` (each problem recorded;
    a value with one is None): container, engine, engine_tls."""
    args: dict[str, Any] = {}
    args["container"] = r.convert(keys["container"].value, join(path, "container"),
                                  _container_name, "a container name")
    for key, why in _NOT_FOR_CONTAINERS.items():
        if key in keys:
            r.problem(keys[key].value, join(path, key), f"{key} does not apply to a container: "
                      f"{why}")
    if mode is Mode.PASS:
        r.problem(keys["mode"].value, join(path, "mode"), "a container service is mode: proxy: "
                  "the engine's API cannot hand a container lazyd's listening sockets")
    ready = keys["ready"].value if "ready" in keys else None
    if isinstance(ready, ScalarNode) and ready.value == "notify":
        r.problem(ready, join(path, "ready"), "ready: notify does not apply to a container "
                  "(use connect, health, started or {delay: DURATION})")
    if "engine" in keys:
        args["engine"] = r.convert(keys["engine"].value, join(path, "engine"), _engine,
                                   "unix:/PATH or tcp://HOST:PORT")
    if "engine_tls" in keys:
        node = keys["engine_tls"].value
        tls_path = join(path, "engine_tls")
        tls = r.mapping(node, tls_path, ("ca", "cert", "key"))
        files = {}
        for key in ("ca", "cert", "key"):
            if tls is not None and key not in tls:
                r.problem(node, tls_path, f"missing required key {key!r}")
            elif tls is not None:
                files[key] = r.convert(tls[key].value, join(tls_path, key), _tls_file,
                                       "an absolute path to a PEM file")
        complete = len(files) == 3 and None not in files.values()
        args["engine_tls"] = (files["ca"], files["cert"], files["key"]) if complete else None
        engine = args.get("engine")
        if engine is not None and not engine.startswith("tcp://"):
            r.problem(node, tls_path, "engine_tls applies to a tcp:// engine")
    return args


def _container_name(value: object) -> str:
    name = string(value)
    if not _CONTAINER_NAME.fullmatch(name):
        raise ValueError(f"bad container name {name!r}: letters, digits, '_', '.' and '-', "
                         "starting with a letter or digit")
    return name


def _engine(value: object) -> str:
    # A host name is fine (TLS checks the engine's certificate against it), so
    # not an Address, which lazyd binds and which takes IP addresses only.
    text = string(value)
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    tcp = text.startswith("tcp://") and host and port.isdigit() and 0 < int(port) < 65536
    if not tcp and not (text.startswith("unix:/") and "\0" not in text):
        raise ValueError(f"bad engine {text!r}: expected unix:/PATH or tcp://HOST:PORT")
    return text


def _tls_file(value: object) -> str:
    path = string(value)
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return path
