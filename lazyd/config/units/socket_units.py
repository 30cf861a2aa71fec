"""A `.socket` unit converted: its sockets (named by `FileDescriptorName=`, in the
order the unit lists them) and the service it activates, with a remark for
every setting lazyd has no equivalent for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lazyd.config.units.files import _LISTEN_KEYS, Assignment, Unit, UnitError
from lazyd.config.units.output import _not_converted, _Remark, _scalar, _why
from lazyd.config.units.syntax import convert_listen, expand_specifiers, parse_bool

_FD_NAME = re.compile(r"[!-9;-~]{1,255}")


@dataclass
class _Socket:
    name: str
    address: str
    options: dict[str, str]
    remarks: list[_Remark]  # printed above the socket line


@dataclass
class _SocketUnit:
    unit: Unit
    service: str  # the service unit it activates
    sockets: list[_Socket]
    remarks: list[_Remark]  # about the unit as a whole: printed above its first socket


def _convert_socket_unit(unit: Unit) -> _SocketUnit:
    remarks: list[_Remark] = []
    sockets: list[_Socket] = []
    service = f"{unit.stem}.service"
    name = unit.name
    ipv6_only: bool | None = None
    options: dict[str, str] = {}
    unix_options: dict[str, str] = {}
    handled: set[int] = set()

    def take(a: Assignment) -> None:
        handled.add(id(a))

    effective = unit.effective()
    for a in effective:
        if a.section == "Unit" and a.key in ("Description", "Documentation"):
            remarks.append(_Remark(a.shown(), problem=False))
            take(a)
        elif a.section == "Socket":
            try:
                value = expand_specifiers(a.value, unit)
                if a.key == "Service":
                    service = value
                    take(a)
                elif a.key == "FileDescriptorName":
                    if not _FD_NAME.fullmatch(value):
                        raise UnitError("1 to 255 printable ASCII characters without ':'")
                    name = value
                    take(a)
                elif a.key == "BindIPv6Only":
                    if value not in ("default", "both", "ipv6-only"):
                        raise UnitError("expected default, both or ipv6-only")
                    ipv6_only = {"default": None, "both": False, "ipv6-only": True}[value]
                    take(a)
                elif a.key == "Backlog":
                    backlog = int(value)
                    if backlog > 2**31 - 1:  # systemd's default: let somaxconn decide
                        take(a)
                    elif backlog >= 1:
                        options["backlog"] = str(backlog)
                        take(a)
                elif a.key == "ReusePort":
                    if parse_bool(value):
                        options["reuse_port"] = "true"
                    take(a)
                elif a.key == "SocketMode":
                    if not re.fullmatch(r"[0-7]{1,4}", value):
                        raise UnitError("expected an octal mode such as 0660")
                    unix_options["mode"] = "0" + value.lstrip("0").rjust(3, "0")
                    take(a)
                elif a.key in ("SocketUser", "SocketGroup"):
                    unix_options["owner" if a.key == "SocketUser" else "group"] = _scalar(value)
                    take(a)
                elif a.key == "Accept":
                    if parse_bool(value):
                        remarks.append(_not_converted(a, "lazyd has no per-connection service "
                                                      "instances (inetd style); its sockets "
                                                      "are left out"))
                        return _SocketUnit(unit, service, [], remarks)
                    take(a)
            except (UnitError, ValueError) as exc:
                remarks.append(_Remark(f"not converted: {a.shown()} ({exc})", a.where))
                take(a)
    for a in effective:
        if a.section == "Socket" and a.key in _LISTEN_KEYS:
            take(a)
            try:
                address, remark = convert_listen(a.key, expand_specifiers(a.value, unit),
                                                 ipv6_only)
            except (UnitError, ValueError) as exc:
                remarks.append(_not_converted(a, str(exc)))
                continue
            is_path = address.startswith(("unix:/", "unix-dgram:/"))
            socket_options = {**options, **(unix_options if is_path else {})}
            if not (address.startswith(("tcp:", "unix:")) or address.isdigit()):
                socket_options.pop("backlog", None)  # it matters for stream sockets only
            own = [_not_converted(a, remark)] if remark else []
            sockets.append(_Socket(name, address, socket_options, own))
    if unix_options and not any(s.address.startswith(("unix:/", "unix-dgram:/"))
                                for s in sockets):
        for a in effective:
            if a.key in ("SocketMode", "SocketUser", "SocketGroup") and id(a) in handled:
                remarks.append(_not_converted(a, "applies to socket files only, and this unit "
                                              "has none"))
    for a in effective:
        if id(a) not in handled and not (a.section == "Socket" and a.key in _LISTEN_KEYS):
            remarks.append(_not_converted(a, _why(a.key)))
    if not sockets:
        remarks.append(_Remark(f"not converted: {unit.name} (no socket lazyd can hold)",
                               unit.path))
    return _SocketUnit(unit, service, sockets, remarks)
