"""`lazyd run | check | status | demo`: the command line.

Exit status: 0 success, 1 a config or start-up error, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import trio

from lazyd import __version__, control
from lazyd import config as config_mod
from lazyd.errors import ConfigError, ControlError, LazydError

DEFAULT_CONFIG = "lazyd.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazyd",
        description="Hold listening sockets for services and start each one on first use.",
    )
    parser.add_argument("--version", action="version", version=f"lazyd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (%(default)s)")

    check = sub.add_parser("check", help="validate a config and print the plan")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (%(default)s)")

    status = sub.add_parser("status", help="show every service of a running daemon")
    status.add_argument("--json", action="store_true", help="print JSON")
    _add_control_arguments(status)

    reload = sub.add_parser("reload", help="make a running daemon re-read its config")
    _add_control_arguments(reload)

    sub.add_parser("demo", help="a self-contained demonstration; exits by itself")
    return parser


def _add_control_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="PATH", help="the daemon's control socket")
    where.add_argument("-c", "--config", help="find the control socket in this config")


def _find_control(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    config = config_mod.load(args.config) if args.config else None
    return control.control_path(config)


def _cmd_run(args: argparse.Namespace) -> int:
    from lazyd.daemon import serve

    config = config_mod.load(args.config)
    trio.run(lambda: serve(config))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = config_mod.load(args.config)
    print(config_mod.plan(config))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
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


def _cell(value: Any, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def format_status(services: dict[str, Any]) -> str:
    """The table `lazyd status` prints."""
    header = ("SERVICE", "STATE", "PID", "STARTS", "QUEUED", "ACTIVE", "LAST START")
    rows = [header]
    for name, svc in services.items():
        last = svc.get("last_start_ms")
        rows.append(
            (
                name,
                str(svc.get("state")),
                _cell(svc.get("pid")),
                _cell(svc.get("activations")),
                _cell(svc.get("queued")),
                _cell(svc.get("active")),
                "-" if last is None else f"{last:.1f} ms",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    for name, svc in services.items():
        if svc.get("status"):
            lines.append(f"{name}: {svc['status']}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from lazyd.demo import main as demo_main

    return demo_main()


COMMANDS = {
    "run": _cmd_run,
    "check": _cmd_check,
    "status": _cmd_status,
    "reload": _cmd_reload,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
