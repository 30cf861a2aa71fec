"""Where a service comes from.  `process`: a command that the privileged
helper forks and execs as the service's user, with its sockets at fds 3..
(pass mode) and a clean environment; `container`: an existing container
started and stopped through an engine's API.  The runner sees a started
service through the same small surface either way: wait for its end, send
it a signal, read its output, close it.
"""
