"""The one part of lazyd that stays root once the daemon has dropped its
privileges: a small helper process that starts and signals the configured
services, as its sealed table says, and hands the daemon the listening
socket of a service on the kernel data path, and nothing else.  Standard
library only (and `lazyd.privileged.handoff` and `lazyd.datapath.bpf.diag`,
which are too), and not even
`typing`: it imports nothing a non-root user could have changed
(tests/privileged/test_protocol.py checks each module under ``python -I -S``).

`protocol` is every message between the daemon and the helper, built and
checked by both sides; `entries` the table's entries (kinds: ``process``)
and `fields` the checks of one field; `boot` starts the helper (``python -I
-S``), `spawnerd` is its poll loop and reaper, `checks` what a spawn may hand
a service, `child` the forked child up to exec, `listeners` which
listener of a service's process the daemon may have, `reloading` a reload's table
reader, which runs `read_table` in a fresh interpreter of its own (the one
module here that imports lazyd's config loader, in that interpreter only).
"""
