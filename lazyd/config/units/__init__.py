"""`lazyd import`: systemd .socket and .service units turned into a lazyd config.

The units are read the way systemd reads them (systemd.syntax(7), systemd.unit(5)):
a name is looked up in the unit directories, earlier directories winning; its
`NAME.d/*.conf` drop-ins (and those of its template and dash prefixes) are
applied after it in file-name order; an empty assignment resets a list. Socket
units are grouped under the service they activate (`Service=`, else the unit of
the same name), each unit's sockets in the order it lists them, named by
`FileDescriptorName=` (default: the socket unit's name), so the service sees
the `LISTEN_FDS`/`LISTEN_FDNAMES` it saw under systemd.

Everything that has no lazyd equivalent becomes a `# not converted: Key=value
(why)` comment where it would have gone, and a `FILE:LINE:` line in `problems`.
Nothing here writes anything: `convert()` returns the config text and the
problems, and the command line prints them.

The package: `files` (reading unit files), `syntax` (systemd's value syntax),
`socket_units` and `service_units` (converting each kind of unit), `output`
(YAML scalars, remarks, the result) and `conversion` (`convert()`, the whole).
"""

from __future__ import annotations

from lazyd.config.units.conversion import convert
from lazyd.config.units.files import (
    UNIT_DIRS,
    Assignment,
    Unit,
    UnitError,
    UnitFiles,
    parse_unit_text,
)
from lazyd.config.units.output import Result
from lazyd.config.units.service_units import service_name
from lazyd.config.units.syntax import (
    convert_listen,
    expand_specifiers,
    format_duration,
    parse_bool,
    parse_environment,
    parse_environment_file,
    parse_timespan,
    split_words,
    substitute_variables,
)

__all__ = [
    "UNIT_DIRS", "Assignment", "Result", "Unit", "UnitError", "UnitFiles", "convert",
    "convert_listen", "expand_specifiers", "format_duration", "parse_bool", "parse_environment",
    "parse_environment_file", "parse_timespan", "parse_unit_text", "service_name", "split_words",
    "substitute_variables",
]
