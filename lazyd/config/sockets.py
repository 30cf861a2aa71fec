"""The walker of a service's `sockets:` section, and the addresses claimed so far.

Each socket is one entry, an address (the short form) or a mapping with
`listen:`; its scalar keys are read from `lazyd.config.keys`.  What a key
means depends on the service's mode and on the kind of address it listens
on, so the checks across keys live here.
"""

from __future__ import annotations

import functools
import re

from yaml.nodes import MappingNode, Node, ScalarNode

from lazyd.config import convert
from lazyd.config.host import Host
from lazyd.config.keys import _SOCKET_KEYS, scalars
from lazyd.config.model import Mode, SocketConfig
from lazyd.config.reader import NULL, Entry, Reader, join
from lazyd.net.addresses import Address, Network, overlaps, parse_network

Claimed = list[tuple[Address, str]]  # addresses bound so far, each with what binds it

_FD_NAME = re.compile(r"[!-9;-~]{1,255}")  # printable ASCII without ':' or space
_PROXY_ONLY = tuple(name for name, key in _SOCKET_KEYS.items() if key.proxy_only)


def read_sockets(
    r: Reader, node: Node, path: str, mode: Mode | None, claimed: Claimed,
    host: Host,
) -> tuple[SocketConfig, ...] | None:
    entries = r.mapping(node, path, what="a mapping of socket names to addresses")
    if not entries:
        if entries is not None:
            r.problem(node, path, "no sockets: a service needs at least one")
        return None
    sockets = []
    for name, entry in entries.items():
        if not _FD_NAME.fullmatch(name):
            r.problem(entry.key, path, f"bad socket name {name!r}: it becomes the fd name, so "
                      "1 to 255 printable ASCII characters without ':' or spaces")
        if socket := _socket(r, name, entry, join(path, name), mode, claimed, host):
            sockets.append(socket)
    return tuple(sockets) if len(sockets) == len(entries) else None


def _socket(
    r: Reader, name: str, entry: Entry, path: str, mode: Mode | None, claimed: Claimed,
    host: Host,
) -> SocketConfig | None:
    listen = None
    keys: dict[str, Entry] | None
    if not isinstance(entry.value, MappingNode):
        keys = {"listen": entry}  # the short form: just the address
        listen = r.convert(entry.value, path, convert.address,
                           "an address or a mapping with listen:")
    else:
        keys = r.mapping(entry.value, path, _SOCKET_KEYS)
        if keys is None:
            return None
        if "listen" not in keys:
            r.problem(entry.key, path, "missing required key 'listen'")
        else:
            listen = r.convert(keys["listen"].value, join(path, "listen"), convert.address,
                               "an address")
    args = r.values(keys, path, scalars(_SOCKET_KEYS, host))
    if "mode" in keys:
        written = str(keys["mode"].value.value)
        file_mode = functools.partial(convert.file_mode, written=written)
        args["mode"] = r.convert(keys["mode"].value, join(path, "mode"), file_mode, "a file mode")
    if listen is not None:
        claim(r, listen, keys["listen"].value, path, claimed)
        if listen.is_unix and not listen.is_abstract:
            assert listen.path is not None
            if problem := host.socket_directory_problem(listen.path):
                r.problem(keys["listen"].value, path, problem)
        for key in ("mode", "owner", "group"):
            if key in keys and not (listen.is_unix and not listen.is_abstract):
                r.problem(keys[key].value, join(path, key), f"{key} only applies to a Unix "
                          "socket with a path (unix:/PATH or unix-dgram:/PATH)")
    for key in _PROXY_ONLY:
        if key in keys and mode is Mode.PASS:
            r.problem(keys[key].value, join(path, key), f"{key} only applies to mode: proxy")
    if mode is Mode.PROXY and listen is not None:
        upstream = args.get("upstream")
        if "upstream" not in keys:
            r.problem(entry.key, path, "mode: proxy needs an upstream address for each socket")
        elif upstream is not None and upstream.is_stream != listen.is_stream:
            r.problem(keys["upstream"].value, join(path, "upstream"),
                      "upstream and listen must both be stream or both be datagram addresses")
        if "proxy_protocol" in keys and not listen.is_stream:
            r.problem(keys["proxy_protocol"].value, join(path, "proxy_protocol"),
                      "proxy_protocol only applies to stream sockets")
    for key in ("allow", "deny"):
        if key in keys:
            args[key] = _access_list(r, key, keys[key].value, join(path, key), mode, listen)
    if listen is None or None in args.values():
        return None
    return SocketConfig(name, listen, **args)


def _access_list(
    r: Reader, key: str, node: Node, path: str, mode: Mode | None, listen: Address | None
) -> tuple[Network, ...] | None:
    """A socket's `allow` or `deny`: a list of networks (or just one)."""
    if mode is Mode.PASS:
        r.problem(node, path, f"{key} only applies to mode: proxy (in pass mode the service "
                  "accepts its connections itself, so lazyd never sees who connects)")
    elif listen is not None and listen.is_unix:
        r.problem(node, path, f"{key} only applies to TCP and UDP sockets (a Unix socket's "
                  "clients have no IP address; use mode, owner and group)")
    items = [node] if isinstance(node, ScalarNode) and node.tag != NULL else r.items(
        node, path, "a list of networks such as [10.0.0.0/8, ::1]")
    if items is None:
        return None
    networks = []
    for item in items:
        # The text as written: YAML 1.1 would read some IPv6 addresses as numbers.
        if (text := r.text(item, path, "an IP address or network")) is not None:
            try:
                networks.append(parse_network(text.strip()))
            except ValueError as exc:
                r.problem(item, path, str(exc))
    if len(networks) < len(items):
        return None
    if key == "allow" and not networks:
        r.problem(node, path, "an empty allow list would refuse every client; "
                  "list who may connect, or leave allow out")
        return None
    return tuple(networks)


def claim(r: Reader, address: Address, node: Node, path: str, claimed: Claimed) -> None:
    for other, owner in claimed:
        if overlaps(address, other):
            r.problem(node, path, f"address {address} is already used by {owner}")
            return
    claimed.append((address, path))
