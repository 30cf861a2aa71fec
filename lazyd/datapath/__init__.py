"""How bytes get from a client to a service: the userspace shovel and the kernel steering.

A proxied service is reached either through lazyd, which accepts each connection
and forwards its bytes (the userspace data path), or, once the service is warm,
directly: a BPF program in the network namespace hands every new connection for
lazyd's address to the service's own listening socket (the kernel data path,
`lazyd.datapath.bpf`). This package owns both and imports nothing from the
daemon's other layers.
"""
