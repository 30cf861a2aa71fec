"""The daemon put together: one runner per service driving its lifecycle
with trio, the daemon that binds, drops privileges, reloads and shuts down,
the control socket, and lazyd's own place under systemd.  This is the only
layer that knows every other one.
"""
