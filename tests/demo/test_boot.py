"""Services together: requires, eager activation, and the parallel boot."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import trio

from lazyd import config as config_mod
from lazyd.core.lifecycle import Outcome
from lazyd.demo import boot
from lazyd.runtime.daemon import serve
from lazyd.runtime.service import Options
from tests.conftest import ROOT

USER = "root" if os.geteuid() == 0 else None


async def test_a_requires_b_starts_both_at_once_and_early_messages_arrive(
    tmp_path: Path,
) -> None:
    """The first connection to the bus starts it and the log daemon it requires within
    100 ms of each other; what the bus logs before the log daemon is ready arrives."""
    delays = {"logd": 0.3, "bus": 0.0, "device": 0.0}
    text = boot.config_text(tmp_path, delays, USER).replace("    activate: eager\n", "")
    (tmp_path / "lazyd.yaml").write_text(text)
    config = config_mod.load(str(tmp_path / "lazyd.yaml"))
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(
            lambda task_status: serve(
                config, options=Options(log=lines.append, output=lines.append),
                task_status=task_status,
            )
        )
        runners = daemon.runners
        assert all(not r.machine.process for r in runners.values())
        stream = await trio.open_unix_socket(str(tmp_path / "bus.sock"))
        async with stream:
            await stream.send_all(b"ping\n")
            with trio.fail_after(10):
                assert await stream.receive_some(100) == b"ok ping\n"
        with trio.fail_after(10):
            while not any(a.outcome is Outcome.READY for a in runners["logd"].history):
                await runners["logd"].changed.wait()
        bus, logd = runners["bus"].history[0], runners["logd"].history[0]
        assert logd.reason == "required by bus"
        assert bus.spawned is not None and logd.spawned is not None
        assert abs(logd.spawned - bus.trigger) < 0.1 and abs(bus.spawned - bus.trigger) < 0.1
        assert not runners["device"].history  # nobody asked for it
        with trio.fail_after(5):
            while "bus: message 'ping'" not in _read(tmp_path / "messages.txt"):
                await trio.sleep(0.01)
        assert "bus: starting" in _read(tmp_path / "messages.txt")
        await daemon.shutdown()


def _read(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_parallel_boot_starts_all_at_once_and_sequential_one_after_another(
    tmp_path: Path,
) -> None:
    """With start-up work 300/200/100 ms, lazyd starts all three at once (each is
    started before any is ready), while the sequential boot starts each only after the
    one before is ready; neither boot loses a message.  (How much faster that is, is
    measured by benchmarks/bench_boot.py, not asserted here.)"""
    (tmp_path / "seq").mkdir()
    (tmp_path / "par").mkdir()
    sequential = await boot.boot_sequential(tmp_path / "seq", boot.DEFAULT_DELAYS)
    parallel = await boot.boot_parallel(tmp_path / "par", boot.DEFAULT_DELAYS, USER)
    assert sequential.lost == [] and parallel.lost == []
    assert sequential.total >= 0.6  # the sum of the start-up work
    assert max(parallel.started.values()) < min(parallel.ready.values()), parallel
    order = sorted(sequential.started, key=sequential.started.__getitem__)
    for before, after in itertools.pairwise(order):
        assert sequential.ready[before] <= sequential.started[after], sequential


def test_boot_config_is_what_conf_boot_yaml_describes() -> None:
    """conf/boot.yaml is a valid config with the same dependency shape as the demo's."""
    conf = ROOT / "conf" / "boot.yaml"
    config = config_mod.load(str(conf), as_root=False)
    assert config.services["device"].requires == ("bus",)
    assert config.services["bus"].requires == ("logd",)
    assert config.services["device"].activate.value == "eager"
