"""Prometheus metrics and the small HTTP server for /metrics, /healthz and /readyz.

Each daemon has its own registry (tests run several in one process). The server is a few
lines on asyncio streams rather than prometheus-client's thread server, because it must
also answer the health probes from the daemon's own state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import numpy as np
import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .codec import REASONS

log = logging.getLogger("rnnd.http")

#: The ``op`` label values of ``rnnd_kafka_errors_total``: where a Kafka error was seen.
KAFKA_OPS = ("connect", "fetch", "produce", "checkpoint", "commit", "broker_check")
#: The ``reason`` label values of ``rnnd_evictions_total``.
EVICTION_REASONS = ("ttl", "lru")

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def process_collectors(registry: CollectorRegistry) -> None:
    """Memory, CPU, open files (process_*) and the Python version (python_info), as every Prometheus
    client exposes them, but in the daemon's own registry (tests run several in one process)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def combine(parts: Iterable[tuple[str, Iterable[Metric]]], label: str,
            unlabelled: Iterable[Metric] = ()) -> bytes:
    """Several expositions as one: each part's samples labelled ``label="<its name>"``, HELP/TYPE once per
    family (``--workers``' worker label, the routes' route label); ``unlabelled`` families as they are."""
    families: dict[str, Metric] = {}
    for fam in unlabelled:
        families[fam.name] = fam
    for name, fams in parts:
        for fam in fams:
            into = families.get(fam.name)
            if into is None:
                into = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            into.samples += [s._replace(labels={**s.labels, label: name}) for s in fam.samples]

    class Combined:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Combined())  # a collector is anything with collect()
    return generate_latest(registry)


class Metrics:
    """The daemon's metrics. Every known label value has its series from the start, at 0: a panel
    or an alert on ``rate(...)`` then shows 0 rather than "No data" until the first event."""

    def __init__(self, process: bool = True) -> None:
        r = self.registry = CollectorRegistry()
        if process:  # not for a route: its process's are exposed once, beside every route's (service/routes.py)
            process_collectors(r)
        self.messages = Counter("rnnd_messages_consumed", "Input records consumed.", ["topic"], registry=r)
        self.predictions = Counter("rnnd_predictions", "Predictions produced to the output topic.", registry=r)
        self.dead_letters = Counter("rnnd_dead_letters", "Input records sent to the dead-letter topic.",
                                    ["reason"], registry=r)
        self.steps = Counter("rnnd_steps", "Model steps applied (one per stream per input step).", registry=r)
        self.batch_size = Histogram("rnnd_batch_size", "Streams advanced per model call.", registry=r,
                                    buckets=_SIZE_BUCKETS)
        self.chunk_steps = Histogram("rnnd_chunk_steps", "Steps per stream per model call (T).", registry=r,
                                     buckets=_SIZE_BUCKETS[:8])
        self.inference_seconds = Histogram("rnnd_inference_seconds", "Time in one ONNX Runtime call.",
                                           registry=r, buckets=_TIME_BUCKETS)
        self.latency = BulkHistogram("rnnd_end_to_end_latency_seconds",
                                     "Input record timestamp to prediction handed to the producer.", registry=r,
                                     buckets=_TIME_BUCKETS)
        self.active_streams = Gauge("rnnd_active_streams", "Streams with state in memory.", registry=r)
        self.state_bytes = Gauge("rnnd_state_bytes", "Bytes of model state held for active streams.", registry=r)
        self.evictions = Counter("rnnd_evictions", "Streams evicted from memory.", ["reason"], registry=r)
        self.stream_ends = Counter("rnnd_stream_ends", "Streams ended by an `end` control.", registry=r)
        self.lag = Gauge("rnnd_consumer_lag", "Records of the partition not yet processed: high watermark minus the "
                         "next offset to commit (fetched-but-waiting records included).", ["partition"], registry=r)
        self.inflight = Gauge("rnnd_inflight_steps", "Steps fetched and decoded, waiting for the model (not yet "
                              "applied).", registry=r)
        self.nonfinite = Counter("rnnd_nonfinite_predictions", "Predictions whose model output was NaN or infinite "
                                 "(written with \"nonfinite\": true and nulls).", registry=r)
        self.paused = Gauge("rnnd_fetch_paused", "1 while fetching is paused for backpressure.", registry=r)
        self.commits = Counter("rnnd_commits", "Input offset commits.", registry=r)
        self.transactions = Counter("rnnd_transactions", "Kafka transactions ended (processing_guarantee="
                                    "exactly_once), one per input partition per checkpoint.", ["outcome"], registry=r)
        self.transaction_seconds = Histogram("rnnd_transaction_commit_seconds", "Time from a checkpoint's snapshot "
                                             "to its transactions' commit (model calls wait for it).", registry=r,
                                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.kafka_errors = Counter("rnnd_kafka_errors", "Kafka errors seen (retried).", ["op"], registry=r)
        self.restore_seconds = Histogram("rnnd_restore_seconds", "Time to restore one partition's streams from the "
                                         "changelog.", registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                                                            30, 60, 120, 300))
        self.restore_records = Counter("rnnd_restore_records", "Changelog records read while restoring.", registry=r)
        self.restored_streams = Counter("rnnd_restored_streams", "Streams restored from the changelog.", registry=r)
        self.changelog_records = Counter("rnnd_changelog_records", "State records written to the changelog "
                                         "(tombstones included).", registry=r)
        self.ready = Gauge("rnnd_ready", "1 when the daemon is ready (what /readyz answers): connected, in the group, "
                           "a broker answered within broker_unreachable_s.", registry=r)
        self.assigned = Gauge("rnnd_assigned_partitions", "Input partitions assigned to this replica.", registry=r)
        self.model_info = Gauge("rnnd_model_info", "The served model (value 1; after a hot reload, the new one's "
                                "series alone).",
                                ["model", "version", "provider", "requested_provider", "fallback", "state_hash"],
                                registry=r)
        self.reloads = Counter("rnnd_model_reloads", "Hot reloads by result: swapped (a new bundle serves), unchanged "
                               "(the bundle serving), refused (it failed a check; the serving one stays).",
                               ["result"], registry=r)
        self.gc_pause = BulkHistogram("rnnd_gc_pause_seconds", "Python garbage-collection pauses (every generation): "
                                      "they stop the event loop, so they show in latency (see gc_threshold).",
                                      registry=r, buckets=_TIME_BUCKETS)
        self.loop_lag = BulkHistogram("rnnd_event_loop_lag_seconds", "How late the event loop woke a timer: how long "
                                      "one piece of work (intake, encoding, a GC pause) held it, during which "
                                      "fetches, outputs and /metrics waited.", registry=r, buckets=_TIME_BUCKETS)
        self.loop_lag_max = Gauge("rnnd_event_loop_lag_max_seconds", "The largest event-loop lag since start.",
                                  registry=r)
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)
        for reason in REASONS:
            self.dead_letters.labels(reason)
        for op in KAFKA_OPS:
            self.kafka_errors.labels(op)
        self._gc_started = 0.0

    def watch_gc(self) -> None:
        """Time Python's collections from now on (until ``unwatch_gc``)."""
        if self._gc_callback not in gc.callbacks:
            gc.callbacks.append(self._gc_callback)

    def unwatch_gc(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._gc_callback)

    def _gc_callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.gc_pause.observe(time.perf_counter() - self._gc_started)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class BulkHistogram:
    """A Prometheus histogram observed a whole array at a time (one call per batch of outputs).

    prometheus-client's ``Histogram.observe`` takes a lock and walks the buckets for every
    value: about a microsecond, which per output is more than the model's share of a step.
    Counts are kept in numpy and turned into the standard ``_bucket``/``_sum``/``_count``
    series when scraped. Not thread-safe: observed and scraped on the event loop only.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every bound (+Inf)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many(np.asarray([value], dtype=np.float64))

    def observe_many(self, values: np.ndarray) -> None:
        # bucket i counts values <= bounds[i] (Prometheus' `le`): the first bound not below the value
        self.counts += np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.counts))
        self.sum += float(values.sum())

    def collect(self) -> list[HistogramMetricFamily]:
        cumulative = np.cumsum(self.counts).tolist()
        labels = [floatToGoString(b) for b in self.bounds.tolist()] + ["+Inf"]
        return [HistogramMetricFamily(self.name, self.documentation, buckets=list(zip(labels, cumulative, strict=True)),
                                      sum_value=self.sum)]

    def describe(self) -> list[HistogramMetricFamily]:
        return self.collect()


#: What an endpoint answers for a path: (status, body, content type).
Answer = tuple[int, bytes, str]
NOT_FOUND: Answer = (404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")


_REASONS = {200: "OK", 202: "Accepted", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            422: "Unprocessable Content", 503: "Service Unavailable"}


class HttpEndpoint:
    """A few GET paths on asyncio streams, one request per connection; :meth:`answer` says what each
    path returns. Shared by the daemon (:class:`HttpServer`) and ``rnnd serve --workers``' supervisor."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def answer(self, path: str, method: str = "GET") -> Answer:
        return NOT_FOUND

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            status, body, ctype = await self.answer(parts[1].split("?")[0] if len(parts) >= 2 else "",
                                                    parts[0] if parts else "")
            reason = _REASONS[status]
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


async def start_endpoints(endpoints: Sequence[tuple[HttpEndpoint | None, str, str]]) -> bool:
    """Start each (endpoint or None, what it serves, the settings that place it); False, with one error line
    naming the settings to change, if a port cannot be bound: those already started are stopped again."""
    started: list[HttpEndpoint] = []
    for endpoint, what, settings in endpoints:
        if endpoint is None:
            continue
        try:
            await endpoint.start()
        except OSError as e:
            log.error("cannot serve %s on %s:%d (%s): choose another %s", what, endpoint.host, endpoint.port,
                      e.strerror or e, settings)
            for other in started:
                await other.stop()
            return False
        started.append(endpoint)
    return True


class Endpoint(HttpEndpoint):
    """An endpoint whose answers come from a callable: the supervisor's and the router's, which answer
    for their workers and routes."""

    def __init__(self, host: str, port: int, answer: Callable[[str, str], Awaitable[Answer]]) -> None:
        super().__init__(host, port)
        self._answer = answer

    async def answer(self, path: str, method: str = "GET") -> Answer:
        return await self._answer(path, method)


def misdirected(path: str, method: str, named: bool = False) -> Answer | None:
    """The answer to what is not ``POST /admin/reload`` (``named``: or ``/admin/reload/NAME``); None for it."""
    if not (path == "/admin/reload" or (named and path.startswith("/admin/reload/"))):
        return 404, f"not found: POST /admin/reload{' or /admin/reload/NAME' if named else ''}\n".encode(), "text/plain"
    if method != "POST":
        return 405, b"POST /admin/reload (it changes what the daemon serves)\n", "text/plain"
    return None


def combined_answer(key: str, docs: list[dict]) -> Answer:
    """Several reloads' answers as one (``--workers``, routes): each listed under ``key``, the result theirs
    if they agree (else "mixed"), the status the worst one's."""
    results = {d.get("result") for d in docs}
    body = {"result": results.pop() if len(results) == 1 else "mixed", key: docs}
    return max((d["status"] for d in docs), default=503), orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE), \
        "application/json"


class HttpServer(HttpEndpoint):
    """GET /metrics, /healthz (the process serves requests) and /readyz (Kafka connected, assigned)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool], host: str, port: int) -> None:
        super().__init__(host, port)
        self.metrics = metrics
        self.ready = ready

    async def answer(self, path: str, method: str = "GET") -> Answer:
        if path == "/metrics":
            return 200, self.metrics.exposition(), CONTENT_TYPE_LATEST
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            return (200, b"ready\n", "text/plain") if self.ready() else (503, b"not ready\n", "text/plain")
        return NOT_FOUND
