"""A `.service` unit converted: its command (with `ExecStart=` prefixes and
`$VAR` substitution), user and group, environment, readiness, restart and
timeouts, and its dependencies, with a remark for every setting lazyd has no
equivalent for.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from lazyd.config.units.files import Assignment, Unit, UnitError, _read_text
from lazyd.config.units.output import _flow, _not_converted, _Remark, _scalar, _why
from lazyd.config.units.syntax import (
    expand_specifiers,
    format_duration,
    parse_bool,
    parse_environment,
    parse_environment_file,
    parse_timespan,
    split_words,
    substitute_variables,
)

# systemd's compiled-in search path for a command given without a slash.
_EXEC_SEARCH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


_DEPENDENCY_KEYS = ("Requires", "Wants", "BindsTo")


_SET_BY_LAZYD = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


@dataclass
class _Service:
    unit: Unit
    name: str
    keys: dict[str, str]  # lazyd key -> YAML value, in output order
    remarks: list[_Remark]
    dependencies: list[tuple[str, Assignment]]  # unit names from Requires=/Wants=/BindsTo=
    socket_order: list[str]  # socket unit names in the order the unit mentions them
    usable: bool


def service_name(unit_name: str) -> str:
    """A lazyd service name for a systemd unit name (foo@bar.service -> foo-bar)."""
    stem = unit_name.removesuffix(".service")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.")
    return name or "service"


def _convert_service_unit(unit: Unit) -> _Service:
    remarks: list[_Remark] = []
    keys: dict[str, str] = {}
    handled: set[int] = set()
    effective = unit.effective()
    deps: list[tuple[str, Assignment]] = []
    socket_order: list[str] = []
    usable = True

    def take(a: Assignment) -> None:
        handled.add(id(a))

    def get(key: str) -> Assignment | None:
        return unit.value("Service", key)

    def problem(a: Assignment, exc: Exception) -> None:
        remarks.append(_not_converted(a, str(exc)))
        take(a)

    for a in effective:
        if a.section == "Unit" and a.key in ("Description", "Documentation"):
            remarks.append(_Remark(a.shown(), problem=False))
            take(a)
        elif a.section == "Unit" and a.key in (*_DEPENDENCY_KEYS, "After"):
            try:
                names = split_words(expand_specifiers(a.value, unit))
            except UnitError as exc:
                problem(a, exc)
                continue
            for dep in names:
                if dep.endswith(".socket"):
                    socket_order.append(dep)
                if a.key in _DEPENDENCY_KEYS:
                    deps.append((dep, a))
            if a.key in _DEPENDENCY_KEYS:
                take(a)  # reported later, once it is known which were imported
        elif a.section == "Service" and a.key == "Sockets":
            try:
                socket_order[:0] = split_words(expand_specifiers(a.value, unit))
                take(a)
            except UnitError as exc:
                problem(a, exc)

    # The user: User=, or root (systemd's default for a system service); +/! run as root.
    user_a, group_a = get("User"), get("Group")
    dynamic = get("DynamicUser")
    user: str | None = None
    for setting in (user_a, group_a):
        if setting is not None:
            take(setting)
    if user_a is not None:
        try:
            user = expand_specifiers(user_a.value, unit)
        except UnitError as exc:
            problem(user_a, exc)
    if dynamic is not None:
        take(dynamic)
        try:
            if parse_bool(dynamic.value):
                remarks.append(_not_converted(dynamic, "lazyd allocates no users" + (
                    "" if user else ": the service runs as nobody; better give it an account")))
                user = user or "nobody"
        except UnitError as exc:
            problem(dynamic, exc)

    # ExecStart=: one command, its prefixes, quoting and $VARIABLES.
    env, env_keys = _environment(unit, remarks, take)
    commands = unit.values("Service", "ExecStart")
    command: list[str] | None = None
    for a in commands:
        take(a)
    service_type = get("Type")
    if not commands:
        where = unit.path
        remarks.append(_Remark(f"not converted: {unit.name} (no ExecStart=: lazyd needs a "
                               "command)", where))
        usable = False
    elif len(commands) > 1:
        remarks.append(_not_converted(commands[1], "lazyd runs one command per service"))
        usable = False
    else:
        a = commands[0]
        try:
            command, as_root, notes = _command(a, unit, env, user)
        except UnitError as exc:
            problem(a, exc)
            usable = False
        else:
            remarks.extend(notes)
            if as_root:
                user = "root"
    if user is None:
        user = "root"
        remarks.append(_Remark("User= is not set: systemd runs the service as root, and so "
                               "does this config", problem=False, near="user"))
    if command is not None:
        keys["command"] = _flow(command)
    keys["user"] = _scalar(user)
    if user_a is not None and user != "root" and _lookup_user(user) is None:
        remarks.append(_Remark(f"warning: {user_a.shown()}: no such user on this machine; "
                               "lazyd check refuses the config until it exists", user_a.where,
                               near="user"))
    if group_a is not None:
        group = group_a.value
        if _lookup_group(group):
            keys["group"] = _scalar(group)
        else:
            primary = _primary_group(user)
            instead = (f"the service runs with {user}'s primary group {primary}" if primary
                       else "the service runs with its user's primary group")
            remarks.append(_not_converted(group_a, f"no group {group!r} on this machine; "
                                          f"{instead}"))
    keys.update(env_keys)

    # The rest, one setting at a time.
    for a in effective:
        if a.section != "Service" or id(a) in handled:
            continue
        try:
            value = expand_specifiers(a.value, unit)
            converted = _service_setting(a, value, unit, service_type)
        except UnitError as exc:
            problem(a, exc)
            continue
        if converted is None:
            continue
        take(a)
        if isinstance(converted, _Remark):
            remarks.append(converted)
        else:
            keys.update(converted)
    if service_type is None and commands:
        keys["ready"] = "started"
    for a in effective:
        if id(a) not in handled:
            remarks.append(_not_converted(a, _why(a.key)))
    return _Service(unit, service_name(unit.name), keys, remarks, deps, socket_order, usable)


def _service_setting(
    a: Assignment, value: str, unit: Unit, service_type: Assignment | None
) -> list[tuple[str, str]] | _Remark | None:
    """One [Service] setting as a lazyd key and value, a remark, or None (not converted)."""
    key = a.key
    if key == "Type":
        if value in ("simple", "exec"):
            return [("ready", "started")]
        if value in ("notify", "notify-reload"):  # reloading is systemd's; readiness the same
            return [("ready", "notify")]
        raise UnitError({
            "forking": "lazyd supervises the process it starts; it does not follow a fork",
            "oneshot": "a lazyd service serves its sockets; it is not a one-off job",
            "dbus": "lazyd does not watch the bus for a name",
            "idle": "lazyd has no idle queue",
        }.get(value, f"unknown type {value!r}"))
    if key == "Restart":
        if value in ("no", "always", "on-failure"):
            return [("restart", value)]
        raise UnitError(f"lazyd restarts no, on-failure or always; {value} is none of them")
    if key in ("TimeoutStartSec", "TimeoutStopSec", "TimeoutSec"):
        seconds = parse_timespan(value)
        if not seconds:  # infinity or 0, which systemd takes as "no timeout"
            raise UnitError("lazyd always has a timeout")
        names = {"TimeoutStartSec": ["start_timeout"], "TimeoutStopSec": ["stop_timeout"],
                 "TimeoutSec": ["start_timeout", "stop_timeout"]}[key]
        return [(name, format_duration(seconds)) for name in names]
    if key == "KillSignal":
        from lazyd.config import parse_signal

        try:
            return [("stop_signal", parse_signal(value).name)]
        except ValueError as exc:
            raise UnitError(str(exc)) from None
    if key == "WorkingDirectory":
        path = value.removeprefix("-")
        if path == "~":
            raise UnitError("write the home directory out")
        if not path.startswith("/"):
            raise UnitError("expected an absolute path")
        return [("workdir", _scalar(path))]
    if key == "NotifyAccess":
        if value in ("main", "exec", "all"):
            return _Remark(f"{a.shown()}: lazyd believes the main process and its "
                           "descendants", problem=False, near="ready")
        if value == "none" and not (service_type and service_type.value.startswith("notify")):
            return _Remark(f"{a.shown()}: lazyd reads notifications only with ready: notify",
                           problem=False, near="ready")
        raise UnitError("ready: notify needs the service's notifications")
    if key == "KillMode" and value == "control-group":
        return _Remark(f"{a.shown()}: lazyd kills the whole process group after the stop "
                       "signal's timeout", problem=False)
    return None


def _environment(
    unit: Unit, remarks: list[_Remark], take: Callable[[Assignment], None]
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Environment= and EnvironmentFile= (read now: files change, configs don't), the
    files winning as under systemd; the variables and the `environment` key."""
    env: dict[str, str] = {}
    from_files: dict[str, str] = {}
    for a in unit.values("Service", "Environment"):
        take(a)
        try:
            env.update(parse_environment(expand_specifiers(a.value, unit)))
        except UnitError as exc:
            remarks.append(_not_converted(a, str(exc)))
    for a in unit.values("Service", "EnvironmentFile"):
        take(a)
        try:
            path = expand_specifiers(a.value, unit)
            optional = path.startswith("-")
            path = path.removeprefix("-")
            try:
                text = _read_text(path)
            except OSError as exc:
                if optional:
                    remarks.append(_Remark(f"{a.shown()}: not there, and optional",
                                           problem=False, near="environment"))
                    continue
                raise UnitError(f"cannot read {path}: {exc.strerror}") from None
            from_files.update(parse_environment_file(text, path))
            remarks.append(_Remark(f"{a.shown()}: read now; import again after changing it",
                                   problem=False, near="environment"))
        except UnitError as exc:
            remarks.append(_not_converted(a, str(exc)))
    env.update(from_files)
    for name in _SET_BY_LAZYD:
        if name in env:
            del env[name]
            remarks.append(_Remark(f"not converted: {name} (lazyd sets it itself)",
                                   unit.path, near="environment"))
    keys = []
    if env:
        body = ", ".join(f"{name}: {json.dumps(value, ensure_ascii=False)}"
                         for name, value in env.items())
        keys.append(("environment", "{" + body + "}"))
    return env, keys


def _command(
    a: Assignment, unit: Unit, env: dict[str, str], user: str | None
) -> tuple[list[str], bool, list[_Remark]]:
    """ExecStart=: the argv, whether it runs as root (+, !), and remarks."""
    remarks: list[_Remark] = []
    text = expand_specifiers(a.value, unit)
    words = split_words(text)
    if ";" in words:
        raise UnitError("lazyd runs one command per service (';' separates commands)")
    words = [w.replace("\\;", ";") for w in words]
    if not words:
        raise UnitError("the command is empty")
    match = re.match(r"[-@:+!]*", words[0])
    prefixes = match[0] if match else ""
    words[0] = words[0][len(prefixes):]
    as_root = "+" in prefixes or ("!" in prefixes and "!!" not in prefixes)
    if "!!" in prefixes:
        pass  # only matters without ambient capabilities, which Linux has had since 4.3
    if as_root:
        remarks.append(_Remark(f"{a.key}= prefix {prefixes!r}: systemd runs it as root, and so "
                               "does this config", problem=False, near="user"))
    if "-" in prefixes:
        remarks.append(_Remark(f"not converted: the '-' of {a.shown()} (lazyd counts a failed "
                               "exit as a failure)", a.where, near="command"))
    if ":" not in prefixes:
        static = {"USER": user or "root", "LOGNAME": user or "root"}
        if (entry := _lookup_user(user or "root")) is not None:
            static.update(HOME=entry.pw_dir, SHELL=entry.pw_shell)
        words, unset = substitute_variables(words, {**static, **env})
        for name in dict.fromkeys(unset):
            remarks.append(_Remark(f"{a.key}=: ${name} is not set in the unit, so it is "
                                   "empty, as under systemd", a.where, near="command"))
    if not words or not words[0]:
        raise UnitError("the program may not come from a variable")
    if "@" in prefixes:
        if len(words) < 2:
            raise UnitError("'@' needs the program and then its argv[0]")
        remarks.append(_Remark(f"not converted: argv[0] {words[1]!r} of {a.shown()} (lazyd "
                               "passes the program's own path as argv[0])", a.where,
                               near="command"))
        del words[1]
    if "/" not in words[0]:
        found = shutil.which(words[0], path=_EXEC_SEARCH)
        if found:
            words[0] = found
    if "/" not in words[0] or not os.access(words[0], os.X_OK):
        remarks.append(_Remark(f"warning: {a.key}=: no program {words[0]!r} on this machine; "
                               "lazyd check refuses the config until it exists", a.where,
                               near="command"))
    return words, as_root, remarks


def _lookup_user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _lookup_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _primary_group(user: str) -> str | None:
    entry = _lookup_user(user)
    if entry is None:
        return None
    try:
        return grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        return None
