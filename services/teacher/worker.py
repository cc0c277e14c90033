"""Teacher loop: read trajectories (reclaimed first) -> score -> hand off scored trajectories.

A pool started with `--teacher-id T` reads only stream `trajectories:T` (the prompts whose
teacher_id is T); without one, `trajectories`. Before the first read it waits for the
learner's tokenizer fingerprint and refuses to start if its own tokenizer differs
(shared/tokenizer_check.py). Backpressure: waits while the scored stream's backlog is at `max_backlog`. Trajectories
whose token ids fall outside the teacher's vocabulary, and those whose scoring fails on
their own, go to the dead-letter stream (releasing their admission tokens). Before each
hand-off the teacher claims its top-k width and draws in the run's record.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from services.teacher.settings import TeacherSettings
from shared.admission import Admission, release_poison, token_of
from shared.run_record import claim
from shared.service import Context, dead_letter, decode_batch, isolate
from shared.settings import resolve_device
from shared.streams import Entry, backlog, wait_for_room
from shared.wire import ScoredTrajectory, Trajectory, WireError, encode

log = logging.getLogger("opd.teacher")


class TeacherWorker:
    def __init__(self, ctx: Context, settings: TeacherSettings) -> None:
        from services.teacher.backend import make_backend

        self.ctx, self.s = ctx, settings
        self.backend = make_backend(settings, resolve_device(settings.device))
        self.vocab_size = self.backend.vocab_size
        self.admission = Admission(ctx.client, ctx.keys)
        self.stream = ctx.keys.trajectories_for(settings.teacher_id)
        self.consumer = ctx.consumer(self.stream, "teacher",
                                     on_poison=release_poison(self.admission, Trajectory))
        self.record = {"top_k": min(settings.top_k, self.vocab_size), "draws": settings.draws}
        self.tokenizer = None  # loaded by check_tokenizer
        self.student_tokenizer: bytes | None = None  # the learner's fingerprint we checked against

    def info(self) -> dict[str, Any]:
        return {"model": self.s.model, "teacher_id": self.s.teacher_id}

    def check(self, traj: Trajectory) -> None:
        ids = [traj.prompt.prompt_ids_P, traj.completion_ids_T]
        if traj.mc_ids_TN is not None:
            ids.append(traj.mc_ids_TN.ravel())
        if any(a.size and (a.min() < 0 or a.max() >= self.vocab_size) for a in ids):
            raise WireError(f"token ids outside the teacher vocabulary [0, {self.vocab_size})")

    def check_tokenizer(self, stop: threading.Event | None = None) -> bool:
        """Wait for the learner's tokenizer fingerprint; TokenizerMismatch if ours differs.
        Again only when the learner's changed since (a --reset with another student)."""
        from shared.models import load_tokenizer, resolve_model
        from shared.tokenizer_check import wait_and_check

        current = self.ctx.client.get(self.ctx.keys.tokenizer)
        if current is not None and current == self.student_tokenizer:
            return True
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(resolve_model(self.s.model))
        ok = wait_and_check(self.ctx.client, self.ctx.keys, self.tokenizer,
                            f"opd-teacher {self.s.replica} ({self.s.model})",
                            stop=stop.is_set if stop else lambda: False,
                            on_wait=lambda: self.ctx.heartbeat.beat("waiting-for-learner"))
        self.student_tokenizer = self.ctx.client.get(self.ctx.keys.tokenizer) if ok else None
        return ok

    def run(self, stop: threading.Event) -> None:
        keys, client = self.ctx.keys, self.ctx.client
        if self.check_tokenizer(stop):
            claim(client, keys, self.record)  # refuse to start against a run that disagrees
        else:
            stop.set()  # asked to stop while waiting for the learner
        while not stop.is_set():
            self.ctx.heartbeat.beat("waiting")
            self.ctx.metrics.depth(self.stream, backlog(client, self.stream))
            self.ctx.metrics.depth(keys.scored, backlog(client, keys.scored))
            need = min(self.s.batch_size, self.s.max_backlog)
            if not wait_for_room(client, keys.scored, self.s.max_backlog, need, stop=stop.is_set,
                                 on_wait=lambda: self.ctx.heartbeat.beat("backpressure")):
                break
            entries = self.consumer.read(self.s.batch_size, block_ms=500)
            d = decode_batch(self.ctx, self.consumer, entries, Trajectory, self.check)
            self.admission.release_tokens([token_of(t) for t in d.invalid])
            if d.messages:
                with self.consumer.lease(d.ids, alive=self.ctx.heartbeat.healthy):  # a slow batch keeps them
                    self._score(d.messages, d.ids, {e.id: e.payload for e in entries})
        self.consumer.close()
        getattr(self.backend, "close", lambda: None)()  # a vLLM engine's processes stop with us

    def _score(self, trajs: list[Trajectory], ids: list[bytes], payload: dict[bytes, bytes]) -> None:
        self.ctx.heartbeat.beat("scoring")
        self.check_tokenizer()  # again after a learner --reset (with another student?)
        claim(self.ctx.client, self.ctx.keys, self.record)  # again after a learner --reset
        started = time.perf_counter()
        scores, failures = isolate(trajs, self.backend.score)
        elapsed = time.perf_counter() - started
        for i, error in failures:
            if dead_letter(self.ctx, self.consumer, Entry(ids[i], payload[ids[i]]),
                           f"scoring failed: {error!r}", kind="processing_failed"):
                self.admission.release_tokens([token_of(trajs[i])])
        done = [(i, ScoredTrajectory(t, s)) for i, t, s in zip(ids, trajs, scores) if s is not None]
        with self.ctx.metrics.timed("codec"):
            payloads = [encode(m) for _, m in done]
        self.consumer.hand_off([i for i, _ in done], self.ctx.keys.scored, payloads)
        m = self.ctx.metrics
        m.busy.inc(elapsed)
        m.batch_seconds.observe(elapsed)
        m.items.inc(len(done))
        m.tokens.inc(sum(msg.trajectory.num_tokens for _, msg in done))
        self.ctx.report(self.info)
