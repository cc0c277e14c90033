"""Each service's HTTP side: `/healthz` (is the loop making progress?) and Prometheus `/metrics`.

The service loop calls `Heartbeat.beat(state)` on every iteration, idle waits included; the
health check fails (503) when no beat came within `max_age_s` (a hung or dead loop), after
the loop reported a fatal error, or while the Redis probe (every 2 s, `opd_redis_up`) gets
no answer. FastAPI + uvicorn run in a daemon thread so the loop
owns the main thread. Metrics live in a per-service `CollectorRegistry` (no globals).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from shared.redis_stats import RedisStats


class Heartbeat:
    """Last-progress timestamp plus a short state string, shared with the HTTP thread."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.state = "starting"
        self.error: str | None = None
        self.redis_error: str | None = None  # set by the Redis probe while Redis is unreachable
        self._last = time.monotonic()

    def beat(self, state: str | None = None) -> None:
        self._last = time.monotonic()
        if state is not None:
            self.state = state

    def fail(self, error: str) -> None:
        self.error, self.state = error, "failed"

    def age(self) -> float:
        return time.monotonic() - self._last

    def healthy(self) -> bool:
        return self.error is None and self.redis_error is None and self.age() < self.max_age_s


ERROR_KINDS = ("invalid_message", "processing_failed", "poison_message", "weights_missing")


class ServiceMetrics:
    """Metrics every service exports, under one naming scheme (`opd_*`, label `service`)."""

    def __init__(self, service: str, replica: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"service": service, "replica": replica}
        r = self.registry
        self.items = Counter("opd_items_total", "Messages completed by this service",
                             list(labels), registry=r).labels(**labels)
        self.tokens = Counter("opd_tokens_total", "Completion tokens processed",
                              list(labels), registry=r).labels(**labels)
        self.errors = Counter("opd_errors_total", "Errors by kind (invalid_message, retry, ...)",
                              [*labels, "kind"], registry=r)
        for kind in ERROR_KINDS:  # exported as 0 before the first one, so panels show 0, not "No data"
            self.errors.labels(**labels, kind=kind)
        self.queue_depth = Gauge("opd_queue_depth", "Backlog of a Redis stream",
                                 [*labels, "stream"], registry=r)
        self.weight_version = Gauge("opd_weight_version", "Weight version held by this process",
                                    list(labels), registry=r).labels(**labels)
        self.busy = Counter("opd_busy_seconds_total", "Seconds spent in the compute stage",
                            list(labels), registry=r).labels(**labels)
        self.overhead = Counter("opd_overhead_seconds_total",
                                "Seconds of pipeline work outside the compute stage, by part "
                                "(codec: encode/decode; weights: save, announce, load; checkpoint)",
                                [*labels, "part"], registry=r)
        self.redis_up = Gauge("opd_redis_up", "1 while this replica's Redis probe gets answers, else 0",
                              list(labels), registry=r).labels(**labels)
        self.progress_age = Gauge("opd_last_progress_age_seconds",
                                  "Seconds since this replica's loop last made progress (its heartbeat)",
                                  list(labels), registry=r).labels(**labels)
        # Redis-side facts (shared/redis_stats.py), read by this replica's Redis probe
        self.redis_memory = Gauge("opd_redis_memory_bytes", "Memory Redis uses (INFO used_memory)",
                                  list(labels), registry=r).labels(**labels)
        self.stream_length = Gauge("opd_stream_length", "Entries in a run stream (XLEN)",
                                   [*labels, "stream"], registry=r)
        self.stream_added = Gauge("opd_stream_entries_added",
                                  "Entries ever added to a run stream (never decreases; rate() of it is the "
                                  "stream's inflow, trimming included)", [*labels, "stream"], registry=r)
        self.batch_seconds = Histogram(
            "opd_batch_seconds", "Wall time of one compute batch", list(labels), registry=r,
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100)).labels(**labels)
        self._labels = labels

    def value(self, sample: str) -> float:
        """Current value of one of this replica's samples (0 if never set)."""
        return self.registry.get_sample_value(sample, self._labels) or 0.0

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the block's wall time to opd_overhead_seconds_total{part}."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.overhead.labels(**self._labels, part=part).inc(time.perf_counter() - started)

    def overhead_s(self) -> dict[str, float]:
        """Seconds per overhead part so far."""
        return {s.labels["part"]: s.value for metric in self.overhead.collect() for s in metric.samples
                if s.name.endswith("_total")}

    def error(self, kind: str) -> None:
        self.errors.labels(**self._labels, kind=kind).inc()

    def watch(self, heartbeat: Heartbeat) -> None:
        """Export the heartbeat's age, read at scrape time."""
        self.progress_age.set_function(heartbeat.age)

    def redis(self, stats: RedisStats) -> None:
        """Record one Redis probe's reading."""
        self.redis_memory.set(stats.used_memory_bytes)
        for stream, st in stats.streams.items():
            self.stream_length.labels(**self._labels, stream=stream).set(st.length)
            self.stream_added.labels(**self._labels, stream=stream).set(st.entries_added)

    def depth(self, stream: str, value: int) -> None:
        self.queue_depth.labels(**self._labels, stream=stream.split(":", 2)[-1]).set(value)  # opd:<run>:NAME


def serve(
    heartbeat: Heartbeat,
    registry: CollectorRegistry,
    *,
    host: str,
    port: int,
    info: Callable[[], dict[str, Any]] = dict,
) -> threading.Thread:
    """Start the FastAPI app in a daemon thread; returns the thread."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title="opd service", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        body = {"ok": heartbeat.healthy(), "state": heartbeat.state,
                "last_progress_age_s": round(heartbeat.age(), 3), "error": heartbeat.error,
                "redis": heartbeat.redis_error or "ok", **info()}
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # ready before the loop starts, so health is queryable at once
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"HTTP server did not start on {host}:{port}")
        time.sleep(0.01)
    return thread
