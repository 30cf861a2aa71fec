"""lazyd(8), written from the command line's own help texts and examples.

    python -m lazyd.manpage > lazyd.8 && man -l lazyd.8

Every subcommand, option and example comes from `lazyd.cli.build_parser()`,
so the page cannot drift from `lazyd --help`.
"""

from __future__ import annotations

import argparse
import re
import sys

from lazyd import cli

_DESCRIPTION = (
    "lazyd holds listening sockets for services and starts each service the first time "
    "something arrives on one of them. Until the service is ready the kernel (or lazyd) "
    "keeps what arrived, so no client is refused. In pass mode the service receives the "
    "sockets themselves (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES, as sd_listen_fds(3) "
    "describes); in proxy mode lazyd accepts, holds and forwards connections and "
    "datagrams to the service's own address. Started as root, lazyd binds every socket, "
    "then runs as an unprivileged user; services run as their configured users."
)


def _escape(text: str) -> str:
    """Text safe in roff: backslashes and hyphens escaped, no line starting with a
    control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else f" \\fI{_escape(_metavar(action))}\\fR"
            names = ", ".join(f"\\fB{_escape(o)}\\fR" for o in action.option_strings)
            lines += [".TP", names + metavar]
        else:
            lines += [".TP", f"\\fI{_escape(str(action.metavar or action.dest))}\\fR"]
        help_text = (action.help or "") % {"default": action.default}
        lines.append(_escape(help_text))
    return lines


def render() -> str:
    """The man page, as roff."""
    parser = cli.build_parser()
    out = [
        f'.TH LAZYD 8 "" "lazyd {_escape(cli.version())}" "System Administration"',
        ".SH NAME",
        "lazyd \\- " + _escape(cli.DESCRIPTION.rstrip(".").lower()),
        ".SH SYNOPSIS",
        ".B lazyd",
        ".I COMMAND",
        "[\\fIoptions\\fR]",
        ".br",
        ".B lazyd --version",
        ".SH DESCRIPTION",
        _escape(_DESCRIPTION),
        ".SH COMMANDS",
    ]
    for name, sub in _subcommands(parser).items():
        usage = " ".join(sub.format_usage().split()).removeprefix("usage: ")
        out += [f".SS {_escape(name)}", f".B {_escape(usage)}", ".PP",
                _escape(sub.description or ""), *_options(sub),
                ".PP", "Example:", ".PP", ".RS", ".nf", _escape(cli.EXAMPLES[name]), ".fi",
                ".RE"]
    out += [
        ".SH EXIT STATUS",
        "0 success, 1 a config or start\\-up error (bad config, a port that cannot be bound, "
        "nothing to import), 2 bad usage.",
        ".SH ENVIRONMENT",
        ".TP", ".B LAZYD_CONTROL",
        "The control socket's path, when the config names none and no \\fB\\-\\-control\\fR "
        "is given.",
        ".SH FILES",
        ".TP", ".I ./lazyd.yaml", "The config, unless \\fB\\-c\\fR names another.",
        ".TP", ".I /run/lazyd.sock",
        "The control socket of a daemon run as root (else $XDG_RUNTIME_DIR/lazyd.sock).",
        ".SH EXAMPLE",
        ".nf", _escape(cli.EXAMPLES["lazyd"]), ".fi",
        ".SH SEE ALSO",
        "systemd.socket(5), systemd.service(5), sd_listen_fds(3), sd_notify(3)",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
