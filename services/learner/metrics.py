"""The learner's own Prometheus metrics (staleness histogram, drops by reason, loss terms,
steps, sample and held-out accuracy, and the same per teacher id), in the service's registry
beside the shared ones (shared/monitoring.py). Counters by reason are exported as 0 from the
start. Per teacher (label teacher_id; the default pool is `default`): trained tokens and
trajectories (counters: a teacher's share is its rate over the sum), the last step's loss
per token and sample accuracy, and held-out accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from services.learner.staleness import STALENESS_BUCKETS

if TYPE_CHECKING:
    from shared.service import Context
    from shared.wire import ScoredTrajectory


class LearnerMetrics:
    """Learner-only metrics, in the service's registry."""

    def __init__(self, ctx: Context) -> None:
        r, lab = ctx.metrics.registry, {"service": "learner", "replica": ctx.settings.replica}
        self.staleness = Histogram("opd_staleness", "Staleness of trained trajectories (steps)",
                                   list(lab), registry=r, buckets=STALENESS_BUCKETS
                                   ).labels(**lab)
        self.dropped = Counter("opd_dropped_total", "Trajectories dropped by the learner",
                               [*lab, "reason"], registry=r)
        for reason in ("stale", "foreign", "duplicate", "abandoned"):  # exported as 0 from the start
            self.dropped.labels(**lab, reason=reason)
        self.loss = Gauge("opd_loss", "Last step's loss terms and KL diagnostics",
                          [*lab, "term"], registry=r)
        self.steps = Counter("opd_learner_steps_total", "Optimizer steps", list(lab),
                             registry=r).labels(**lab)
        self.accuracy = Gauge("opd_sample_accuracy", "Verifier accuracy of trained samples",
                              list(lab), registry=r).labels(**lab)
        self.eval_accuracy = Gauge("opd_eval_accuracy", "Greedy verifier accuracy on held-out problems",
                                   list(lab), registry=r).labels(**lab)
        teacher = [*lab, "teacher_id"]
        self.teacher_tokens = Counter("opd_teacher_trained_tokens", "Response tokens trained, per teacher id",
                                      teacher, registry=r)
        self.teacher_trajectories = Counter("opd_teacher_trained_trajectories", "Trajectories trained, per teacher id",
                                            teacher, registry=r)
        self.teacher_loss = Gauge("opd_teacher_loss", "Last step's loss per response token, per teacher id",
                                  teacher, registry=r)
        self.teacher_accuracy = Gauge("opd_teacher_sample_accuracy", "Verifier accuracy of the last step's "
                                      "samples, per teacher id", teacher, registry=r)
        self.teacher_eval = Gauge("opd_teacher_eval_accuracy", "Greedy held-out accuracy, per teacher id",
                                  teacher, registry=r)
        self.lab = lab

    def teachers(self, step: dict[str, dict[str, int]], metrics: dict[str, float]) -> None:
        """One step's per-teacher numbers (from `step_counts`); its `teacher_loss/<id>` metrics are
        taken out of `metrics`."""
        for tid, row in step.items():
            lab = {**self.lab, "teacher_id": tid or "default"}
            self.teacher_tokens.labels(**lab).inc(row["tokens"])
            self.teacher_trajectories.labels(**lab).inc(row["trajectories"])
            self.teacher_accuracy.labels(**lab).set(row["correct"] / row["trajectories"])
            self.teacher_loss.labels(**lab).set(metrics.pop(f"teacher_loss/{tid}", 0.0))


def step_counts(batch: list[ScoredTrajectory], flags: list[bool]) -> dict[str, dict[str, int]]:
    """Per teacher id in one step: trained trajectories, tokens, correct samples."""
    per: dict[str, dict[str, int]] = {}
    for m, ok in zip(batch, flags):
        row = per.setdefault(m.trajectory.prompt.teacher_id, {"trajectories": 0, "tokens": 0, "correct": 0})
        row["trajectories"] += 1
        row["tokens"] += m.trajectory.num_tokens
        row["correct"] += int(ok)
    return per


def add_counts(totals: dict[str, dict[str, int]], step: dict[str, dict[str, int]]) -> None:
    """Add one step's per-teacher counts to the learner's running totals (its stats, checkpointed)."""
    for tid, row in step.items():
        total = totals.setdefault(tid, {"trajectories": 0, "tokens": 0, "correct": 0})
        for key, value in row.items():
            total[key] += value
