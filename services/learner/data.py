"""The learner's inputs, validated before it deletes, publishes or feeds anything.

The verifier (shared/verifiers.py), the prompts file's rows and the eval file's
(shared/datasets.py): all read and checked when the learner starts, each row tokenised once
through the student's tokenizer (and chat template), so a bad row, a missing template or an
unknown verifier ends the learner with one line naming what is wrong (file, line/row, field)
and loses nothing. Used by services/learner/worker.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from services.learner.settings import LearnerSettings
from shared.datasets import DatasetError, Example, check_encodable, load
from shared.verifiers import Verifier, load_verifier

log = logging.getLogger("opd.learner")


class BadInputError(SystemExit):
    """A prompts/eval row or a verifier the learner cannot use: exit with one line saying which."""


@dataclass
class LearnerData:
    """What the learner trains on and grades with (empty rows: the built-in task)."""

    verifier: Verifier
    prompts: list[Example] = field(default_factory=list)
    eval_set: list[Example] = field(default_factory=list)

    @classmethod
    def load(cls, s: LearnerSettings) -> LearnerData:
        """Read the verifier and both files, every row validated (BadInputError if one is not)."""
        try:
            data = cls(load_verifier(s.verifier), load(s.prompts_file) if s.prompts_file else [],
                       load(s.eval_file)[:s.eval_problems] if s.eval_file else [])
        except ValueError as e:  # DatasetError included
            raise BadInputError(f"opd-learner: {e}") from None
        if not s.prompts_file:
            check_tasks(list(s.tasks))
        if data.prompts:
            log.info("prompts: %d rows from %s (%d chat)", len(data.prompts), s.prompts_file,
                     sum(r.is_chat for r in data.prompts))
        return data

    def teacher_ids(self, s: LearnerSettings) -> list[str]:
        """The teacher ids this run's prompts ask for ("" = the default pool)."""
        if self.prompts:
            return sorted({row.teacher_id for row in self.prompts})
        return [teacher_id_of_task(list(s.tasks), task) for task in s.tasks]

    def check_tokenisable(self, tokenizer: Any, template_kwargs: dict[str, Any]) -> None:
        """Tokenise every row once: a template or tokenizer problem fails now, not mid-run."""
        try:
            for rows in (self.prompts, self.eval_set):
                check_encodable(tokenizer, rows, template_kwargs)
        except DatasetError as e:
            raise BadInputError(f"opd-learner: {e}") from None


def teacher_id_of_task(tasks: list[str], task: str) -> str:
    """A built-in task's teacher id: "" (the default pool) alone, its name among several."""
    return "" if len(tasks) == 1 else task


def check_tasks(tasks: list[str]) -> None:
    """Known built-in task names, each once (BadInputError otherwise)."""
    if not tasks or len(set(tasks)) != len(tasks):
        raise BadInputError(f"opd-learner: tasks {tasks}: name each built-in task once")
    from shared.builtin_tasks import TASKS

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BadInputError(f"opd-learner: unknown built-in task(s) {unknown}; known: {sorted(TASKS)}")
