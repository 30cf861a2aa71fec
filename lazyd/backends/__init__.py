"""Backends: where a service comes from. A service is either a process lazyd
starts itself (the process backend: `lazyd.spawner` and the privileged
`lazyd.spawnerd`) or an existing container that an engine starts and stops for
it (`lazyd.backends.container`). A backend owns how its services are started,
stopped, watched and logged; it knows nothing of the sockets lazyd holds in
front of them, and imports nothing from the front, the lifecycle or the data
path: those import it.
"""
