"""The syntax of systemd values: words and their quoting and escapes, booleans,
time spans, specifiers (`%n`, `%i`, ...), environment assignments and files,
`$VAR` substitution in commands, and `Listen*=` values as lazyd addresses.
"""

from __future__ import annotations

import ipaddress
import os
import re

from lazyd.config.units.files import Unit, UnitError
from lazyd.net.addresses import parse_address

_BOOL_TRUE = ("1", "yes", "y", "true", "t", "on")


_BOOL_FALSE = ("0", "no", "n", "false", "f", "off")


_TIME_UNITS = {
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", '"': '"', "'": "'", "s": " "}


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def split_words(text: str) -> list[str]:
    """Split a value into items the way systemd.syntax(7) "Quoting" says: whitespace
    separates, '...' and "..." quote, C-style escapes are understood."""
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t\n":
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quote = ""
        while i < n:
            char = text[i]
            if char == "\\":
                decoded, i = _escape(text, i)
                word.append(decoded)
                continue
            if quote:
                if char == quote:
                    quote = ""
                else:
                    word.append(char)
            elif char in "'\"":
                quote = char
            elif char in " \t\n":
                break
            else:
                word.append(char)
            i += 1
        if quote:
            raise UnitError(f"unclosed quote {quote} in {text!r}")
        words.append("".join(word))


def _escape(text: str, i: int) -> tuple[str, int]:
    """The character that the escape at text[i] (a backslash) stands for, and where
    the text goes on."""
    if i + 1 >= len(text):
        raise UnitError(f"a backslash ends {text!r}")
    char = text[i + 1]
    if char in _ESCAPES:
        return _ESCAPES[char], i + 2
    for lead, digits, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if char == lead:
            code = text[i + 2 : i + 2 + digits]
            if len(code) == digits and all(c in "0123456789abcdefABCDEF" for c in code):
                return chr(int(code, base)), i + 2 + digits
            raise UnitError(f"bad escape \\{char}{code} in {text!r}")
    code = text[i + 1 : i + 4]
    if len(code) == 3 and all(c in "01234567" for c in code) and int(code, 8) < 256:
        return chr(int(code, 8)), i + 4
    if char == ";":
        return "\\;", i + 2  # systemd's escaped command separator: a literal ';' later
    raise UnitError(f"unknown escape \\{char} in {text!r} (write \\\\ for a backslash)")


def parse_bool(text: str) -> bool:
    if text.lower() in _BOOL_TRUE:
        return True
    if text.lower() in _BOOL_FALSE:
        return False
    raise UnitError(f"expected yes or no, got {text!r}")


def parse_timespan(text: str) -> float | None:
    """Seconds from a systemd time span (`90`, `1min 30s`, `500ms`); None for infinity."""
    if text.strip() == "infinity":
        return None
    total = 0.0
    parts = re.findall(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-zµ]*)", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
        raise UnitError(f"bad time span {text!r}: expected such as 90s, 1min 30s, 500ms")
    for number, unit in parts:
        if unit not in _TIME_UNITS and unit != "":
            raise UnitError(f"bad time span {text!r}: unknown unit {unit!r}")
        total += float(number) * _TIME_UNITS.get(unit, 1.0)
    return total


def format_duration(seconds: float) -> str:
    """A lazyd duration: 250ms, 90s."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _unescape_name(text: str) -> str:
    """systemd's unit name unescaping (%I, %P, %f): '-' is '/', \\xNN a byte."""
    text = text.replace("-", "/")
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), text)


def expand_specifiers(text: str, unit: Unit) -> str:
    """Expand the %-specifiers that mean the same on every machine (systemd.unit(5)).

    The system manager's own user is root, so %u, %h and their kin are root's.
    Specifiers that depend on the machine or the boot (%H, %m, %b, ...) raise
    UnitError: the config would be right on this machine only.
    """
    prefix, at, instance = unit.stem.partition("@")
    last = prefix.rpartition("-")[2]
    table = {
        "n": unit.name, "N": unit.stem, "p": prefix, "P": _unescape_name(prefix),
        "i": instance, "I": _unescape_name(instance), "j": last, "J": _unescape_name(last),
        "f": "/" + _unescape_name(instance if at else prefix).lstrip("/"),
        "t": "/run", "S": "/var/lib", "C": "/var/cache", "L": "/var/log", "E": "/etc",
        "T": "/tmp", "V": "/var/tmp", "u": "root", "U": "0", "g": "root", "G": "0",
        "h": "/root", "s": "/bin/sh", "y": unit.path, "Y": os.path.dirname(unit.path), "%": "%",
    }

    def replace(match: re.Match[str]) -> str:
        letter = match[1]
        if letter in table:
            return table[letter]
        if letter == "":
            raise UnitError(f"a lone % ends {text!r} (write %% for a percent sign)")
        raise UnitError(f"specifier %{letter} depends on the machine or boot it runs on, or "
                        "is unknown")

    return re.sub(r"%(.?)", replace, text)


def parse_environment(text: str) -> list[tuple[str, str]]:
    """`Environment=` items: quoted KEY=VALUE words."""
    pairs = []
    for word in split_words(text):
        name, sep, value = word.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise UnitError(f"expected NAME=VALUE, got {word!r}")
        pairs.append((name, value))
    return pairs


def parse_environment_file(text: str, filename: str) -> list[tuple[str, str]]:
    """An `EnvironmentFile=`: KEY=VALUE lines, # comments, shell-like quotes."""
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _ENV_NAME.fullmatch(name):
            raise UnitError(f"{filename}:{number}: expected NAME=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = re.sub(r'\\(["\\$`])', r"\1", value)
        pairs.append((name, value))
    return pairs


def substitute_variables(words: list[str], env: dict[str, str]) -> tuple[list[str], list[str]]:
    """systemd's `$FOO` (a word of its own: split at whitespace) and `${FOO}` (exactly
    one argument) in a command line, `$$` a dollar; also the names that were unset."""
    unset: list[str] = []

    def lookup(name: str) -> str:
        if name not in env:
            unset.append(name)
        return env.get(name, "")

    result: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            result.extend(split_words(lookup(whole[1])))
            continue
        result.append(re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                             lambda m: "$" if m[0] == "$$" else lookup(m[1]), word))
    return result, unset


def convert_listen(key: str, value: str, ipv6_only: bool | None) -> tuple[str, str | None]:
    """A lazyd address for a systemd Listen*= value, and a remark about any
    difference (None when it is the same socket).

    `ipv6_only` is BindIPv6Only=: True for ipv6-only, False for both, None for
    default (the system's net.ipv6.bindv6only, which is 0 unless changed).
    """
    if key not in ("ListenStream", "ListenDatagram", "ListenSequentialPacket"):
        raise UnitError(f"lazyd holds only stream and datagram sockets, not {key}=")
    if key == "ListenSequentialPacket":
        raise UnitError("lazyd has no SOCK_SEQPACKET sockets")
    stream = key == "ListenStream"
    if value.startswith("/"):
        return ("unix:" if stream else "unix-dgram:") + value, None
    if value.startswith("@"):
        return ("unix:" if stream else "unix-dgram:") + value, None
    if value.startswith("vsock:"):
        raise UnitError("lazyd has no AF_VSOCK sockets")
    scheme = "tcp" if stream else "udp"
    port_only = re.fullmatch(r"\d+", value)
    if port_only or _is_ipv6_wildcard(value):
        port = value if port_only else value.rpartition(":")[2]
        # systemd binds [::]:PORT, which takes IPv4 too unless ipv6-only.
        if ipv6_only:
            return f"{scheme}://[::]:{port}", None
        if stream:
            return str(int(port)), None
        return (f"udp://0.0.0.0:{port}", f"IPv4 only: lazyd has no dual-stack UDP socket; "
                f"add udp://[::]:{port} as another socket for IPv6")
    if "%" in value.rpartition("]")[2] or "%" in value.partition("]")[0]:
        raise UnitError("lazyd binds no interface scopes (%dev)")
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
        address = f"{scheme}://[{host}]:{port}"
    else:
        address = f"{scheme}://{value}"
    parse_address(address)  # raises ValueError saying what is wrong
    return address, None


def _is_ipv6_wildcard(value: str) -> bool:
    """[::]:PORT, however the zeros are written."""
    match = re.fullmatch(r"\[([0-9a-fA-F:]+)\]:\d+", value)
    try:
        return match is not None and ipaddress.IPv6Address(match[1]).is_unspecified
    except ValueError:
        return False
