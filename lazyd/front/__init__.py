"""Holding: what lazyd does with traffic that arrives for a service.  A
stream proxy accepts and holds connections (bounded, in arrival order) until
the service is ready, then releases them to the data path; a datagram proxy
keeps a flow per client.  Admission (allow/deny, limits, refusing while a
service is failed) happens here, at the door.  Imports `lazyd.net` and the
data path.
"""
