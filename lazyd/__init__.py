"""lazyd: hold listening sockets for services and start each one on first use."""

__version__ = "0.1.0"
