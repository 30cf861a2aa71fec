"""How bytes get from a client to a service once it is ready: the userspace
path (lazyd forwards every byte: one shared buffer, peeking reads for bulk,
the fd and memory budgets) and the kernel path (BPF steering of new
connections straight into the service's own socket).
"""
