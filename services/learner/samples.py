"""Completions visible: a few trained samples every N steps, to the learner's log and a capped stream.

Each sample is (prompt, completion, answer, reward, teacher id): the prompt and completion
decoded with the student's tokenizer (a chat prompt shows its rendered template), the reward
the verifier's grade (1.0 or 0.0). Entries go to the run's `samples` stream with
`XADD ... MAXLEN ~ samples_max_entries`, as plain string fields, so `opd tail` (services/tail.py)
or `redis-cli XREVRANGE opd:<run>:samples + - COUNT 5` shows what the student writes.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from shared.verifiers import Verifier
from shared.wire import ScoredTrajectory

log = logging.getLogger("opd.learner.samples")


class SampleLog:
    """Writes `per_step` samples of a trained batch every `every` steps (0: never)."""

    def __init__(self, client: redis.Redis, stream: str, tokenizer: Any, verifier: Verifier,
                 every: int, per_step: int, max_entries: int) -> None:
        self.client, self.stream, self.tokenizer, self.verifier = client, stream, tokenizer, verifier
        self.every, self.per_step, self.max_entries = every, per_step, max_entries

    def sample(self, step: int, msg: ScoredTrajectory) -> dict[str, str]:
        """One trained trajectory as the stream entry's fields."""
        t = msg.trajectory
        completion = self.tokenizer.decode(t.completion_ids_T, skip_special_tokens=True)
        return {"step": str(step), "prompt": self.tokenizer.decode(t.prompt.prompt_ids_P, skip_special_tokens=True),
                "completion": completion, "answer": t.prompt.answer,
                "reward": "1.0" if self.verifier(completion, t.prompt.answer) else "0.0",
                "teacher_id": t.prompt.teacher_id, "teacher": msg.scores.teacher, "traj_id": t.traj_id}

    def maybe_write(self, step: int, batch: list[ScoredTrajectory]) -> int:
        """Log and stream samples of `batch` if `step` is a sampling step; how many were written."""
        if not self.every or step % self.every or not batch:
            return 0
        pipe = self.client.pipeline(transaction=False)
        samples = [self.sample(step, m) for m in batch[:self.per_step]]
        for s in samples:
            log.info("sample step %s reward %s teacher %s | %r -> %r (answer %r)", s["step"], s["reward"],
                     s["teacher_id"] or s["teacher"], s["prompt"], s["completion"], s["answer"])
            pipe.xadd(self.stream, s, maxlen=self.max_entries, approximate=True)
        pipe.execute()
        return len(samples)
