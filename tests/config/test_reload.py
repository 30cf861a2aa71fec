"""config.reload: what a reload changes, decided from the two configs alone."""

from __future__ import annotations

import textwrap

import pytest

from lazyd.config import Config, loads
from lazyd.config.reload import Change, plan_reload

BASE = {
    "web": "command: /bin/true\n  sockets: {http: 'tcp://127.0.0.1:8001'}",
    "api": ("command: /bin/true\n  mode: proxy\n  sockets: {http: {listen: 'tcp://127.0.0.1:8002', "
            "upstream: 'tcp://127.0.0.1:9002'}}"),
}


def _config(services: dict[str, str], extra: str = "") -> Config:
    lines = [extra, "services:"] if extra else ["services:"]
    for name, body in services.items():
        lines.append(f" {name}:\n  " + body)
    return loads(textwrap.dedent("\n".join(lines)) + "\n", "lazyd.yaml", as_root=False)


def test_an_unchanged_config_keeps_everything() -> None:
    """The same file again: every runner kept, every socket reused, nothing retired."""
    plan = plan_reload(_config(BASE), _config(BASE))
    assert plan.changes == {"web": Change.KEEP, "api": Change.KEEP}
    assert plan.removed == () and plan.retired == () and plan.warnings == ()
    assert plan.sockets == {"web": (("tcp", "tcp://127.0.0.1:8001"),),
                            "api": (("tcp", "tcp://127.0.0.1:8002"),)}


@pytest.mark.parametrize(("service", "body", "change"), [
    ("web", BASE["web"] + "\n  stop_timeout: 3s", Change.RECONFIGURE),
    ("web", BASE["web"].replace("/bin/true", "/bin/false"), Change.RESTART),
    ("web", BASE["web"].replace("http:", "www:"), Change.RESTART),
    ("web", BASE["web"].replace("8001", "8011"), Change.RESTART),
    ("web", BASE["web"] + "\n  mode: proxy".replace("proxy", "pass"), Change.KEEP),
    ("api", BASE["api"] + "\n  idle_timeout: 10s", Change.REPLACE),
    ("api", BASE["api"].replace("8002", "8012"), Change.REPLACE),
    ("api", BASE["api"] + "\n  start_timeout: 5s", Change.RECONFIGURE),
    ("api", BASE["api"].replace("/bin/true", "/bin/false"), Change.RESTART),
])
def test_what_each_change_needs(service: str, body: str, change: Change) -> None:
    """Settings used at the next start reconfigure; what the process was started with
    restarts it; how lazyd's proxies serve a socket replaces the runner."""
    new = dict(BASE, **{service: body})
    plan = plan_reload(_config(BASE), _config(new))
    assert plan.changes[service] is change
    other = "api" if service == "web" else "web"
    assert plan.changes[other] is Change.KEEP


def test_a_moved_socket_is_bound_anew_and_the_old_one_retired() -> None:
    """A socket whose address changed is bound afresh (None) and the old one closed;
    one that moved to another service is the same socket there."""
    new = {
        "web": BASE["web"].replace("8001", "8011"),
        "other": "command: /bin/true\n  sockets: {http: 'tcp://127.0.0.1:8001'}",
    }
    plan = plan_reload(_config(BASE), _config(new))
    assert plan.changes == {"web": Change.RESTART, "other": Change.ADD}
    assert plan.removed == ("api",)
    assert plan.sockets["web"] == (None,)
    assert plan.sockets["other"] == (("tcp", "tcp://127.0.0.1:8001"),)
    assert plan.retired == (("tcp", "tcp://127.0.0.1:8002"),)


def test_what_a_reload_cannot_change_is_said() -> None:
    """A new metrics address or top-level user takes effect only on a restart of lazyd."""
    plan = plan_reload(_config(BASE), _config(BASE, "metrics: tcp://127.0.0.1:9464"))
    assert plan.warnings == ("a new metrics: address takes effect when lazyd restarts; the "
                             "endpoint stays where it is",)
