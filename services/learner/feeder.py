"""Prompt feeder: keeps the prompts stream filled for the rollouts, bounded by backpressure.

Runs as a daemon thread in the learner process (the learner owns the data order). Prompts
come from the built-in tasks (train split, endless, seeded; several tasks interleave, each
routed to its own teacher pool by name) or a dataset file (JSONL
or Parquet, text or chat rows, validated up front: shared/datasets.py), cycled. Each is
tokenised with the student's tokenizer: `tokenizer(text)` (its own BOS convention applies), or
a chat row through its chat template (`shared.datasets.prompt_ids`). A row's `teacher_id`
travels on the Prompt; rows for a teacher pool that is down (shared/teacher_pools.py) are
passed over while it is, counted, so the other pools' prompts keep flowing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import redis

from shared.datasets import Example, prompt_ids
from shared.streams import produce, wait_for_room
from shared.task import Problem
from shared.wire import Prompt, encode

log = logging.getLogger("opd.feeder")
CHUNK = 256


def builtin_problems(seed: int, tasks: tuple[str, ...] | list[str] = ("addition",)) -> Iterator[Problem | Example]:
    """Endless train-split problems of the built-in tasks (shared/builtin_tasks.py): fresh
    chunks with successive seeds, the tasks interleaved row by row. One task: its Problems
    (the default teacher pool); several: Examples whose teacher_id is their task's name."""
    from shared.builtin_tasks import problems

    routed = len(tasks) > 1
    for i in itertools.count():
        chunks = [problems(task, CHUNK, seed=seed * 1_000_003 + i, split="train") for task in tasks]
        for rows in zip(*chunks):
            for task, p in zip(tasks, rows):
                yield Example(prompt=p.prompt, answer=p.answer, teacher_id=task, where=f"builtin:{task}") if routed else p


def file_problems(examples: list[Example]) -> Iterator[Example]:
    """Cycle a dataset's rows (loaded and validated up front: shared.datasets.load)."""
    return itertools.cycle(examples)


FED_FIELD = "feeder_position"  # field of the run's `produced` hash: problems ever fed, updated with each XADD


def resume_position(client: redis.Redis, produced_key: str, checkpointed: int) -> int:
    """Problems already fed: Redis counts them with each write, so prompts fed after the last
    checkpoint (still in the stream) are not fed again; the checkpoint's count is the floor."""
    return max(checkpointed, int(client.hget(produced_key, FED_FIELD) or 0))


class PromptFeeder:
    def __init__(self, client: redis.Redis, stream: str, tokenizer, problems: Iterator[Problem | Example],
                 backlog: int, version: Callable[[], int], fed: int = 0,
                 template_kwargs: dict[str, Any] | None = None,
                 skip: Callable[[str], bool] = lambda teacher_id: False,
                 on_skip: Callable[[str], None] = lambda teacher_id: None) -> None:
        """`skip(teacher_id)`: rows for this teacher are passed over for now (its pool is down),
        each reported to `on_skip`."""
        self.client, self.stream, self.tokenizer = client, stream, tokenizer
        self.template_kwargs, self.skip, self.on_skip = template_kwargs or {}, skip, on_skip
        self.problems, self.backlog, self.version = problems, backlog, version
        self.fed = fed  # problems taken from the source so far (checkpointed)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> PromptFeeder:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def check(self) -> None:
        """Re-raise in the learner's loop if the feeder thread died."""
        if self.error is not None:
            raise RuntimeError("prompt feeder failed") from self.error

    def _run(self) -> None:
        try:
            self._feed()
        except BaseException as e:  # surfaced by check() on the learner's thread
            self.error = e
            log.exception("prompt feeder failed")

    def _feed(self) -> None:
        chunk = max(1, min(CHUNK, self.backlog // 4))
        while wait_for_room(self.client, self.stream, self.backlog, chunk, stop=self.stop.is_set):
            batch = list(itertools.islice(self.problems, chunk))
            if not batch:
                return
            keep = []
            for p in batch:
                if self.skip(teacher_of(p)):
                    self.on_skip(teacher_of(p))
                else:
                    keep.append(p)
            # the position counts rows passed over too, in the same step as the writes
            produce(self.client, self.stream, [encode(self._prompt(p)) for p in keep], counter=FED_FIELD,
                    count=len(batch))
            self.fed += len(batch)
            if not keep:  # a stretch of rows for a pool that is down: do not spin through the data
                self.stop.wait(0.2)

    def _prompt(self, problem: Problem | Example) -> Prompt:
        ids = prompt_ids(self.tokenizer, problem, self.template_kwargs)
        return Prompt(prompt_id=uuid.uuid4().hex, prompt_ids_P=np.asarray(ids, np.int32),
                      answer=problem.answer, weight_version=self.version(),
                      teacher_id=teacher_of(problem))


def teacher_of(problem: Problem | Example) -> str:
    """The teacher id a row asks for ("" for the built-in task's Problems: the default pool)."""
    return getattr(problem, "teacher_id", "")
