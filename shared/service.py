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
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import redis

from shared.monitoring import Heartbeat, ServiceMetrics, serve
from shared.settings import ServiceSettings, resolve_device
from shared.keys import Keys
from shared.redis_stats import read_redis_stats
from shared.streams import DeadLetters, Entry, StreamConsumer
from shared.redis_client import RedisFatal, connect, ping, probe_client, wait_for_redis
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
        self.metrics.watch(self.heartbeat)
        self._report_lock = threading.Lock()  # the loop and the report thread both report

    def consumer(self, stream: str, group: str,
                 on_poison: Callable[[Entry], None] = lambda entry: None) -> StreamConsumer:
        """This replica's consumer of `stream`, with the service's reclaim and dead-letter settings."""
        s = self.settings
        return StreamConsumer(self.client, stream, group, s.replica, reclaim_idle_ms=int(s.reclaim_idle_s * 1000),
                              max_deliveries=s.max_deliveries, dead_stream=self.keys.dead,
                              dead_letters=DeadLetters(s.dead_letter_max_entries, s.dead_letter_max_payload_bytes),
                              on_poison=lambda entry: (self.metrics.error("poison_message"), on_poison(entry)))

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
                      "state": self.heartbeat.state, "healthy": self.heartbeat.healthy(), "at": time.time(), **info()}
            try:
                self.client.hset(self.keys.replicas, self.settings.replica, json.dumps(status))
            except redis.RedisError:
                log.warning("could not report status to Redis")


def _report_loop(ctx: Context, worker: Worker, stop: threading.Event, every_s: float = 2.0) -> None:
    while not stop.wait(every_s):
        ctx.report(worker.info)


def _redis_probe(ctx: Context, stop: threading.Event, every_s: float = 2.0) -> None:
    """Redis reachability in /healthz and opd_redis_up, also while the loop is stuck retrying;
    Redis memory and the run streams' lengths for the dashboard."""
    client = probe_client(ctx.settings.redis_url)
    warned = False
    while not stop.wait(every_s):
        try:
            ping(client)
            ctx.heartbeat.redis_error = None
            ctx.metrics.redis_up.set(1)
        except (redis.RedisError, RedisFatal) as e:
            ctx.heartbeat.redis_error = f"unreachable: {e}"
            ctx.metrics.redis_up.set(0)
            continue
        try:  # dashboard numbers only: a server that refuses INFO must not fail health
            ctx.metrics.redis(read_redis_stats(client, ctx.keys))
        except redis.RedisError as e:
            if not warned:
                log.warning("%s: could not read Redis stats for the dashboard: %s", ctx.name, e)
            warned = True


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
    if settings.gpu_memory_fraction > 0 and resolve_device(settings.device).startswith("cuda"):
        import torch

        torch.cuda.set_per_process_memory_fraction(settings.gpu_memory_fraction, resolve_device(settings.device))
    try:
        wait_for_redis(settings.redis_url, timeout_s=60)
    except RedisFatal as e:  # one clear line, no traceback, no minutes of retries
        raise SystemExit(f"opd-{name}: {e}") from None
    ctx = Context(name, settings)
    ctx.metrics.redis_up.set(1)
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
    threading.Thread(target=_redis_probe, args=(ctx, stop), name="redis-probe", daemon=True).start()
    try:
        worker.run(stop)
    except BaseException as e:
        ctx.heartbeat.fail(repr(e))
        raise
    finally:
        stop.set()
    ctx.report(worker.info)
    log.info("%s %s stopped", name, settings.replica)


@dataclass
class Decoded(Generic[M]):
    """A batch of entries after decoding: the valid messages with their entry ids, and what
    was dead-lettered (`invalid`: the ones that decoded but failed a check, whose admission
    tokens can be released; `dead`: how many in all)."""

    messages: list[M] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    invalid: list[M] = field(default_factory=list)
    dead: int = 0


def exit_process(code: int = 0) -> None:
    """End a service process that stopped cleanly without the interpreter's teardown of native
    extensions: with triton installed (CUDA torch, vLLM images), that teardown segfaulted
    about every second clean exit of the learner (exit -11, which `restart: on-failure`
    treats as a crash). Everything the service owns is stopped and its logs flushed first."""
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def decode_batch(
    ctx: Context,
    consumer: StreamConsumer,
    entries: list[Entry],
    expect: type[M],
    check: Callable[[M], None] = lambda _: None,
) -> Decoded[M]:
    """Decode entries; invalid ones (WireError from decode or `check`) go to the dead-letter
    stream with their reason. The caller gives back what their admission slots are owed."""
    out: Decoded[M] = Decoded()
    for entry in entries:
        msg = None
        try:
            with ctx.metrics.timed("codec"):
                msg = decode(entry.payload, expect)
            check(msg)
        except WireError as e:
            if dead_letter(ctx, consumer, entry, str(e)):
                out.dead += 1
                if msg is not None:
                    out.invalid.append(msg)
            continue
        out.messages.append(msg)
        out.ids.append(entry.id)
    return out


def dead_letter(ctx: Context, consumer: StreamConsumer, entry: Entry, reason: str,
                kind: str = "invalid_message") -> bool:
    """Move one entry to the run's dead-letter stream with its reason; counts it as an error."""
    if not consumer.dead_letter(ctx.keys.dead, entry, reason):
        return False  # reclaimed by another replica meanwhile: theirs to handle
    ctx.metrics.error(kind)
    log.warning("%s: dead-lettered %s from %s: %s", ctx.name, entry.id, consumer.stream, reason)
    return True


T = TypeVar("T")
R = TypeVar("R")


def isolate(items: list[T], process: Callable[[list[T]], list[R]]) -> tuple[list[R | None], list[tuple[int, Exception]]]:
    """process(items) -> one result per item; if it raises, process each item alone so one bad
    message cannot fail its whole batch. Returns the results (None where an item failed) and
    the (index, exception) failures. When every item fails alone too, the failure is not the
    messages' (a broken model, out of memory): the original exception propagates."""
    try:
        return list(process(items)), []
    except Exception as batch_error:
        if len(items) == 1:
            raise
        results: list[R | None] = []
        failures: list[tuple[int, Exception]] = []
        for i, item in enumerate(items):
            try:
                results.append(process([item])[0])
            except Exception as e:  # this one message fails: dead-letter it, keep the rest
                results.append(None)
                failures.append((i, e))
        if len(failures) == len(items):
            raise batch_error
        return results, failures
