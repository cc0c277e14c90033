"""Teacher loop: read trajectories (reclaimed first) -> score -> hand off scored trajectories.

Backpressure: waits while the scored stream's backlog is at `max_backlog`. Trajectories
whose token ids fall outside the teacher's vocabulary go to the dead-letter stream.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from services.teacher.settings import TeacherSettings
from shared.admission import Admission
from shared.service import Context, decode_batch
from shared.settings import resolve_device
from shared.streams import StreamConsumer, backlog, wait_for_room
from shared.wire import ScoredTrajectory, Trajectory, WireError, encode

log = logging.getLogger("opd.teacher")


class TeacherWorker:
    def __init__(self, ctx: Context, settings: TeacherSettings) -> None:
        from services.teacher.backend import make_backend

        self.ctx, self.s = ctx, settings
        self.backend = make_backend(settings, resolve_device(settings.device))
        self.vocab_size = self.backend.vocab_size
        self.admission = Admission(ctx.client, ctx.keys)
        self.consumer = StreamConsumer(ctx.client, ctx.keys.trajectories, "teacher",
                                       settings.replica,
                                       reclaim_idle_ms=int(settings.reclaim_idle_s * 1000))

    def info(self) -> dict[str, Any]:
        return {"model": self.s.model}

    def check(self, traj: Trajectory) -> None:
        ids = [traj.prompt.prompt_ids_P, traj.completion_ids_T]
        if traj.mc_ids_TN is not None:
            ids.append(traj.mc_ids_TN.ravel())
        if any(a.size and (a.min() < 0 or a.max() >= self.vocab_size) for a in ids):
            raise WireError(f"token ids outside the teacher vocabulary [0, {self.vocab_size})")

    def run(self, stop: threading.Event) -> None:
        keys, client = self.ctx.keys, self.ctx.client
        while not stop.is_set():
            self.ctx.heartbeat.beat("waiting")
            self.ctx.metrics.depth(keys.trajectories, backlog(client, keys.trajectories))
            self.ctx.metrics.depth(keys.scored, backlog(client, keys.scored))
            need = min(self.s.batch_size, self.s.max_backlog)
            if not wait_for_room(client, keys.scored, self.s.max_backlog, need, stop=stop.is_set,
                                 on_wait=lambda: self.ctx.heartbeat.beat("backpressure")):
                return
            entries = self.consumer.read(self.s.batch_size, block_ms=500)
            trajs, ids, dead = decode_batch(self.ctx, self.consumer, entries, Trajectory, self.check)
            self.admission.release(dead)
            if trajs:
                self._score(trajs, ids)

    def _score(self, trajs: list[Trajectory], ids: list[bytes]) -> None:
        self.ctx.heartbeat.beat("scoring")
        started = time.perf_counter()
        scores = self.backend.score(trajs)
        elapsed = time.perf_counter() - started
        with self.ctx.metrics.timed("codec"):
            payloads = [encode(ScoredTrajectory(t, s)) for t, s in zip(trajs, scores)]
        self.consumer.hand_off(ids, self.ctx.keys.scored, payloads)
        m = self.ctx.metrics
        m.busy.inc(elapsed)
        m.batch_seconds.observe(elapsed)
        m.items.inc(len(trajs))
        m.tokens.inc(sum(t.num_tokens for t in trajs))
        self.ctx.report(self.info)
