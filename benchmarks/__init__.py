"""lazyd's benchmarks: scripts that measure lazyd against direct access and
against systemd's own tools, in one run on the same machine.

Run them with `python -m benchmarks` from the project's root. They are not
tests: pytest does not collect them.
"""
