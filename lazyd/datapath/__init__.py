"""How bytes get from a client to a service once it is ready: the userspace
path (lazyd forwards every byte: a buffer, splice(2) for bulk, the fd
budget) and the kernel path (BPF steering of new connections straight into
the service's own socket).
"""
