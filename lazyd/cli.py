"""`lazyd run | check | status | reload | analyze | demo | import`: the command line.

Exit status: 0 success, 1 a config or start-up error, 2 bad usage.
The help texts and their examples are also the man page (`lazyd.manpage`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import trio

from lazyd import __version__ as _source_version
from lazyd import config as config_mod
from lazyd.errors import ConfigError, ControlError, LazydError
from lazyd.logs import FORMATS, Level, Logger
from lazyd.observe.status import format_status
from lazyd.runtime import control

DEFAULT_CONFIG = "lazyd.yaml"
DESCRIPTION = "Hold listening sockets for services and start each one on first use."

# One example per command: shown by `lazyd COMMAND --help` and in the man page.
EXAMPLES = {
    "lazyd": "lazyd check -c /etc/lazyd/lazyd.yaml && lazyd run -c /etc/lazyd/lazyd.yaml",
    "run": "lazyd run -c /etc/lazyd/lazyd.yaml --log-format json",
    "check": "lazyd check -c conf/demo.yaml",
    "status": "lazyd status --watch --interval 0.5 -c /etc/lazyd/lazyd.yaml",
    "reload": "lazyd reload -c /etc/lazyd/lazyd.yaml",
    "analyze": "lazyd analyze plot --since 1h > starts.svg",
    "demo": "lazyd demo",
    "import": "lazyd import lehu.service > /etc/lazyd/lazyd.yaml",
}


def version() -> str:
    """The installed distribution's version, else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("lazyd")
    except metadata.PackageNotFoundError:
        return _source_version


def _epilog(command: str) -> str:
    return f"example:\n  {EXAMPLES[command]}"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, also the source of `lazyd.manpage`."""
    parser = argparse.ArgumentParser(
        prog="lazyd", description=DESCRIPTION, epilog=_epilog("lazyd"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lazyd {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, epilog=_epilog(name),
                              description=description or help[:1].upper() + help[1:] + ".",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    run = command("run", "run the daemon in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (%(default)s)")
    run.add_argument("--log-format", choices=FORMATS, default="text",
                     help="log lines as text (default) or one JSON object each")

    check = command("check", "validate a config and print the plan")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (%(default)s)")

    status = command("status", "show every service of a running daemon")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print JSON")
    shown.add_argument("--watch", action="store_true",
                       help="a table that refreshes in place until q or Ctrl-C (plain repeated "
                       "tables when stdout is not a terminal)")
    status.add_argument("--interval", type=_interval, default=1.0, metavar="DURATION",
                        help="how often --watch refreshes (default 1s; 250ms, 2s, ...)")
    _add_control_arguments(status)

    reload = command("reload", "make a running daemon re-read its config")
    _add_control_arguments(reload)

    analyze = command(
        "analyze", "start latency per service (blame) or an SVG timeline of starts (plot)"
    )
    analyze.add_argument("view", choices=("blame", "plot"),
                         help="blame: a table, slowest first; plot: SVG on stdout")
    analyze.add_argument("--since", type=_duration, metavar="DURATION",
                         help="only starts within this long ago (30s, 10m, 2h)")
    _add_control_arguments(analyze)

    command("demo", "a self-contained demonstration; exits by itself")

    imports = command(
        "import", "systemd .socket and .service units as a lazyd config on stdout",
        "Convert systemd units to a lazyd config, printed on stdout. A UNIT is a file, else a "
        "name looked up in /etc/systemd/system, /run/systemd/system and /lib/systemd/system, "
        "drop-ins (NAME.d/*.conf) included. The socket units that activate a service and "
        "the service a socket unit activates come along. What has no lazyd equivalent "
        "becomes a '# not converted:' comment and a line on stderr; the exit status is 1 "
        "only when no service could be converted.")
    imports.add_argument("units", nargs="+", metavar="UNIT", help="a .socket or .service unit")
    imports.add_argument("--unit-dir", action="append", metavar="DIR",
                         help="look units up here instead (repeat for several, first wins)")
    return parser


def _interval(text: str) -> float:
    seconds = _duration(text)
    if not 0.05 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("expected an interval from 50ms to 1h")
    return seconds


def _add_control_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="PATH", help="the daemon's control socket")
    where.add_argument("-c", "--config", help="find the control socket in this config")


def _duration(text: str) -> float:
    try:
        return config_mod.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _find_control(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    config = config_mod.load(args.config) if args.config else None
    return control.control_path(config)


def _cmd_run(args: argparse.Namespace) -> int:
    from lazyd.runtime.daemon import serve
    from lazyd.runtime.service import Options

    logger = Logger(args.log_format)
    options = Options(log=logger, output=logger.output)
    # Start-up errors go through the logger too: a JSON log stays all JSON,
    # and under journald they are errors.
    try:
        config = config_mod.load(args.config)
        if os.geteuid() == 0:
            from lazyd.runtime.privileges import clear_inheritable_capabilities

            clear_inheritable_capabilities()
        trio.run(lambda: serve(config, options=options, drop_privileges=True))
    except ConfigError as exc:
        for problem in exc.problems:
            logger(problem, Level.ERR)
        return 1
    except LazydError as exc:
        logger(f"lazyd: {exc}", Level.ERR)
        return 1
    except BaseExceptionGroup as group:
        # A start-up error raised inside a nursery (the drop of privileges,
        # say) arrives wrapped: it is still one clean line, not a traceback.
        errors, rest = group.split(LazydError)
        if errors is None or rest is not None:
            raise
        for error in _leaves(errors):
            logger(f"lazyd: {error}", Level.ERR)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup[LazydError]) -> list[LazydError]:
    found: list[LazydError] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _cmd_check(args: argparse.Namespace) -> int:
    from lazyd.runtime.backlog import capped_backlogs, somaxconn
    from lazyd.runtime.privileges import daemon_user

    config = config_mod.load(args.config)
    if any(service.container is not None for service in config.services.values()):
        from lazyd.backends.container.checks import container_problems

        missing, unreachable = container_problems(config)
        if missing or unreachable:
            raise ConfigError(missing + unreachable)
    print(config_mod.plan(config))
    # The same warnings `run` logs at start-up (on stderr): backlogs the
    # kernel caps, and the choice of user.
    for warning in capped_backlogs(config, somaxconn()):
        print(warning, file=sys.stderr)
    user = daemon_user(config.user, lambda line: print(line, file=sys.stderr))
    if user is not None:
        print(f"lazyd: binds as root, then runs as user {user.name}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        from lazyd.observe.watch import watch

        return watch(_find_control(args), args.interval)
    reply = control.request(_find_control(args), "status")
    if args.json:
        print(json.dumps({"services": reply["services"]}, indent=2))
    else:
        print(format_status(reply["services"]))
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    path = _find_control(args)
    try:
        control.request(path, "reload")
    except ControlError as exc:
        for problem in exc.details.get("problems", []):
            print(problem, file=sys.stderr)
        raise
    print("reloaded")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from lazyd.observe import analyze

    reply = control.request(_find_control(args), "status", history=True)
    services = reply["services"]
    if args.since is not None:
        services = analyze.recent(services, time.time() - args.since)
    if args.view == "blame":
        print(analyze.format_blame(services))
    else:
        sys.stdout.write(analyze.render_svg(services))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from lazyd.config.units import UnitFiles, convert

    files = UnitFiles(dirs=args.unit_dir) if args.unit_dir else UnitFiles()
    result = convert(args.units, files)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    if not result.usable:
        print("lazyd import: nothing usable remains: no service could be converted",
              file=sys.stderr)
        return 1
    sys.stdout.write(result.config)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lazyd.demo.demo import main as demo_main

    return demo_main()


COMMANDS = {
    "run": _cmd_run,
    "check": _cmd_check,
    "status": _cmd_status,
    "reload": _cmd_reload,
    "analyze": _cmd_analyze,
    "demo": _cmd_demo,
    "import": _cmd_import,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except LazydError as exc:
        print(f"lazyd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `lazyd check | head -1`: the reader has gone, which is no error of ours.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
