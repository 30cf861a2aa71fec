"""How the privileged helper starts: all that its interpreter runs before the helper.

`lazyd.backends.process.spawner.spawner_command` runs this file by its path,
``python -I -S .../lazyd/privileged/boot.py EXEC_WAIT_MS``: -I takes no
environment variables, no user site, and puts neither the current directory
nor this file's directory on sys.path; -S runs no site (no .pth files, no
editable-install finders).  So sys.path holds the standard library only.
This adds the directory that holds this copy of the lazyd package, at the
end (so that nothing in it can shadow a standard module), imports the helper
and runs it.  Nothing else is imported: the helper imports nothing a non-root
user could have changed (see `lazyd.privileged`), and refuses to run in an
interpreter started any other way.

Standard library only, and not even `typing`.
"""

from __future__ import annotations

import os
import sys

# The directory that holds the lazyd package (lazyd/privileged/ is in it).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> None:
    """Run the helper: ``boot.py EXEC_WAIT_MS`` (see `lazyd.privileged.spawnerd.main`)."""
    if not (sys.flags.isolated and sys.flags.no_site):
        sys.exit("lazyd spawner: must run as python -I -S (see lazyd.privileged.boot)")
    if len(argv) != 2 or not argv[1].isdigit():
        sys.exit("usage: python -I -S boot.py EXEC_WAIT_MS")
    if PACKAGE_ROOT not in sys.path:
        sys.path.append(PACKAGE_ROOT)
    from lazyd.privileged import spawnerd

    spawnerd.main(int(argv[1]))


if __name__ == "__main__":
    main(sys.argv)
