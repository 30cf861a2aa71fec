"""`lazyd check` and a reload's table reader: does each container service's
container exist on its engine?  Asked of the engines directly, all at once
(one thread each): `check` runs as whoever runs it, and the table reader is
the privileged helper's own process (`lazyd.privileged.read_table`); the
daemon itself asks the helper instead (`lazyd.backends.container.backend`).
"""

from __future__ import annotations

import threading

from lazyd.backends.container.backend import engine_address
from lazyd.backends.container.engine import TLS, Engine, EngineError
from lazyd.config import Config, ServiceConfig


def container_problems(config: Config) -> tuple[list[str], list[str]]:
    """(missing containers, engines that cannot be reached or refused), one line
    each: ``FILE: services.NAME.container: no container named 'NAME' on engine ...``."""
    missing: list[str] = []
    unreachable: list[str] = []

    def check(service: ServiceConfig) -> None:
        assert service.container is not None
        try:
            tls = None if service.engine_tls is None else TLS(*service.engine_tls)
            Engine(engine_address(service), tls).inspect(service.container)
        except EngineError as exc:
            line = f"{config.path}: services.{service.name}.container: {exc}"
            (missing if str(exc).startswith("no container named") else unreachable).append(line)

    threads = [threading.Thread(target=check, args=(service,))
               for service in config.services.values() if service.container is not None]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(missing), sorted(unreachable)
