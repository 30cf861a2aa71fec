"""The container backend: services that are existing containers, started and
stopped through Docker's Engine API (or Podman's compatible one), on this host
or another. `engine` is the engine's client, used only by lazyd's privileged
helper (the engine socket is root-equivalent); it imports nothing but the
standard library and `lazyd.errors`, so the helper can stay small and trust
nothing outside the standard library.
"""
