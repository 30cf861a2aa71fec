"""The entry points: a config file or text in, a checked `Config` out.

`load()` and `loads()` read a YAML config and check all of it, reporting each
problem as ``FILE:LINE:COL: path.to.key: what is wrong``.  The reading is
`lazyd.config.reader`'s, the sections' walkers `lazyd.config.sections`', and
whatever is asked of the machine goes through the `Host` given (by default
this machine as this process sees it, `lazyd.config.host.Machine.current()`).
"""

from __future__ import annotations

from lazyd.config.host import Host, Machine
from lazyd.config.model import Config
from lazyd.config.reader import compose
from lazyd.config.sections import read_config
from lazyd.errors import ConfigError


def load(path: str, *, host: Host | None = None, as_root: bool | None = None) -> Config:
    """Read and check the config file at `path`; raise ConfigError listing every problem."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        line, col = data.count(b"\n", 0, exc.start) + 1, exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError([f"{path}:{line}:{col}: not UTF-8 text"]) from None
    return loads(text, path, host=host, as_root=as_root)


def loads(
    text: str, filename: str = "<config>", *, host: Host | None = None,
    as_root: bool | None = None,
) -> Config:
    """Check config text against `host` (see `lazyd.config.host` for which checks apply).

    `as_root` is short for `host=Machine(as_root=as_root)`: this machine, with
    root's rules on or off; with neither, whether lazyd runs as root right now.

    Raise ConfigError whose every line reads ``FILE:LINE:COL: path.to.key: what is wrong``.
    """
    if host is None:
        host = Machine.current() if as_root is None else Machine(as_root=as_root)
    elif as_root is not None:
        raise TypeError("give host or as_root, not both")
    root, reader = compose(text, filename)
    config = read_config(reader, root, host)
    if reader.problems or config is None:
        raise reader.error()
    return config
