"""The Prometheus endpoint: every start and every service's state, on `metrics:`.

Two kinds of figures.  Start latencies are histograms, observed as each start
ends (the daemon sets `Options.on_activation` to `Metrics.observe`), because a
histogram must see every start and the history keeps only the last ones.
Everything else (states, queues, bytes, datagrams) lives on the runners
already; a collector reads it at scrape time, so there is no second copy to
keep in step.

The metrics have a registry of their own, not prometheus-client's global one,
and are served by a few lines of trio HTTP/1.1 (one request per connection,
a bounded request head, a timeout), not by prometheus-client's server threads.

Counters that live on a runner (activations, bytes, datagrams) start again
from zero when a reload replaces the runner (a change of mode or of how its
sockets are proxied), as they would across a restart of lazyd; Prometheus'
rate() and increase() take that in their stride.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics import disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from lazyd.config import SocketConfig
from lazyd.core.lifecycle import Outcome, State
from lazyd.core.starts import StartRecord
from lazyd.errors import BindError
from lazyd.net.addresses import Address
from lazyd.runtime.binding import bind_socket

if TYPE_CHECKING:
    from lazyd.runtime.service import ServiceRunner

# From 1 ms (a pass-mode start of a small C program) to 30 s (start_timeout's
# default): roughly 1-2.5-5 steps, so a quantile estimate is within a factor 2.5.
START_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf,
)
PHASES = ("spawn", "readiness", "total")
FAILURES = (Outcome.FAILED, Outcome.TIMED_OUT)

MAX_REQUEST_HEAD = 8192  # a scraper's GET is a few hundred bytes
REQUEST_TIMEOUT = 5.0  # for the whole exchange: reading the request and sending the answer
# Connections served at once.  Past this, a new connection closes the oldest
# one instead of being turned away: Prometheus sends its request the moment it
# connects and is answered within milliseconds, so what is oldest is nearly
# always a connection that sits there saying nothing.  Sixteen such
# connections used to make every scrape fail with 503.
MAX_CONNECTIONS = 64

Runners = Callable[[], Mapping[str, "ServiceRunner"]]


def _outcome_label(outcome: Outcome) -> str:
    return outcome.value.replace(" ", "_")  # "timed out" -> "timed_out"


class Metrics:
    """lazyd's metrics on their own CollectorRegistry.

    `runners` returns the daemon's current runners by service name (a
    function: a reload replaces the mapping).
    """

    def __init__(self, runners: Runners) -> None:
        # The `_created` series (a timestamp per label set) are noise here; the
        # switch is prometheus-client's and process-wide, and lazyd is the only
        # user of prometheus-client in its process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self._runners = runners
        self.start_seconds = Histogram(
            "lazyd_start_seconds",
            "Start latency of successful starts, by phase: spawn (first traffic to exec "
            "done), readiness (exec done to ready), total (first traffic to ready).",
            ["service", "phase"],
            buckets=START_BUCKETS,
            registry=self.registry,
        )
        self.start_failures = Counter(
            "lazyd_start_failures",
            "Starts that did not become ready: the process failed (exited or could not be "
            "executed) or timed out.",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_RunnerCollector(runners))
        self._labelled: set[str] = set()

    def observe(self, service: str, record: StartRecord) -> None:
        """Count one start that has just ended (ready, failed or timed out)."""
        if record.outcome is Outcome.READY:
            assert record.ready is not None and record.spawned is not None
            phases = {
                "spawn": record.spawned - record.trigger,
                "readiness": record.ready - record.spawned,
                "total": record.ready - record.trigger,
            }
            for phase, seconds in phases.items():
                self.start_seconds.labels(service, phase).observe(seconds)
        else:
            self.start_failures.labels(service, _outcome_label(record.outcome)).inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (version 0.0.4)."""
        self._label_services()
        return generate_latest(self.registry)

    def _label_services(self) -> None:
        """Every configured service shows its histogram and failures from the
        start, at zero, so that queries see it before its first start; a
        service a reload removed disappears."""
        names = set(self._runners())
        for name in sorted(names - self._labelled):
            for phase in PHASES:
                self.start_seconds.labels(name, phase)
            for outcome in FAILURES:
                self.start_failures.labels(name, _outcome_label(outcome))
        for name in self._labelled - names:
            for phase in PHASES:
                self.start_seconds.remove(name, phase)
            for outcome in FAILURES:
                self.start_failures.remove(name, _outcome_label(outcome))
        self._labelled = names


class _RunnerCollector:
    """What the runners know right now, read at each scrape."""

    def __init__(self, runners: Runners) -> None:
        self._runners = runners

    def collect(self) -> Iterable[Metric]:
        activations = CounterMetricFamily(
            "lazyd_activations", "Starts made (each spawn of the service's process).",
            labels=["service"])
        held = GaugeMetricFamily(
            "lazyd_held_connections",
            "Connections waiting for the service: held by lazyd (proxy mode) or in the "
            "kernel's accept queue (pass mode, TCP).",
            labels=["service"])
        active = GaugeMetricFamily(
            "lazyd_active_connections",
            "Connections being forwarded and datagram flows open (proxy mode).",
            labels=["service"])
        dgram_queued = GaugeMetricFamily(
            "lazyd_datagrams_queued", "Datagrams held for the service (proxy mode).",
            labels=["service"])
        dgram_dropped = CounterMetricFamily(
            "lazyd_datagrams_dropped",
            "Datagrams dropped: queue full, too many flows, start failed, undeliverable.",
            labels=["service"])
        dgram_forwarded = CounterMetricFamily(
            "lazyd_datagrams_forwarded",
            "Datagrams delivered: in (client to service) and out (service to client).",
            labels=["service", "direction"])
        forwarded = CounterMetricFamily(
            "lazyd_bytes_forwarded",
            "Bytes forwarded (proxy mode): in (client to service) and out (service to client).",
            labels=["service", "direction"])
        refused = CounterMetricFamily(
            "lazyd_refused",
            "Connections and datagrams refused by allow/deny or max_connections_per_source.",
            labels=["service"])
        steered = CounterMetricFamily(
            "lazyd_steered_connections",
            "Connections the kernel data path steered straight into the service (lazyd "
            "does not see their bytes).",
            labels=["service"])
        datapath = GaugeMetricFamily(
            "lazyd_datapath", "The data path of the service's bytes once warm: 1 for its own.",
            labels=["service", "datapath"])
        state = GaugeMetricFamily(
            "lazyd_service_state", "The service's state: 1 for the current one, 0 for the rest.",
            labels=["service", "state"])

        for name, runner in sorted(self._runners().items()):
            activations.add_metric([name], runner.machine.activations)
            for s in State:
                state.add_metric([name, s.value], 1.0 if runner.state is s else 0.0)
            kernel = runner.kernel_path
            for path in ("userspace", "kernel"):
                datapath.add_metric([name, path], 1.0 if (path == "kernel") == kernel else 0.0)
            if kernel:
                steered.add_metric([name], runner.steering.steered())
            t = runner.traffic()  # the same figures status shows
            if t.connections_waiting is not None:
                held.add_metric([name], t.connections_waiting)
            if t.active is not None:
                active.add_metric([name], t.active)
            if t.bytes_in is not None and t.bytes_out is not None:
                forwarded.add_metric([name, "in"], t.bytes_in)
                forwarded.add_metric([name, "out"], t.bytes_out)
            if t.refused is not None:
                refused.add_metric([name], t.refused)
            if t.datagrams_waiting is not None:
                dgram_queued.add_metric([name], t.datagrams_waiting)
            if t.datagrams_dropped is not None:
                dgram_dropped.add_metric([name], t.datagrams_dropped)
            if t.datagrams_in is not None and t.datagrams_out is not None:
                dgram_forwarded.add_metric([name, "in"], t.datagrams_in)
                dgram_forwarded.add_metric([name, "out"], t.datagrams_out)
        return [activations, state, held, active, dgram_queued, dgram_dropped,
                dgram_forwarded, forwarded, refused, datapath, steered]


# --- the HTTP endpoint ---------------------------------------------------------------


def url(sock: socket.socket) -> str:
    """Where to scrape the bound metrics socket: http://HOST:PORT/metrics."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def bind_metrics(address: Address) -> socket.socket:
    """Bind and listen on the config's `metrics:` address, with the other sockets
    at start-up; BindError says it was the metrics endpoint that failed."""
    try:
        return bind_socket(SocketConfig(name="metrics", listen=address, backlog=64))
    except BindError as exc:
        raise BindError(f"metrics endpoint: {exc}") from None



async def serve_metrics(
    sock: socket.socket,
    metrics: Metrics,
    *,
    timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GET /metrics on the bound, listening `sock` until cancelled.

    trio.serve_listeners keeps accepting through EMFILE and friends (it logs
    and backs off) and lets other errors through.
    """
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    # Open connections, oldest first, each with the scope that ends it.
    connections: OrderedDict[object, trio.CancelScope] = OrderedDict()

    async def handler(stream: trio.SocketStream) -> None:
        me = object()
        with trio.CancelScope() as scope:
            connections[me] = scope
            if len(connections) > MAX_CONNECTIONS:
                _oldest, oldest_scope = connections.popitem(last=False)
                oldest_scope.cancel()
            try:
                await _answer(stream, metrics, timeout)
            finally:
                connections.pop(me, None)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [listener])
        task_status.started()


async def _answer(stream: trio.SocketStream, metrics: Metrics, timeout: float) -> None:
    with trio.move_on_after(timeout):
        try:
            head = await _read_head(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if head is None:
            await _send(stream, _response(431, b"request head too large\n"), timeout)
            return
        if not head:
            return  # the client went away without asking anything
        await _send(stream, _respond(head, metrics), timeout)


def _respond(head: bytes, metrics: Metrics) -> bytes:
    request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(400, b"bad request\n")
    method, target, _version = parts
    if target.split(b"?", 1)[0] != b"/metrics":
        return _response(404, b"lazyd serves /metrics only\n")
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"GET or HEAD\n", extra=b"Allow: GET, HEAD\r\n")
    body = metrics.exposition()
    return _response(200, body, content_type=CONTENT_TYPE_PLAIN_0_0_4.encode(),
                     head_only=method == b"HEAD")


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def _response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra: bytes = b"",
    head_only: bool = False,
) -> bytes:
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n"
        % (status, _REASONS[status], content_type, len(body), extra)
    )
    return head if head_only else head + body


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request up to its blank line; b"" if the client sent nothing at all,
    None past MAX_REQUEST_HEAD."""
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(MAX_REQUEST_HEAD)
        if not chunk:
            return bytes(data) if data else b""
        data += chunk
    return bytes(data)


async def _send(stream: trio.SocketStream, data: bytes, timeout: float) -> None:
    with trio.move_on_after(timeout), contextlib.suppress(
        trio.BrokenResourceError, trio.ClosedResourceError
    ):
        await stream.send_all(data)
