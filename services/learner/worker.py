"""Learner loop: collect B fresh-enough scored trajectories -> AdamW step -> publish version.

Start: resume from the newest checkpoint; or, for a run with no state in Redis, write the
admission limits, publish version 0 and checkpoint it at once (so a restart never finds a
run without a checkpoint); a run with state but no checkpoint is refused unless `--reset`
(which deletes the run's keys and checkpoints). Then start the prompt feeder. Each step:
read scored trajectories (reclaimed first), dead-letter invalid ones (ids outside the
student's vocabulary, widths that disagree with the run's record), drop and count those
over the staleness bound (releasing their admission tokens), train on B, publish the new
version. A message whose loss fails on its own is dead-lettered and the step retried
without it. Trained entries are acked (and their tokens consumed) only when a checkpoint
(every checkpoint_every steps) covers them, so a restarted learner resumes from the
checkpoint and retrains what it lost. End: save the final student and summary.

Under torchrun this runs on rank 0 only, which owns every Redis read and write; the
student it trains spans all ranks (services/learner/student.py), and a step that fails
there ends the learner instead of being retried without a message.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from typing import Any

from services.learner import checkpoint
from services.learner.data import LearnerData
from services.learner.held_out import HeldOut
from services.learner.distributed import Ranks
from services.learner.metrics import LearnerMetrics, add_counts, step_counts
from services.learner.samples import SampleLog
from services.learner.settings import LearnerSettings
from services.learner.staleness import Lineage, StalenessTracker
from shared.admission import Admission, release_poison, set_limits, token_of
from shared.run_record import read as read_record
from shared.service import Context, dead_letter, decode_batch, isolate
from shared.streams import Entry, StreamConsumer, backlog
from shared.weights import announce, prune_versions, save_version
from shared.wire import ScoredTrajectory, WireError

log = logging.getLogger("opd.learner")


class RunStateError(SystemExit):
    """The run has state this learner would destroy or misread: exit with one line saying what to do."""


class LearnerWorker:
    def __init__(self, ctx: Context, settings: LearnerSettings, ranks: Ranks | None = None) -> None:
        from services.learner.student import Student

        self.ctx, self.s = ctx, settings
        self.data = LearnerData.load(settings)  # before the (slow) model load: a bad row fails at once
        self.verifier = self.data.verifier
        self.held_out = HeldOut(settings, self.data.eval_set, self.verifier)
        self.student = Student(settings, ranks or Ranks.start(settings.device, settings.dist_timeout_s))
        self.tokenizer, self.vocab_size = self.student.tokenizer, self.student.vocab_size
        if settings.chat_template:  # saved with the final student, so its tokenizer keeps it
            self.tokenizer.chat_template = settings.chat_template
        self.samples = SampleLog(ctx.client, ctx.keys.samples, self.tokenizer, self.verifier,
                                 settings.samples_every, settings.samples_per_step, settings.samples_max_entries)
        self.version = 0
        self.tracker = StalenessTracker(settings.max_staleness)
        self.lineage = Lineage()  # epochs: every restore from a checkpoint starts one
        self.lm = LearnerMetrics(ctx)
        self.admission = Admission(ctx.client, ctx.keys)
        self.stats: dict[str, Any] = {"trained_tokens": 0, "dead_letters": 0, "correct": 0, "duplicates": 0,
                                      "abandoned": 0}
        self.snapshots: dict[str, str] = {}  # replicas' reports at the first and last step (bench)
        self.consumer: StreamConsumer | None = None
        self.record: dict[str, int] = {}  # the run's invariants (shared/run_record.py), see check()
        self.payloads: dict[bytes, bytes] = {}  # raw entries of the batch being collected
        self.consumed: dict[str, int] = {}  # trajectory id -> version it was trained at (exactly-once)
        self.unacked: list[bytes] = []  # trained entries not yet covered by a checkpoint
        self.unacked_tokens: list[str] = []  # and their admission tokens
        self.checkpoint_dir = settings.checkpoint_dir or f"runs/{settings.run}/checkpoints"
        self.resumed: dict[str, Any] = {}  # the checkpoint state this learner started from

    def info(self) -> dict[str, Any]:
        return {"weight_version": self.version, "step": self.version}

    def check(self, msg: ScoredTrajectory) -> None:
        """What decoding cannot know: ids fit the student, widths fit the run and the losses."""
        t, sc = msg.trajectory, msg.scores
        for name, ids in (("prompt", t.prompt.prompt_ids_P), ("completion", t.completion_ids_T),
                          ("top-k", sc.topk_ids_TK), ("draw", sc.draw_ids_TN), ("MC", t.mc_ids_TN)):
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise WireError(f"{name} ids outside the student vocabulary [0, {self.vocab_size})")
        widths = {"top_k": sc.topk_ids_TK.shape[1], "draws": 0 if sc.draw_ids_TN is None else sc.draw_ids_TN.shape[1],
                  "mc_samples": 1 if t.mc_ids_TN is None else t.mc_ids_TN.shape[1]}
        if not widths.keys() <= self.record.keys():  # complete once a teacher and a rollout claimed
            self.record = read_record(self.ctx.client, self.ctx.keys)
        for name, width in widths.items():
            if name not in self.record:
                raise WireError(f"the run's record has no {name}: no replica that produces it has registered")
            if width != self.record[name]:
                raise WireError(f"{name} {width}, but this run's record says {self.record[name]}")
        losses = self.s.losses
        if "rkl_mc" in losses and t.mc_ids_TN is None or "fkl_teacher_sampled" in losses and sc.draw_ids_TN is None:
            raise WireError("the configured losses need MC samples / teacher draws this message lacks")

    def run(self, stop: threading.Event) -> None:
        self.started_at = time.time()
        feeder = self._start()
        if self.s.eval_every and not self.stats.get("eval_curve"):
            self._evaluate()  # the curve starts at the initial student
        batch: list[ScoredTrajectory] = []
        ids: list[bytes] = []
        try:
            while not stop.is_set() and not self._done():
                self.ctx.heartbeat.beat("collecting")
                feeder.check()
                self.student.keepalive()
                self._collect(batch, ids)
                if len(batch) >= self.s.batch_size:
                    batch, ids = self._train(batch, ids)
        finally:
            feeder.close()
            self.pools.close()
        self._finish(completed=self._done())
        self.student.close()  # the other ranks (if any) exit: nothing left that takes them all
        if self._done() and self.s.idle_when_done:
            log.info("max_steps reached: idle (and healthy) until stopped")
            while not stop.wait(1.0):
                self.ctx.heartbeat.beat("finished")
        self.consumer.close()

    def _done(self) -> bool:
        return self.s.max_steps > 0 and self.version >= self.s.max_steps

    def _start(self):
        from shared.tokenizer_check import publish as publish_tokenizer

        ctx, keys = self.ctx, self.ctx.keys
        self.data.check_tokenisable(self.tokenizer, self.s.chat_template_kwargs)  # before anything is deleted
        if self.s.reset:  # explicit: the run's streams, counts and checkpoints go
            self._reset()
        ckpt = checkpoint.latest(self.checkpoint_dir) if self.s.resume else None
        if ckpt is None and ctx.client.exists(keys.version, keys.stats):
            raise RunStateError(
                f"opd-learner: run {self.s.run!r} already has state in Redis (version {ctx.client.get(keys.version)!r}) but no "
                f"checkpoint in {self.checkpoint_dir}: pass --checkpoint-dir with its checkpoints to resume, "
                "--reset to delete the run and start over, or a new --run name")
        set_limits(ctx.client, keys, self.s.batch_size, self.s.max_staleness, reset=ckpt is None)
        publish_tokenizer(ctx.client, keys, self.tokenizer, self.s.model)  # teachers check theirs against it
        self.consumer = self.ctx.consumer(keys.scored, "learner",
                                          on_poison=release_poison(self.admission, ScoredTrajectory))
        if ckpt is not None:
            self._restore(ckpt)
        feeder = self._feeder()
        # a new run's version 0, or a restore's new epoch: checkpointed before it is published or
        # trained, so a restart from here on resumes (never starts over) and never reuses an epoch
        self._checkpoint()
        self._publish()
        return feeder.start()

    def _reset(self) -> None:
        import shutil

        keys = self.ctx.keys
        streams = {k for k in self.ctx.client.scan_iter(match=f"{keys.trajectories}:*", _type="stream")}
        self.ctx.client.delete(*keys.trajectory_streams(self.ctx.client), *streams, *keys.all())
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        log.warning("--reset: deleted run %r's keys and checkpoints in %s", self.s.run, self.checkpoint_dir)

    def _feeder(self):
        """The teacher pools' survey and the prompt feeder (started by the caller)."""
        import copy

        from services.learner.feeder import PromptFeeder, builtin_problems, file_problems, resume_position
        from services.learner.pool_monitor import PoolMonitor

        ctx, keys = self.ctx, self.ctx.keys
        self.pools = PoolMonitor(ctx.client, keys, self.data.teacher_ids(self.s), ctx.metrics.registry, self.lm.lab,
                                 self.s.teacher_live_s, park_cap=(self.s.max_staleness + 1) * self.s.batch_size).start()
        problems = file_problems(self.data.prompts) if self.s.prompts_file else \
            builtin_problems(self.s.seed, self.s.tasks)
        # resume the prompt order after the last prompt fed (Redis counts it with each XADD, so
        # prompts fed after the checkpoint, still in the stream, are not fed twice)
        fed = resume_position(ctx.client, keys.produced, self.resumed.get("prompts_fed", 0))
        # its own tokenizer: a fast tokenizer's padding state is not thread-safe, and the
        # evaluation pads batches on this thread while the feeder encodes on its own
        self.feeder = PromptFeeder(ctx.client, keys.prompts, copy.deepcopy(self.tokenizer),
                                   itertools.islice(problems, fed, None), self.s.prompt_backlog,
                                   lambda: self.version, fed=fed, template_kwargs=self.s.chat_template_kwargs,
                                   skip=self.pools.down, on_skip=self.pools.count_skipped)
        return self.feeder

    def _collect(self, batch: list[ScoredTrajectory], ids: list[bytes]) -> None:
        """Read, validate and staleness-filter entries until the batch is full or a read times out."""
        assert self.consumer is not None
        entries = self.consumer.read(self.s.batch_size - len(batch), block_ms=500)
        d = decode_batch(self.ctx, self.consumer, entries, ScoredTrajectory, self.check)
        self.stats["dead_letters"] += d.dead
        self.admission.release_tokens([token_of(m) for m in d.invalid])
        payloads = {e.id: e.payload for e in entries}
        in_batch = {m.trajectory.traj_id for m in batch}
        for msg, entry_id in zip(d.messages, d.ids):
            traj_id = msg.trajectory.traj_id
            if traj_id in self.consumed or traj_id in in_batch:  # delivered twice: train once
                self.stats["duplicates"] += 1
                self.lm.dropped.labels(**self.lm.lab, reason="duplicate").inc()
                self.consumer.ack([entry_id])
            elif msg.trajectory.weight_epoch > self.lineage.epoch:  # not this learner's lineage
                self.lm.dropped.labels(**self.lm.lab, reason="foreign").inc()
                self._drop(msg, Entry(entry_id, payloads[entry_id]), f"dropped: foreign, epoch "
                           f"{msg.trajectory.weight_epoch} is newer than this learner's {self.lineage.epoch}")
            elif not self.lineage.current(msg.trajectory.weight_epoch, msg.weight_version):
                self._abandon(msg, Entry(entry_id, payloads[entry_id]))
            elif self.tracker.admit(self.version, msg.weight_version):
                batch.append(msg)
                ids.append(entry_id)
                in_batch.add(traj_id)
                self.payloads[entry_id] = payloads[entry_id]
            else:  # recorded in the dead-letter stream, so every trajectory is accounted for
                reason = "foreign" if msg.weight_version > self.version else "stale"
                self.lm.dropped.labels(**self.lm.lab, reason=reason).inc()
                self._drop(msg, Entry(entry_id, payloads[entry_id]), f"dropped: {reason}, staleness "
                           f"{self.version - msg.weight_version} (max {self.s.max_staleness})")

    def _drop(self, msg: ScoredTrajectory, entry: Entry, reason: str) -> bool:
        """Dead-letter a trajectory that will not be trained; its admission slot comes back."""
        if not self.consumer.dead_letter(self.ctx.keys.dead, entry, reason):
            return False
        self.admission.release_tokens([token_of(msg)])
        return True

    def _abandon(self, msg: ScoredTrajectory, entry: Entry) -> None:
        """A trajectory from weights a restore discarded: its version number now names other
        weights. Its prompt goes back to the prompt stream (a new id) to be sampled again."""
        from shared.streams import produce
        from shared.wire import Prompt, encode

        old = msg.trajectory.prompt
        again = Prompt(uuid.uuid4().hex, old.prompt_ids_P, old.answer, self.version, teacher_id=old.teacher_id)
        epoch, start = self.lineage.discarded_by(msg.trajectory.weight_epoch, msg.weight_version)
        if self._drop(msg, entry, f"abandoned: generated by version {msg.weight_version} of epoch "
                      f"{msg.trajectory.weight_epoch}, discarded by the restore to version {start} "
                      f"(epoch {epoch}); prompt re-queued as {again.prompt_id}"):
            produce(self.ctx.client, self.ctx.keys.prompts, [encode(again)])  # at most once: after the record
            self.stats["abandoned"] += 1
            self.lm.dropped.labels(**self.lm.lab, reason="abandoned").inc()

    def _train(self, batch: list[ScoredTrajectory], ids: list[bytes]) -> tuple[list[ScoredTrajectory], list[bytes]]:
        """One step on the batch; returns what is left to collect on (nothing, unless a message
        that fails on its own was dead-lettered: then the rest waits for a full batch)."""
        self.ctx.heartbeat.beat("training")
        started = time.perf_counter()
        try:
            metrics = self.student.step(batch)
        except Exception as error:
            if self.student.ranks.distributed:  # the other ranks are mid-step: no retry without them
                raise
            keep = self._drop_failing(batch, ids, error)
            return [batch[i] for i in keep], [ids[i] for i in keep]
        elapsed = time.perf_counter() - started
        for msg in batch:
            self.lm.staleness.observe(self.tracker.record(self.version, msg.weight_version))
        self.consumed.update((m.trajectory.traj_id, self.version) for m in batch)
        self.unacked.extend(ids)
        self.unacked_tokens.extend(token_of(m) for m in batch)
        self.payloads.clear()
        self.version += 1
        self._publish()
        if self.version % self.s.checkpoint_every == 0:
            self._checkpoint()
        if self.s.eval_every and self.version % self.s.eval_every == 0:
            self._evaluate()
        self._account(batch, metrics, elapsed)
        return [], []

    def _drop_failing(self, batch: list[ScoredTrajectory], ids: list[bytes], error: Exception) -> list[int]:
        """Dead-letter the messages whose loss fails alone; the indices of the others. Re-raises
        `error` when no single message explains it (out of memory, a broken model)."""
        _, failures = isolate(batch, self.student.probe)
        if not failures:
            raise error
        for i, error in failures:
            entry = Entry(ids[i], self.payloads.pop(ids[i]))
            if dead_letter(self.ctx, self.consumer, entry, f"loss failed: {error!r}", kind="processing_failed"):
                self.stats["dead_letters"] += 1
                self.admission.release_tokens([token_of(batch[i])])
        failed = {i for i, _ in failures}
        return [i for i in range(len(batch)) if i not in failed]

    def _evaluate(self) -> None:
        """Held-out greedy accuracy of the current weights (per teacher id): gauges, log, the stats' curve."""
        if not self.held_out.size:
            return  # a prompts file without an eval file: nothing held out to grade
        self.ctx.heartbeat.beat("evaluating")
        with self.student.evaluated() as model:
            point = self.held_out.point(model, self.tokenizer, self.lm, self.version, time.time() - self.started_at)
        self.stats.setdefault("eval_curve", []).append(point)
        self.ctx.client.hset(self.ctx.keys.stats, "eval_curve", json.dumps(self.stats["eval_curve"]))

    def _account(self, batch: list[ScoredTrajectory], metrics: dict[str, float], elapsed: float) -> None:
        flags = [bool(self.verifier(self.tokenizer.decode(m.trajectory.completion_ids_T, skip_special_tokens=True),
                                    m.trajectory.prompt.answer)) for m in batch]
        correct = sum(flags)
        per_teacher = step_counts(batch, flags)
        self.lm.teachers(per_teacher, metrics)
        add_counts(self.stats.setdefault("teachers", {}), per_teacher)
        self.samples.maybe_write(self.version, batch)
        tokens = sum(m.trajectory.num_tokens for m in batch)
        self.stats["trained_tokens"] += tokens
        self.stats["correct"] += correct
        m = self.ctx.metrics
        m.items.inc(len(batch))
        m.tokens.inc(tokens)
        m.busy.inc(elapsed)
        m.batch_seconds.observe(elapsed)
        self.lm.steps.inc()
        self.lm.accuracy.set(correct / len(batch))
        for name, value in metrics.items():
            self.lm.loss.labels(**self.lm.lab, term=name).set(value)
        for stream in (self.ctx.keys.scored, self.ctx.keys.prompts):
            m.depth(stream, backlog(self.ctx.client, stream))
        self.ctx.report(self.info)
        self._write_stats(metrics, correct / len(batch))
        log.info("step %d loss %.4f fkl %.4f sample_acc %.2f staleness %s", self.version,
                 metrics["loss/total"], metrics["kl/forward_topk"], correct / len(batch),
                 self.tracker.summary()["histogram"])

    def _publish(self) -> None:
        finished = time.time()
        with self.ctx.metrics.timed("weights"):
            epoch = self.lineage.epoch
            path = save_version(self.student.weights(), self.s.weights_dir, self.version, epoch)
            announce(self.ctx.client, self.ctx.keys, self.version, path, step_finished_at=finished, epoch=epoch)
            prune_versions(self.s.weights_dir, self.s.keep_versions, self.version, self.s.keep_versions_s, epoch)
        self.ctx.metrics.weight_version.set(self.version)

    def _write_stats(self, metrics: dict[str, float], sample_accuracy: float, status: str = "running") -> None:
        elapsed = time.time() - self.started_at
        summary = self.tracker.summary()
        if self.version == 1:  # throughput is measured from here, past start-up
            self.stats.update(first_step_at=time.time(), first_step_tokens=self.stats["trained_tokens"],
                              first_step_trajectories=summary["trained"])
        for key, at in (("first_step_replicas", 1), ("last_step_replicas", self.s.max_steps)):
            if self.version == at:  # every replica's counters, so the bench measures one window
                replicas = self.ctx.client.hgetall(self.ctx.keys.replicas)
                self.snapshots[key] = json.dumps({k.decode(): json.loads(v) for k, v in replicas.items()})
        self.ctx.client.hset(self.ctx.keys.stats, mapping={
            "status": status, "step": self.version, "elapsed_s": round(elapsed, 3), "updated_at": time.time(),
            "first_step_at": self.stats.get("first_step_at", 0.0),
            "first_step_tokens": self.stats.get("first_step_tokens", 0),
            "first_step_trajectories": self.stats.get("first_step_trajectories", 0),
            "first_step_replicas": self.snapshots.get("first_step_replicas", "{}"),
            "last_step_replicas": self.snapshots.get("last_step_replicas", "{}"),
            "trained_trajectories": summary["trained"], "trained_tokens": self.stats["trained_tokens"],
            "dead_letters": self.stats["dead_letters"], "duplicates": self.stats["duplicates"],
            "sample_correct": self.stats["correct"],
            "sample_accuracy": round(sample_accuracy, 4),
            "staleness": json.dumps(summary), "metrics": json.dumps(metrics),
            "teachers": json.dumps(self.stats.get("teachers", {})),
            "max_staleness": self.s.max_staleness, "batch_size": self.s.batch_size,
        })

    def _checkpoint(self) -> None:
        """Save everything needed to resume exactly, then ack what it covers."""
        # ids trained long ago can only come back as over-stale (dropped anyway): forget them
        horizon = self.version - max(self.s.dedup_window, self.s.max_staleness + 2)
        self.consumed = {k: v for k, v in self.consumed.items() if v >= horizon}
        state = {"consumed": self.consumed, "stats": self.stats, "prompts_fed": self.feeder.fed,
                 "lineage": {str(e): v for e, v in self.lineage.starts.items()},
                 "tracker": {"trained": dict(self.tracker.trained), "dropped_stale": self.tracker.dropped_stale,
                             "dropped_foreign": self.tracker.dropped_foreign}}
        with self.ctx.metrics.timed("checkpoint"):
            checkpoint.save(self.checkpoint_dir, self.version, self.student.weights(), self.student.optimizer_state(),
                            state, epoch=self.lineage.epoch)
        assert self.consumer is not None
        self.consumer.ack(self.unacked)
        self.admission.consume(self.unacked_tokens)
        self.unacked, self.unacked_tokens = [], []

    def _restore(self, path) -> None:
        """Resume from a checkpoint; take over the previous learner's pending entries at once."""
        state = self.student.restore(path)
        self.resumed = state
        self.version, self.consumed = state["version"], state["consumed"]
        self.stats.update(state["stats"])
        self.lineage = Lineage({int(e): v for e, v in state.get("lineage", {"0": 0}).items()})
        self.lineage.restore(self.version)  # what the dead learner published after this is abandoned
        tracker = state["tracker"]
        self.tracker.trained.update({int(k): v for k, v in tracker["trained"].items()})
        self.tracker.dropped_stale, self.tracker.dropped_foreign = tracker["dropped_stale"], tracker["dropped_foreign"]
        assert self.consumer is not None
        self.consumer.take_over_pending()
        log.info("resumed from %s at version %d, epoch %d (%d trajectories consumed)", path, self.version,
                 self.lineage.epoch, len(self.consumed))

    def _finish(self, completed: bool) -> None:
        from pathlib import Path

        if self.unacked:  # anything trained since the last checkpoint
            self._checkpoint()
        out = Path(self.s.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.student.weights().save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        self.ctx.client.hset(self.ctx.keys.stats, mapping={
            "status": "finished" if completed else "stopped", "output_dir": str(out.resolve())})
        log.info("saved student (version %d) to %s", self.version, out)
