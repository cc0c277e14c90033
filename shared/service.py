"""The process skeleton every service shares: logging, Redis connection, HTTP, signals, loop.

`run_service` connects to Redis, starts /healthz + /metrics, installs SIGTERM/SIGINT handlers
that ask the loop to stop after the current batch, runs the worker's loop on the main
thread, and marks health failed if the loop dies (the error still propagates).
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import redis

from shared.monitoring import Heartbeat, ServiceMetrics, serve
from shared.settings import ServiceSettings
from shared.streams import Entry, Keys, StreamConsumer, connect, wait_for_redis
from shared.wire import Message, WireError, decode

log = logging.getLogger("opd")
M = TypeVar("M", bound=Message)


class Worker(Protocol):
    def run(self, stop: threading.Event) -> None: ...
    def info(self) -> dict[str, Any]: ...


class Context:
    """What a worker gets from the service skeleton."""

    def __init__(self, name: str, settings: ServiceSettings) -> None:
        self.name, self.settings = name, settings
        self.keys = Keys(settings.run)
        self.client: redis.Redis = connect(settings.redis_url)
        self.metrics = ServiceMetrics(name, settings.replica)
        self.heartbeat = Heartbeat(settings.health_max_age_s)
        self._report_lock = threading.Lock()  # the loop and the report thread both report

    def report(self, info: Callable[[], dict[str, Any]]) -> None:
        """Write this replica's counters and `info()` to the run's `replicas` hash (read by demo
        and bench): after each batch and every 2 s. Snapshot and write happen under one lock,
        so an older snapshot never lands over a newer one. Best effort: the service's own
        Redis calls surface Redis trouble."""
        m = self.metrics
        with self._report_lock:
            status = {"service": self.name, "busy_s": m.value("opd_busy_seconds_total"),
                      "items": m.value("opd_items_total"), "tokens": m.value("opd_tokens_total"),
                      "overhead_s": m.overhead_s(),
                      "state": self.heartbeat.state, "at": time.time(), **info()}
            try:
                self.client.hset(self.keys.replicas, self.settings.replica, json.dumps(status))
            except redis.RedisError:
                log.warning("could not report status to Redis")


def _report_loop(ctx: Context, worker: Worker, stop: threading.Event, every_s: float = 2.0) -> None:
    while not stop.wait(every_s):
        ctx.report(worker.info)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-load progress bars in service logs
    hf_logging.set_verbosity_warning()


def run_service(name: str, settings: ServiceSettings, build: Callable[[Context], Worker]) -> None:
    """Run one service process until its loop ends or a signal asks it to stop."""
    setup_logging()
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    ctx = Context(name, settings)
    wait_for_redis(ctx.client, timeout_s=60)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = build(ctx)
    # the model, torch and transformers are built: keep the collector off their ~10^5-10^6
    # objects, or every full collection walks them (~20% of the codec's time otherwise)
    gc.collect()
    gc.freeze()
    serve(ctx.heartbeat, ctx.metrics.registry, host=settings.http_host,
          port=settings.http_port, info=worker.info)
    log.info("%s %s started (run=%s, redis=%s)", name, settings.replica, settings.run,
             settings.redis_url.split("@")[-1])
    threading.Thread(target=_report_loop, args=(ctx, worker, stop), name="report", daemon=True).start()
    try:
        worker.run(stop)
    except BaseException as e:
        ctx.heartbeat.fail(repr(e))
        raise
    finally:
        stop.set()
    ctx.report(worker.info)
    log.info("%s %s stopped", name, settings.replica)


def decode_batch(
    ctx: Context,
    consumer: StreamConsumer,
    entries: list[Entry],
    expect: type[M],
    check: Callable[[M], None] = lambda _: None,
) -> tuple[list[M], list[bytes], int]:
    """Decode entries; invalid ones (WireError from decode or `check`) go to the dead-letter
    stream with their reason. Returns (messages, their entry ids, number dead-lettered by
    us). Each dead-lettered trajectory gives back one admission slot (shared/admission.py):
    it may have been admitted, and a leaked slot could stall a synchronous run for good."""
    msgs: list[M] = []
    ids: list[bytes] = []
    dead = 0
    for entry in entries:
        try:
            with ctx.metrics.timed("codec"):
                msg = decode(entry.payload, expect)
            check(msg)
        except WireError as e:
            if consumer.dead_letter(ctx.keys.dead, entry, str(e)):
                dead += 1
                ctx.metrics.error("invalid_message")
                log.warning("%s: dead-lettered %s from %s: %s", ctx.name, entry.id, consumer.stream, e)
            continue
        msgs.append(msg)
        ids.append(entry.id)
    return msgs, ids, dead
