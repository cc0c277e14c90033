"""Rollout loop: admission -> read prompts -> refresh weights -> sample -> hand off trajectories.

Per batch: prompts reclaimed from a dead replica are redone first (they were admitted
already); otherwise the replica asks admission control for up to `batch_size` new ones, so
no work is started that would exceed the learner's staleness bound. Prompts are validated
(ids inside the student's vocabulary) and each valid one holds an admission token. Before
sampling it loads the newest announced weight version if it is newer than its own. A
prompt whose generation fails on its own is dead-lettered with the error; the rest of the
batch goes on. Trajectories are written and the prompts acked in one server-side script,
each to its prompt's teacher's stream (`trajectories:<teacher_id>`, shared/teacher_pools.py);
backpressure waits on the streams of every teacher pool that is not down.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from services.rollout.settings import RolloutSettings
from shared.admission import Admission
from shared.run_record import claim
from shared.service import Context, dead_letter, decode_batch, isolate
from shared.settings import resolve_device
from shared.streams import Entry, backlog, wait_for_room
from shared.teacher_pools import open_streams
from shared.teacher_pools import read as read_pools
from shared.weights import latest, wait_for_new_version, weight_lag
from shared.wire import Prompt, Trajectory, WireError, decode, encode

log = logging.getLogger("opd.rollout")


def weight_lag_histogram(registry: CollectorRegistry, replica: str) -> Any:
    """opd_weight_lag_seconds of this replica: learner step end to generating with its weights."""
    return Histogram("opd_weight_lag_seconds", "Learner step end (before saving) to generating with its weights",
                     ["service", "replica"], registry=registry,
                     buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30)).labels("rollout", replica)


def spread_device(ctx: Context, device: str) -> str:
    """`cuda` with several visible GPUs: the next one in replica start order (round robin over
    the run's rollouts), so `--scale rollout=N` on a container given several GPUs spreads them."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    if count <= 1:
        return device
    index = (int(ctx.client.incr(ctx.keys.rollout_seq)) - 1) % count
    log.info("rollout on GPU %d of %d visible", index, count)
    return f"cuda:{index}"


class RolloutWorker:
    def __init__(self, ctx: Context, settings: RolloutSettings) -> None:
        from services.rollout.backend import make_backend

        self.ctx, self.s = ctx, settings
        seed = settings.seed + zlib.crc32(settings.replica.encode())
        self.device = spread_device(ctx, resolve_device(settings.device))
        self.backend = make_backend(settings, self.device, seed)
        self.version, self.epoch = -1, 0  # of the weights held (the learner's epoch and version)
        self.published_at = 0.0  # of the announcement whose weights we hold
        self.cursor: bytes | str = "0-0"  # position in the versions stream (wake-ups)
        self.admission = Admission(ctx.client, ctx.keys)
        # a poison prompt was admitted under its dead reader's grant: give that slot back
        self.consumer = ctx.consumer(ctx.keys.prompts, "rollout", on_poison=self._release_poison)
        self.weight_lag = weight_lag_histogram(ctx.metrics.registry, settings.replica)
        self.lag_n, self.lag_sum, self.lag_max = 0, 0.0, 0.0  # broadcasts after the first load

    def info(self) -> dict[str, Any]:
        return {"weight_version": self.version, "device": self.device, "weight_loads": self.lag_n,
                "weight_lag_mean_s": self.lag_sum / self.lag_n if self.lag_n else None,
                "weight_lag_max_s": self.lag_max if self.lag_n else None}

    def run(self, stop: threading.Event) -> None:
        while self.version < 0 and not stop.is_set():  # never sample before the learner's v0
            self.ctx.heartbeat.beat("waiting-for-weights")
            self.refresh_weights()
            stop.wait(0.1)
        while not stop.is_set():
            self.ctx.heartbeat.beat("waiting")
            entries = self._next_batch(stop)
            if entries:
                with self.consumer.lease([e.id for e in entries], alive=self.ctx.heartbeat.healthy):
                    self._process(entries)
        self.consumer.close()
        getattr(self.backend, "close", lambda: None)()  # a vLLM engine's processes stop with us

    def _next_batch(self, stop: threading.Event) -> list[Entry]:
        """Reclaimed prompts first; else newly admitted ones (admission released if unused)."""
        entries = self.consumer.reclaim(self.s.batch_size)
        if entries:
            return entries
        client, keys = self.ctx.client, self.ctx.keys
        room = wait_for_room(client, lambda: open_streams(keys, read_pools(client, keys)), self.s.max_backlog,
                             min(self.s.batch_size, self.s.max_backlog),
                             stop=stop.is_set, on_wait=lambda: self.ctx.heartbeat.beat("backpressure"))
        for stream in [keys.trajectories_for(t) for t in read_pools(client, keys)] or [keys.trajectories]:
            self.ctx.metrics.depth(stream, backlog(client, stream))
        if not room:
            return []
        granted, _ = self.admission.request(self.s.batch_size)
        if granted == 0:  # at the staleness bound: sleep until the learner publishes
            self.ctx.heartbeat.beat("staleness-bound")
            self.cursor = wait_for_new_version(self.ctx.client, self.ctx.keys, self.cursor, timeout_s=0.5)
            return []
        entries: list[Entry] = []
        try:
            entries = self.consumer.read_new(granted, block_ms=500)
        finally:  # the unused part of the grant, also when the read fails
            self.admission.release(granted - len(entries))
        return entries

    def _release_poison(self, entry: Entry) -> None:
        self.admission.release(1)
        try:  # and its token, if a reader held one
            self.admission.consume([decode(entry.payload, Prompt).prompt_id])
        except WireError:
            pass

    def check(self, prompt: Prompt) -> None:
        ids = prompt.prompt_ids_P
        if ids.min() < 0 or ids.max() >= self.backend.vocab_size:
            raise WireError(f"prompt ids outside the student vocabulary [0, {self.backend.vocab_size})")

    def _process(self, entries: list[Entry]) -> None:
        d = decode_batch(self.ctx, self.consumer, entries, Prompt, self.check)
        self.admission.release(d.dead)  # dead prompts were admitted under this grant (or a dead reader's)
        if not d.messages:
            return
        self.admission.hold([p.prompt_id for p in d.messages])
        claim(self.ctx.client, self.ctx.keys, {"mc_samples": self.s.mc_samples})
        self.refresh_weights()
        self.ctx.heartbeat.beat("generating")
        trajectories, failures = self._generate(d.messages)
        payload = {e.id: e.payload for e in entries}
        for i, error in failures:
            if dead_letter(self.ctx, self.consumer, Entry(d.ids[i], payload[d.ids[i]]),
                           f"generation failed: {error!r}", kind="processing_failed"):
                self.admission.release_tokens([d.messages[i].prompt_id])
        done = [(i, t) for i, t in zip(d.ids, trajectories) if t is not None]
        for teacher_id in sorted({t.prompt.teacher_id for _, t in done}):  # each to its teacher's stream
            mine = [(i, t) for i, t in done if t.prompt.teacher_id == teacher_id]
            with self.ctx.metrics.timed("codec"):
                payloads = [encode(t) for _, t in mine]
            self.consumer.hand_off([i for i, _ in mine], self.ctx.keys.trajectories_for(teacher_id), payloads)
        m = self.ctx.metrics
        m.items.inc(len(done))
        m.tokens.inc(sum(t.num_tokens for _, t in done))
        self.ctx.report(self.info)

    def _generate(self, prompts: list[Prompt]) -> tuple[list[Trajectory | None], list[tuple[int, Exception]]]:
        """Trajectories in prompt order (None where a prompt failed alone) and the failures."""
        import numpy as np

        started = time.time()
        samples, failures = isolate(prompts, lambda ps: self.backend.generate([p.prompt_ids_P for p in ps]))
        finished = time.time()
        self.ctx.metrics.busy.inc(finished - started)
        self.ctx.metrics.batch_seconds.observe(finished - started)
        return [
            None if s is None else Trajectory(
                traj_id=uuid.uuid4().hex, prompt=p, completion_ids_T=s.completion_ids_T,
                behaviour_logprobs_T=s.behaviour_logprobs_T,
                token_versions_T=s.token_versions_T if s.token_versions_T is not None
                else np.full(len(s.completion_ids_T), self.version, np.int32),
                mc_ids_TN=s.mc_ids_TN, mc_logprobs_TN=s.mc_logprobs_TN,
                finish_reason=s.finish_reason, replica=self.s.replica,
                started_at=started, finished_at=finished, weight_epoch=self.epoch,
            )
            for p, s in zip(prompts, samples)
        ], failures

    def _record_lag(self, lag: float) -> None:
        self.weight_lag.observe(lag)
        self.lag_n, self.lag_sum, self.lag_max = self.lag_n + 1, self.lag_sum + lag, max(self.lag_max, lag)

    def refresh_weights(self) -> None:
        """Load the newest announced version if newer than ours (retry if it was pruned)."""
        for _ in range(10):
            ann = latest(self.ctx.client, self.ctx.keys)
            # any new announcement counts, also an older version: a learner that resumed
            # from its last checkpoint rolls the weights back
            if ann is None or ann.published_at == self.published_at:
                return
            try:
                with self.ctx.metrics.timed("weights"):
                    self.backend.load_weights(ann.path)
            except FileNotFoundError:
                time.sleep(0.05)  # pruned while we looked: a newer pointer exists
                continue
            except Exception as e:  # a load cut short by pruning surfaces as other errors too (vLLM, NFS)
                newer = latest(self.ctx.client, self.ctx.keys)
                if newer is None or newer.published_at == ann.published_at:
                    raise  # nothing newer replaced it: a real load failure
                log.warning("loading version %d failed (%r); a newer one was announced meanwhile",
                            ann.weight_version, e)
                continue
            if self.version >= 0:  # a broadcast, not this replica's start-up load
                self._record_lag(weight_lag(self.ctx.client, ann))
            self.version, self.epoch, self.published_at = ann.weight_version, ann.epoch, ann.published_at
            self.ctx.metrics.weight_version.set(self.version)
            log.info("loaded weight version %d", self.version)
            return
        self.ctx.metrics.error("weights_missing")
        log.warning("announced weights kept disappearing; generating with version %d", self.version)
