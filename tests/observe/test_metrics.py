"""lazyd.observe.metrics: the Prometheus endpoint, its HTTP, and figures that agree with status."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from lazyd import config as config_mod
from lazyd.core.lifecycle import Activation, Outcome
from lazyd.core.starts import StartRecord
from lazyd.net.addresses import parse_address
from lazyd.observe.metrics import START_BUCKETS, Metrics, bind_metrics, serve_metrics
from lazyd.runtime.daemon import serve
from lazyd.runtime.service import Options
from tests.conftest import PROGRAMS, PY, free_port, program, run_lazyd


async def _http(port: int, request: bytes) -> bytes:
    """Send a raw request and read the whole answer (the server closes)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        chunks = []
        with trio.fail_after(5):
            while data := await stream.receive_some(65536):
                chunks.append(data)
    return b"".join(chunks)


async def scrape(port: int) -> dict[str, list[Sample]]:
    """GET /metrics, parsed by prometheus-client's own parser: samples by metric name."""
    answer = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: lazyd\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    families = text_string_to_metric_families(body.decode())
    return {f.name: f.samples for f in families}


def value(samples: Mapping[str, list[Sample]], family: str, sample: str, **labels: str) -> float:
    """The one sample of `family` named `sample` with these labels."""
    found = [s.value for s in samples[family]
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, samples.get(family))
    return found[0]


def _record(outcome: Outcome, trigger: float, spawned: float | None,
            ready: float | None) -> StartRecord:
    return StartRecord.from_activation(Activation(outcome, "traffic", trigger, spawned, ready),
                                       trigger)


async def test_histogram_and_failures_follow_what_observe_is_given(tmp_path: Path) -> None:
    """Each ready start adds one observation per phase (spawn, readiness, total) in its
    bucket; failed and timed-out starts count as failures, not latencies."""
    metrics = Metrics(lambda: {})
    metrics.observe("web", _record(Outcome.READY, 10.0, 10.004, 10.204))
    metrics.observe("web", _record(Outcome.READY, 20.0, 20.002, 22.002))
    metrics.observe("web", _record(Outcome.FAILED, 30.0, 30.001, None))
    metrics.observe("web", _record(Outcome.TIMED_OUT, 40.0, 40.001, None))
    text = metrics.exposition().decode()
    samples = {f.name: f.samples for f in text_string_to_metric_families(text)}
    for phase in ("spawn", "readiness", "total"):
        assert value(samples, "lazyd_start_seconds", "lazyd_start_seconds_count",
                     service="web", phase=phase) == 2
    assert value(samples, "lazyd_start_seconds", "lazyd_start_seconds_sum",
                 service="web", phase="readiness") == pytest.approx(0.2 + 2.0)
    assert value(samples, "lazyd_start_seconds", "lazyd_start_seconds_bucket",
                 service="web", phase="total", le="0.25") == 1
    assert value(samples, "lazyd_start_seconds", "lazyd_start_seconds_bucket",
                 service="web", phase="total", le="2.5") == 2
    assert value(samples, "lazyd_start_failures", "lazyd_start_failures_total",
                 service="web", outcome="failed") == 1
    assert value(samples, "lazyd_start_failures", "lazyd_start_failures_total",
                 service="web", outcome="timed_out") == 1
    assert "_created" not in text
    assert START_BUCKETS[0] == 0.001 and START_BUCKETS[-2] == 30.0


async def test_the_endpoint_answers_only_get_and_head_on_metrics(tmp_path: Path) -> None:
    """GET and HEAD /metrics answer 200; other paths 404, other methods 405, garbage 400,
    a request head past the limit 431; every answer closes the connection."""
    port = free_port()
    sock = bind_metrics(parse_address(f"tcp://127.0.0.1:{port}"))
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, sock, Metrics(lambda: {}))
            assert (await scrape(port)).keys() >= {"lazyd_activations", "lazyd_service_state"}
            head = await _http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
            assert (await _http(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
            answer = await _http(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD" in answer
            assert (await _http(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400")
            huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000
            assert (await _http(port, huge)).startswith(b"HTTP/1.1 431")
            nursery.cancel_scope.cancel()


async def test_a_silent_client_is_dropped_after_the_timeout() -> None:
    """A client that connects and says nothing is closed once the timeout passes."""
    port = free_port()
    sock = bind_metrics(parse_address(f"tcp://127.0.0.1:{port}"))
    with sock:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_metrics(sock, Metrics(lambda: {}), timeout=0.2,
                                                  task_status=task_status))
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                with trio.fail_after(3):
                    assert await stream.receive_some(100) == b""
            nursery.cancel_scope.cancel()


async def test_proxy_mode_metrics_count_bytes_connections_and_state(tmp_path: Path) -> None:
    """A proxied echo service: activations, state, active connections and bytes forwarded
    each way show what happened, and the histogram holds the one start; the endpoint
    outlives a reload and is released at the end."""
    port, upstream, metrics_port = free_port(), free_port(), free_port()
    text = f"""
metrics: tcp://127.0.0.1:{metrics_port}
control: unix:{tmp_path / "control.sock"}
services:
  echo:
    mode: proxy
    command: [{PY}, {PROGRAMS / "echo_server.py"}, "127.0.0.1:{upstream}"]
    user: root
    sockets:
      tcp: {{listen: tcp://127.0.0.1:{port}, upstream: tcp://127.0.0.1:{upstream}}}
"""
    (tmp_path / "lazyd.yaml").write_text(text)
    config = config_mod.load(str(tmp_path / "lazyd.yaml"))
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(
            lambda task_status: serve(config, options=Options(log=lines.append,
                                                              output=lines.append),
                                      task_status=task_status))
        idle = await scrape(metrics_port)
        assert value(idle, "lazyd_service_state", "lazyd_service_state",
                     service="echo", state="idle") == 1
        assert value(idle, "lazyd_start_seconds", "lazyd_start_seconds_count",
                     service="echo", phase="total") == 0
        client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client:
            await client.send_all(b"x" * 1000)
            got = b""
            with trio.fail_after(10):
                while len(got) < 1000:
                    got += await client.receive_some(65536)
            busy = await scrape(metrics_port)
        assert value(busy, "lazyd_active_connections", "lazyd_active_connections",
                     service="echo") == 1
        assert value(busy, "lazyd_service_state", "lazyd_service_state",
                     service="echo", state="running") == 1
        assert value(busy, "lazyd_service_state", "lazyd_service_state",
                     service="echo", state="idle") == 0
        assert value(busy, "lazyd_activations", "lazyd_activations_total", service="echo") == 1
        assert value(busy, "lazyd_held_connections", "lazyd_held_connections",
                     service="echo") == 0
        for direction in ("in", "out"):
            assert value(busy, "lazyd_bytes_forwarded", "lazyd_bytes_forwarded_total",
                         service="echo", direction=direction) == 1000
        total = value(busy, "lazyd_start_seconds", "lazyd_start_seconds_sum",
                      service="echo", phase="total")
        record = daemon.runners["echo"].history[-1]
        assert total == pytest.approx(record.total)

        # A reload cannot move the endpoint: it says so, and keeps serving where it is.
        (tmp_path / "lazyd.yaml").write_text(text.replace(str(metrics_port), str(free_port())))
        assert await daemon.reload() == []
        assert any("a new metrics: address takes effect when lazyd restarts" in line
                   for line in lines)
        assert "lazyd_activations" in await scrape(metrics_port)
        await daemon.shutdown()
    with socket.create_server(("127.0.0.1", metrics_port)):
        pass  # released when lazyd stopped


async def test_a_metrics_port_in_use_is_a_start_up_error(tmp_path: Path) -> None:
    """`metrics:` on a port someone holds: lazyd says so, exits 1, and keeps nothing bound."""
    port, metrics_port = free_port(), free_port()
    with socket.create_server(("127.0.0.1", metrics_port)):
        config = tmp_path / "lazyd.yaml"
        config.write_text(f"""
control: unix:{tmp_path / "control.sock"}
metrics: tcp://127.0.0.1:{metrics_port}
services:
  lines:
    command: {program("serve_lines.py", 0)}
    user: root
    sockets:
      tcp: tcp://127.0.0.1:{port}
""")
        result = await trio.run_process([PY, "-m", "lazyd", "run", "-c", str(config)],
                                        capture_stderr=True, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        f"lazyd: metrics endpoint: sockets.metrics (tcp://127.0.0.1:{metrics_port}): "
        "cannot bind: Address already in use")
    with socket.create_server(("127.0.0.1", port)):
        pass  # released
    assert not (tmp_path / "control.sock").exists()


async def test_status_blame_and_histogram_agree_on_two_starts(tmp_path: Path) -> None:
    """A pass-mode service with `ready: {delay: 200ms}` started twice: status, blame and the
    histogram all show two starts whose readiness is 200 ms, and the same p50."""
    port, metrics_port = free_port(), free_port()
    config = f"""
metrics: tcp://127.0.0.1:{metrics_port}
services:
  slow:
    command: {program("serve_lines.py", 0, "exit-when-idle", 0.5)}
    user: root
    ready: {{delay: 200ms}}
    sockets:
      tcp: tcp://127.0.0.1:{port}
"""
    async with run_lazyd(tmp_path, config) as lz:
        await lz.wait_line(r"^lazyd: metrics at http://127\.0\.0\.1:\d+/metrics")
        await lz.activate_until_idle("slow", port, times=2)
        status = (await trio.to_thread.run_sync(
            lambda: json.loads(subprocess.run(
                [PY, "-m", "lazyd", "status", "--json", "--control", lz.control_path],
                capture_output=True, check=True).stdout)))["services"]["slow"]
        blame = await trio.run_process(
            [PY, "-m", "lazyd", "analyze", "blame", "--control", lz.control_path],
            capture_stdout=True)
        samples = await scrape(metrics_port)

    assert status["activations"] == 2
    row = dict(zip(_header(blame.stdout), _row(blame.stdout, "slow"), strict=True))
    assert row["STARTS"] == "2" and row["FAILED"] == "0"
    assert row["P50"] == f"{status['p50_ms']:.1f} ms"
    assert row["P90"] == f"{status['p90_ms']:.1f} ms"
    readiness = float(row["READINESS"].removesuffix(" ms"))
    assert 199.9 <= readiness <= 300  # the delay timer never fires early

    count = value(samples, "lazyd_start_seconds", "lazyd_start_seconds_count",
                  service="slow", phase="readiness")
    assert count == status["activations"] == 2
    assert value(samples, "lazyd_activations", "lazyd_activations_total", service="slow") == 2
    mean = value(samples, "lazyd_start_seconds", "lazyd_start_seconds_sum",
                 service="slow", phase="readiness") / count
    assert readiness - 0.1 <= mean * 1000 <= 300
    total_sum = value(samples, "lazyd_start_seconds", "lazyd_start_seconds_sum",
                      service="slow", phase="total")
    # Two starts: the sum of totals is p50 + max (nearest rank: p50 is the smaller).
    assert total_sum * 1000 == pytest.approx(status["p50_ms"] + status["max_ms"], abs=0.01)
    assert value(samples, "lazyd_start_failures", "lazyd_start_failures_total",
                 service="slow", outcome="failed") == 0


def _header(table: bytes) -> list[str]:
    return _split(table.decode().splitlines()[0])


def _row(table: bytes, service: str) -> list[str]:
    line = next(line for line in table.decode().splitlines() if line.startswith(service + " "))
    return _split(line)


def _split(line: str) -> list[str]:
    """Columns are separated by two or more spaces; cells hold single spaces."""
    return re.split(r" {2,}", line.strip())
