"""`datapath`: which path a proxied service's bytes take once it is warm.

`userspace` (the default): lazyd forwards every byte.  `kernel`: once the
service is ready, new TCP connections for lazyd's address are steered by a
BPF sk_lookup program straight into the service's own listening socket
(`lazyd.datapath.kernel`).  `auto`: the kernel path where the config, the
kernel and lazyd's privileges allow it, else userspace.

This module says, from the config alone, what keeps a service off the kernel
path (`obstacles`): for `kernel` each is a config error, for `auto` the
reason it falls back (`fallback`, said once in the log and in `lazyd check`'s
plan).  Whether the kernel and the privileges
allow it is for the daemon to find out when it starts
(`lazyd.datapath.bpf.supported`).

What lazyd cannot do for a connection it never sees, and so what the kernel
path is incompatible with: a PROXY protocol header, allow/deny, a per-source
limit the config asks for, max_connections, connection_idle_timeout; and
what sk_lookup cannot steer: Unix sockets, UDP (a reply would come from the
service's own port, not from the address the client sent to).

`max_connections_per_source` has a default (256) that guards lazyd's own
fds.  On the kernel path lazyd still applies it to what it holds itself
(connections that arrive while the service is cold, and those it still
forwards); steered connections cost lazyd nothing, so the default does not
keep a service off the kernel path.  A limit written in the config is a
promise about the service's clients, which steering cannot keep: it is an
obstacle; one that is the default's value is taken as the default.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

from lazyd.net.addresses import Kind

if TYPE_CHECKING:  # the model imports this module
    from lazyd.config.model import ServiceConfig


class Datapath(enum.Enum):
    USERSPACE = "userspace"
    KERNEL = "kernel"
    AUTO = "auto"


# Service keys the kernel path cannot honour when the config sets them (to
# anything but their default).
_SERVICE_LIMITS = ("max_connections_per_source", "max_connections", "connection_idle_timeout")


def obstacles(service: ServiceConfig) -> list[str]:
    """What in `service`'s config keeps it off the kernel path, one reason each."""
    from lazyd.config.model import Mode, ServiceConfig

    if service.mode is not Mode.PROXY:
        return ["the kernel data path is for mode: proxy"]
    if service.container is not None:
        # The listener must be a process's that lazyd's helper started itself.
        return ["the kernel data path is for a command, not a container"]
    defaults = {f.name: f.default for f in dataclasses.fields(ServiceConfig)}
    found = [f"{key} is set, and lazyd does not see steered connections"
             for key in _SERVICE_LIMITS if getattr(service, key) != defaults[key]]
    for sc in service.sockets:
        where = f"socket {sc.name}"
        if sc.listen.kind is not Kind.TCP:
            found.append(f"{where} listens on {sc.listen}, and only TCP can be steered")
            continue
        if sc.upstream is None or sc.upstream.kind is not Kind.TCP:
            found.append(f"{where} has upstream {sc.upstream}, not a TCP address")
        if sc.proxy_protocol is not None:
            found.append(f"{where} sends a PROXY protocol header")
        if sc.allow is not None or sc.deny:
            found.append(f"{where} has allow/deny rules")
    return found


def steered_sockets(service: ServiceConfig) -> dict[str, list[object]]:
    """The privileged helper's table field ``steer`` for `service`: for each socket
    whose listener lazyd may take from the service, the upstream [host, port] that
    listener is bound to.  Empty for a service that stays on the userspace path."""
    if service.datapath is Datapath.USERSPACE or fallback(service):
        return {}
    return {sc.name: [sc.upstream.host, sc.upstream.port]
            for sc in service.sockets if sc.upstream is not None}


def fallback(service: ServiceConfig) -> list[str]:
    """Why an `auto` service stays on the userspace path, from its config (empty:
    nothing in the config keeps it off the kernel path, or it is not `auto`)."""
    return obstacles(service) if service.datapath is Datapath.AUTO else []


def describe(service: ServiceConfig) -> str | None:
    """The plan's line for a service's data path, or None for the default."""
    if service.datapath is Datapath.USERSPACE:
        return None
    if why := fallback(service):
        return f"datapath: auto -> userspace ({'; '.join(why)})"
    if service.datapath is Datapath.AUTO:
        return "datapath: auto -> kernel where the kernel allows it (else userspace)"
    return "datapath: kernel (BPF sk_lookup steering once ready)"
