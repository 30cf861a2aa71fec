"""The one part of lazyd that stays root once the daemon has dropped its
privileges: a small helper process that starts and signals the configured
services, as its sealed table says, and nothing else.  Standard library
only (and `lazyd.backends.process.handoff`, which is too): it imports nothing
a non-root user could have changed.
"""
