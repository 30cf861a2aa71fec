"""The table reader: what a reload runs to read the helper's table from the config file.

After the drop, what the daemon says about commands and users is not to be
trusted, so a reload does not take the table from it: the helper runs this
file, by its path, in a fresh interpreter, with the helper's credentials
(root, when lazyd was started as root): ``python -I .../read_table.py
CONFIG NOFILE_SOFT``, stdin /dev/null, stdout a pipe back to the helper,
stderr lazyd's, environment only ``PATH`` (lazyd's).  -I takes no
environment variables, no user site, and puts neither the current directory
nor this file's directory on sys.path; the site packages stay (lazyd's
config loader needs PyYAML).  This puts the directory that holds this copy
of lazyd first on sys.path, so that it is this copy that reads the config,
and prints the table (`lazyd.backends.process.launch.print_table`, which,
as root, reads only a file that only root can change).

Unlike the helper, the reader imports lazyd's config loader and what that
needs, but only in `main`, in its own interpreter: the helper imports this
module for `command` alone, and the top of it imports only the standard
library.  What the reader prints is checked by the helper
(`lazyd.privileged.protocol.parse_table_answer`) as strictly as any request.
"""

from __future__ import annotations

import os
import sys

# The directory that holds the lazyd package (lazyd/privileged/ is in it).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(config: str, nofile_soft: int | None) -> list[str]:
    """The command that runs the reader for `config` (`nofile_soft` None: none)."""
    nofile = -1 if nofile_soft is None else nofile_soft
    return [sys.executable, "-I", os.path.abspath(__file__), config, str(nofile)]


def main(argv: list[str]) -> None:
    """Print the table of ``read_table.py CONFIG NOFILE_SOFT`` (-1: none) on stdout."""
    if len(argv) != 3:
        sys.exit("usage: python -I read_table.py CONFIG NOFILE_SOFT")
    if sys.path[:1] != [PACKAGE_ROOT]:
        sys.path.insert(0, PACKAGE_ROOT)
    from lazyd.backends.process.launch import print_table

    print_table(argv[1], int(argv[2]))


if __name__ == "__main__":
    main(sys.argv)
