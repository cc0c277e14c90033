"""The learner's held-out evaluation: greedy accuracy per teacher id, and the run's curve.

Held-out sets: the eval file's rows (graded by the verifier), grouped by their
`teacher_id`; or each built-in task's eval split (exact match), keyed by the task's
teacher id ("" when the run has one task, else the task's name: services/learner/data.py).
`evaluate` grades every set and returns the accuracy per teacher id and over all of them
(weighted by set size); the learner exports both (opd_eval_accuracy and
opd_teacher_eval_accuracy{teacher_id}) and keeps the curve in the run's stats.
"""

from __future__ import annotations

import logging
from typing import Any

from services.learner.data import teacher_id_of_task
from services.learner.settings import LearnerSettings
from shared.datasets import Example
from shared.verifiers import Verifier

log = logging.getLogger("opd.learner")


def builtin_sets(tasks: list[str], n: int) -> dict[str, list]:
    """Each built-in task's first `n` held-out problems, by teacher id."""
    from shared.builtin_tasks import problems
    from shared.evaluate import EVAL_SEED

    return {teacher_id_of_task(tasks, t): problems(t, n, seed=EVAL_SEED, split="eval") for t in tasks}


def file_sets(rows: list[Example]) -> dict[str, list[Example]]:
    """The eval file's rows by teacher id, in file order."""
    sets: dict[str, list[Example]] = {}
    for row in rows:
        sets.setdefault(row.teacher_id, []).append(row)
    return sets


class HeldOut:
    """What the learner grades every eval_every steps."""

    def __init__(self, s: LearnerSettings, eval_rows: list[Example], verifier: Verifier) -> None:
        self.s, self.verifier, self.from_file = s, verifier, bool(eval_rows)
        if eval_rows:
            self.sets: dict[str, list[Any]] = file_sets(eval_rows)
        elif s.prompts_file:  # a prompts file without an eval file: nothing held out
            self.sets = {}
        else:
            self.sets = builtin_sets(list(s.tasks), s.eval_problems)

    @property
    def size(self) -> int:
        return sum(map(len, self.sets.values()))

    def evaluate(self, model: Any, tokenizer: Any) -> tuple[float, dict[str, float]]:
        """(accuracy over every set, accuracy per teacher id)."""
        from shared.evaluate import accuracy, dataset_accuracy

        per: dict[str, float] = {}
        for teacher_id, rows in self.sets.items():
            if self.from_file:
                per[teacher_id] = dataset_accuracy(model, tokenizer, rows, self.verifier,
                                                   template_kwargs=self.s.chat_template_kwargs,
                                                   max_new_tokens=self.s.eval_max_new_tokens)
            else:
                per[teacher_id] = accuracy(model, tokenizer, rows, max_new_tokens=self.s.eval_max_new_tokens)
        overall = sum(per[t] * len(rows) for t, rows in self.sets.items()) / max(1, self.size)
        return overall, per

    def point(self, model: Any, tokenizer: Any, lm: Any, step: int, elapsed_s: float) -> dict[str, Any]:
        """Evaluate, set the learner's gauges (LearnerMetrics `lm`), log; the curve's new point."""
        acc, per = self.evaluate(model, tokenizer)
        lm.eval_accuracy.set(acc)
        for tid, value in per.items():
            lm.teacher_eval.labels(**lm.lab, teacher_id=tid or "default").set(value)
        point: dict[str, Any] = {"step": step, "accuracy": round(acc, 4), "elapsed_s": round(elapsed_s, 2)}
        if len(per) > 1:
            point["by_teacher"] = {tid: round(v, 4) for tid, v in per.items()}
        log.info("step %d held-out accuracy %.3f (%d problems)%s", step, acc, self.size,
                 "".join(f" {tid}={v:.3f}" for tid, v in per.items()) if len(per) > 1 else "")
        return point
