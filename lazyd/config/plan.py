"""What `lazyd check` prints: a loaded config, described for a person."""

from __future__ import annotations

import dataclasses
import shlex

from lazyd.config import datapath
from lazyd.config.model import Config, Mode, SocketConfig

_SOCKET_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SocketConfig)}


def plan(config: Config) -> str:
    """What `lazyd check` prints: every service, its sockets in fd order and its command."""
    count = len(config.services)
    lines = [f"{config.path}: {count} service{'' if count == 1 else 's'}, config OK"]
    for service in config.services.values():
        user = service.user or "(lazyd's own)"
        group = service.group or ("(the user's)" if service.user else "(lazyd's own)")
        lines.append(f"{service.name}: {service.mode.value} mode, user {user}, group {group}, "
                     f"ready {service.ready}, activate {service.activate.value}")
        width = max(len(socket.name) for socket in service.sockets)
        fd_width = len(str(2 + len(service.sockets)))
        for fd, socket in enumerate(service.sockets, start=3):
            # In proxy mode lazyd keeps the sockets itself: the service gets no fds.
            label = f"fd {fd:<{fd_width}}  " if service.mode is Mode.PASS else ""
            where = str(socket.listen) + (f" -> {socket.upstream}" if socket.upstream else "")
            notes = [  # the settings that differ from their defaults
                f"mode {value:04o}" if key == "mode" else key if value is True else f"{key} {value}"
                for key in ("backlog", "reuse_port", "mode", "owner", "group", "proxy_protocol")
                if (value := getattr(socket, key)) != _SOCKET_DEFAULTS[key]
            ]
            notes += [f"{key} {', '.join(map(str, networks))}" for key in ("allow", "deny")
                      if (networks := getattr(socket, key))]
            notes_text = f"  ({', '.join(notes)})" if notes else ""
            lines.append(f"  {label}{socket.name:<{width}}  {where}{notes_text}")
        if service.container is not None:
            engine = service.engine or "the default engine"
            lines.append(f"  container: {service.container} on {engine}")
        else:
            lines.append(f"  command: {shlex.join(service.command)}")
        if service.requires:
            lines.append(f"  requires: {', '.join(service.requires)}")
        limits = [f"{key} {value}" for key in ("max_connections", "max_connections_per_source",
                                               "connection_idle_timeout")
                  if (value := getattr(service, key)) is not None and service.mode is Mode.PROXY]
        if limits:
            lines.append(f"  limits: {', '.join(limits)}")
        if (path := datapath.describe(service)) is not None:
            lines.append(f"  {path}")
        if service.workdir:
            lines.append(f"  workdir: {service.workdir}")
        if service.environment:
            # Names only: values are often secrets, and this output ends up in logs.
            lines.append(f"  environment: {', '.join(service.environment)}")
    return "\n".join(lines)
