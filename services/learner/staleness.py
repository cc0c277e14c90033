"""Staleness accounting at the learner: staleness = learner version - trajectory version.

Admission control (shared/admission.py) keeps rollouts from starting work beyond the bound;
whatever still arrives over it (reordering, a slow replica) is dropped here and counted.
A trajectory from a version newer than the learner's cannot come from this run (an old
run's leftovers, or a restarted learner without its checkpoint): dropped as "foreign".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StalenessTracker:
    max_staleness: int
    trained: Counter[int] = field(default_factory=Counter)  # staleness -> trajectories trained
    dropped_stale: int = 0
    dropped_foreign: int = 0

    def admit(self, learner_version: int, trajectory_version: int) -> bool:
        """True if the trajectory may be trained on now; counts the drops."""
        staleness = learner_version - trajectory_version
        if staleness < 0:
            self.dropped_foreign += 1
            return False
        if staleness > self.max_staleness:
            self.dropped_stale += 1
            return False
        return True

    def record(self, learner_version: int, trajectory_version: int) -> int:
        """Count a trained trajectory; returns its staleness."""
        staleness = learner_version - trajectory_version
        self.trained[staleness] += 1
        return staleness

    def summary(self) -> dict[str, object]:
        total = sum(self.trained.values())
        mean = sum(s * n for s, n in self.trained.items()) / total if total else 0.0
        return {
            "trained": total,
            "histogram": {str(s): n for s, n in sorted(self.trained.items())},
            "mean": round(mean, 3),
            "max": max(self.trained, default=0),
            "dropped_stale": self.dropped_stale,
            "dropped_foreign": self.dropped_foreign,
        }
