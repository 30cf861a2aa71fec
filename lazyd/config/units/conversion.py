"""The whole conversion: units named or given as files, the socket units that
activate an imported service and the service an imported socket unit
activates, grouped into services and written out as one config.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lazyd.config.units.files import Unit, UnitFiles
from lazyd.config.units.output import Result, _address_scalar, _comment, _Remark, _scalar
from lazyd.config.units.service_units import _convert_service_unit, _Service
from lazyd.config.units.socket_units import _convert_socket_unit, _SocketUnit


def convert(units: Sequence[str], files: UnitFiles | None = None) -> Result:
    """Convert units (files, or names looked up in `files.dirs`) to a lazyd config.

    The socket units that activate an imported service and the service that an
    imported socket unit activates are imported too when they can be found.
    """
    problems: list[str] = []
    explicit: dict[str, str] = {}
    for given in units:
        name = os.path.basename(given)
        if "/" in given or os.path.isfile(given):  # a file, else a name to look up
            explicit[name] = given
        else:
            explicit.setdefault(name, "")
    # Related units are looked for beside the files given first.
    file_dirs = [os.path.dirname(os.path.abspath(p)) for p in explicit.values() if p]
    files = files or UnitFiles()
    files = UnitFiles(dirs=[*dict.fromkeys(file_dirs), *files.dirs], read=files.read)

    loaded: dict[str, Unit] = {}
    missing: set[str] = set()

    def load(name: str) -> Unit | None:
        if name in loaded:
            return loaded[name]
        if name in missing:
            return None
        unit, unit_problems = files.load(name, explicit.get(name) or None)
        problems.extend(unit_problems)
        if unit is None:
            missing.add(name)
            return None
        loaded[name] = unit
        return unit

    wanted = []
    for name in explicit:
        if not name.endswith((".socket", ".service")):
            problems.append(f"{explicit[name] or name}: lazyd imports .socket and .service "
                            "units only")
        elif "@." in name:
            problems.append(f"{explicit[name] or name}: a template: name an instance, such "
                            f"as {name.replace('@.', '@NAME.')}")
        else:
            wanted.append(name)
    socket_units: dict[str, _SocketUnit] = {}
    services: dict[str, _Service] = {}
    # Each unit to load, with the service whose unit led to it (None if given).
    pending: list[tuple[str, str | None]] = [(name, None) for name in wanted]
    while pending:
        name, via = pending.pop(0)
        if name in socket_units or name in services or name in missing:
            continue
        if via is not None and name not in explicit and not files.find(name):
            continue  # a socket unit a service mentions, but nobody has
        unit = load(name)
        if unit is None:
            continue
        if name.endswith(".socket"):
            socket_unit = _convert_socket_unit(unit)
            if via is not None and socket_unit.service != via:
                continue  # mentioned (After=syslog.socket), but it activates another service
            socket_units[name] = socket_unit
            if socket_unit.sockets and socket_unit.service not in services:
                pending.append((socket_unit.service, None))
        elif name.endswith(".service"):
            service = _convert_service_unit(unit)
            services[name] = service
            # Its sockets: Sockets=, the socket units it depends on, and NAME.socket.
            for candidate in [*service.socket_order, f"{unit.stem}.socket"]:
                pending.append((candidate, name))

    # Group the sockets under their services, in the order systemd passes them:
    # each unit's in its own order; across units systemd promises none, so the
    # order the service names them in (Sockets=, Requires=, ...), then as given.
    given_order = {name: index for index, name in enumerate(wanted)}
    grouped: dict[str, list[_SocketUnit]] = {}
    out_of_service: list[_SocketUnit] = []
    for socket_unit in socket_units.values():
        if socket_unit.service in services and services[socket_unit.service].usable:
            grouped.setdefault(socket_unit.service, []).append(socket_unit)
        else:
            out_of_service.append(socket_unit)
    imported = {name: service.name for name, service in services.items()
                if service.usable and any(m.sockets for m in grouped.get(name, []))}
    blocks: list[str] = []
    orphans: list[str] = []
    for unit_name, service in services.items():
        members = grouped.get(unit_name, [])
        mentioned = {n: i for i, n in enumerate(dict.fromkeys(service.socket_order))}
        members.sort(key=lambda s: (mentioned.get(s.unit.name, len(mentioned)),
                                    given_order.get(s.unit.name, len(given_order)),
                                    s.unit.name))
        if unit_name in imported:
            blocks.append(_service_block(service, members, imported, problems))
            continue
        if service.usable:
            service.remarks.append(_Remark(
                f"not converted: {unit_name} (no socket unit activates it: lazyd starts "
                "a service on traffic to its sockets)", service.unit.path))
        orphans.append(_orphan_block(service.unit, service.remarks, members, problems))
    for socket_unit in out_of_service:
        if socket_unit.sockets and socket_unit.service not in services:
            socket_unit.remarks.append(_Remark(
                f"not converted: {socket_unit.unit.name} (it activates {socket_unit.service}, "
                "which was not found: import that unit too)", socket_unit.unit.path))
        orphans.append(_orphan_block(socket_unit.unit, socket_unit.remarks, [], problems))
    if not imported:
        if not problems:
            problems.append("nothing to import")
        return Result("", problems)
    converted = [*services, *socket_units]
    order = ", ".join([*(n for n in wanted if n in converted),
                       *(n for n in converted if n not in wanted)])
    head = [f"# Imported from systemd units: {order}", "services:"]
    return Result("\n".join(head + blocks + orphans) + "\n", problems)


def _service_block(
    service: _Service, members: list[_SocketUnit], imported: dict[str, str], sink: list[str]
) -> str:
    indent = "    "
    lines = [f"  {_scalar(service.name)}:", f"{indent}# from {_files(service.unit)}"]
    for remark in service.remarks:
        if remark.near is None:
            _comment(lines, indent, remark, sink)
    for key, value in service.keys.items():
        for remark in service.remarks:
            if remark.near == key:
                _comment(lines, indent, remark, sink)
        lines.append(f"{indent}{key}: {value}")
    for remark in service.remarks:  # about a key that is not there
        if remark.near is not None and remark.near not in service.keys:
            _comment(lines, indent, remark, sink)
    requires = []
    for dep, a in service.dependencies:
        if dep.endswith(".socket") and any(m.unit.name == dep for m in members):
            continue  # its sockets are this service's
        if dep in imported and imported[dep] != service.name:
            requires.append(imported[dep])
        else:
            why = ("lazyd holds sockets itself" if dep.endswith(".socket") else
                   "not an imported lazyd service" if dep.endswith(".service") else
                   "lazyd requires only services")
            _comment(lines, indent, _Remark(f"not converted: {a.key}={dep} ({why})", a.where),
                     sink)
    if requires:
        lines.append(f"{indent}requires: [{', '.join(_scalar(r) for r in requires)}]")
    lines.append(f"{indent}sockets:")
    inner = indent + "  "
    if len(members) > 1:
        _comment(lines, inner, _Remark(
            "fd order across socket units: systemd promises none; here it follows "
            f"{service.unit.name} (a service should find its sockets by LISTEN_FDNAMES)",
            problem=False), sink)
    names: dict[str, int] = {}
    for member in members:
        _comment(lines, inner, _Remark(f"from {_files(member.unit)}", problem=False), sink)
        for remark in member.remarks:
            _comment(lines, inner, remark, sink)
        for sock in member.sockets:
            name = sock.name
            if name in names:
                names[name] += 1
                renamed = f"{name}-{names[name]}"
                _comment(lines, inner, _Remark(
                    f"not converted: fd name {name!r} for a second socket (lazyd names each "
                    f"socket once: this one is {renamed})", member.unit.path), sink)
                name = renamed
            names.setdefault(name, 1)
            for remark in sock.remarks:
                _comment(lines, inner, remark, sink)
            address = _address_scalar(sock.address)
            if sock.options:
                options = ", ".join(f"{k}: {v}" for k, v in sock.options.items())
                lines.append(f"{inner}{_scalar(name)}: {{listen: {address}, {options}}}")
            else:
                lines.append(f"{inner}{_scalar(name)}: {address}")
    return "\n".join(lines)


def _orphan_block(
    unit: Unit, remarks: list[_Remark], members: list[_SocketUnit], sink: list[str]
) -> str:
    """What could not become a service, as comments after the services."""
    lines = [f"# from {_files(unit)}"]
    for remark in remarks:
        _comment(lines, "", remark, sink)
    for member in members:
        lines.append(f"# from {_files(member.unit)}")
        for remark in member.remarks:
            _comment(lines, "", remark, sink)
        for sock in member.sockets:
            _comment(lines, "", _Remark(f"not converted: socket {sock.name} {sock.address} "
                                        f"(its service {unit.name} was not converted)",
                                        member.unit.path), sink)
    return "\n".join(lines)


def _files(unit: Unit) -> str:
    return " + ".join([unit.path, *unit.dropins])
