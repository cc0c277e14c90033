"""The registry of built-in tasks: a name -> that task's ``make_problems``.

* ``addition``: ``shared.task`` (``123+045=`` -> ``168``), options ``digits=3``
* ``list``:     ``shared.list_task`` (``1+52817=`` -> ``12578``), options ``length=5``

Both write their prompts with the same characters, so one tokenizer serves both, and both
are graded by ``shared.task.is_correct``. Pure Python, cheap to import.

Usage::

    from shared.builtin_tasks import problems
    evals = problems("list", 500, seed=0, split="eval")
    problems("addition", 10, seed=0, split="train", digits=2)
"""

from __future__ import annotations

from collections.abc import Callable

from shared import list_task, task
from shared.task import Problem, Split

TASKS: dict[str, Callable[..., list[Problem]]] = {
    "addition": task.make_problems,
    "list": list_task.make_problems,
}
TASK_NAMES = tuple(TASKS)


def make_problems_of(name: str) -> Callable[..., list[Problem]]:
    """The ``make_problems`` of the task called ``name``; ``ValueError`` for an unknown one."""
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; valid names: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def problems(name: str, n: int, *, seed: int, split: Split, **options: int) -> list[Problem]:
    """``n`` problems of task ``name``; ``options`` go to its ``make_problems`` as is."""
    return make_problems_of(name)(n, seed=seed, split=split, **options)
