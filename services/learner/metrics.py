"""The learner's own Prometheus metrics (staleness histogram, drops by reason, loss terms,
steps, sample and held-out accuracy), in the service's registry beside the shared ones
(shared/monitoring.py). Counters by reason are exported as 0 from the start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from services.learner.staleness import STALENESS_BUCKETS

if TYPE_CHECKING:
    from shared.service import Context


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
        self.lab = lab
