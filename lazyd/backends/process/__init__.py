"""A service that is a process: what it is started with (`launch`: the table
the privileged helper is sealed with, the environment, credentials), the
daemon's side of the privileged helper (`spawner`), and the fd handoff of
systemd's LISTEN_FDS protocol (`handoff`), which both sides share.
"""
