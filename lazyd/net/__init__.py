"""Sockets as the network sees them: addresses and how they are written,
binding (modes, owners, backlogs), who may connect (allow/deny, per-source
limits) and the PROXY protocol header.  No trio tasks, no services: the
layers above use these to hold and forward.  Imports only `lazyd.errors`
and the standard library (and `lazyd.config`'s model for binding).
"""
