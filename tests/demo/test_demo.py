"""`lazyd demo` and the example configs under conf/."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lazyd import config as config_mod
from lazyd.errors import ConfigError
from tests.conftest import ROOT

CONF = ROOT / "conf"


def test_demo_shows_a_cold_start_with_every_held_connection_answered() -> None:
    """The demo's burst of early clients is answered in full by one start, and the idle
    service is started again by the next client."""
    result = subprocess.run(
        [sys.executable, "-m", "lazyd", "demo"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "20/20 answered, by 1 process (1 start)" in out
    assert "activations: 2." in out
    assert out.count("web: ready in ") >= 2
    assert out.count("messages lost: 0") == 2
    assert "parallel / sequential = 0." in out


@pytest.mark.parametrize("name", sorted(p.name for p in CONF.glob("*.yaml")))
def test_example_configs_are_valid(name: str) -> None:
    """Every example config loads; the only thing a bare machine may lack is the
    example's own program."""
    try:
        config_mod.load(str(CONF / name), as_root=False)
    except ConfigError as exc:
        assert all("command not found" in p for p in exc.problems), exc.problems
