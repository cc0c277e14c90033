"""The second built-in verifiable task: list manipulation on a short list of digits.

Written only with the addition task's characters (``0123456789+=``), so the one shipped
15-token tokenizer (``<pad> <bos> <eos>``, the digits, ``+``, ``=``) encodes it and the
student, the addition teacher and the list teacher can all share it. A prompt is
``"<op>+<list>="`` where ``<list>`` is ``length`` digits (5 by default) and ``<op>`` is

* ``1``       sort ascending   ``1+52817=``  -> ``12578``
* ``2``       reverse          ``2+52817=``  -> ``71825``
* ``3<k>``    the k-th digit   ``34+52817=`` -> ``1``   (1-based, ``1 <= k <= length``)

Answers are digit strings with leading zeros kept (sort of ``50210`` is ``00125``), so
``shared.task.is_correct`` (leading digit run, exact match) grades them unchanged. With
the default sizes a list prompt's first field has 1-2 characters and an addition prompt's
(``123+045=``) has 3, so the two tasks' prompts never coincide; they can when addition
uses 1-2 digit operands (``--digits``), which no built-in checkpoint is trained on.

Draws are uniform over the three ops, then over ``k`` for the k-th op. Train and eval
splits are disjoint: every problem ``(op, k, list)`` is mapped to one integer key and
assigned to a split by ``shared.task.split_of_key``, the addition task's fixed hash.

Usage::

    from shared.list_task import make_problems
    problems = make_problems(500, seed=0, split="eval")

Run ``python -m shared.list_task`` to print a few sample problems.
"""

from __future__ import annotations

import random

from shared.task import EVAL_BUCKETS, HASH_BUCKETS, Problem, Split, split_of_key

SORT, REVERSE, KTH = 1, 2, 3
OPS = (SORT, REVERSE, KTH)
MAX_LENGTH = 9  # k is written as a single digit

# (op, k, digits); k is 0 for sort and reverse
Key = tuple[int, int, str]


def format_prompt(op: int, k: int, digits: str) -> str:
    """The prompt text: ``"1+52817="``, ``"2+52817="`` or ``"34+52817="`` (see module doc)."""
    head = f"{op}{k}" if op == KTH else str(op)
    return f"{head}+{digits}="


def answer_of(op: int, k: int, digits: str) -> str:
    """The exact expected answer, a digit string (leading zeros kept)."""
    if op == SORT:
        return "".join(sorted(digits))
    if op == REVERSE:
        return digits[::-1]
    if op == KTH:
        if not 1 <= k <= len(digits):
            raise ValueError(f"k must be in 1..{len(digits)}, got {k}")
        return digits[k - 1]
    raise ValueError(f"op must be one of {OPS}, got {op}")


def make_problem(op: int, k: int, digits: str) -> Problem:
    """Build one problem with its answer."""
    return Problem(prompt=format_prompt(op, k, digits), answer=answer_of(op, k, digits))


def key_of(op: int, k: int, digits: str) -> int:
    """One integer per distinct problem (lengths occupy disjoint key ranges)."""
    length = len(digits)
    return ((length * 4 + op) * 10 + k) * 10**length + int(digits)


def split_of(op: int, k: int, digits: str) -> Split:
    """Which split the problem belongs to (``shared.task.split_of_key`` of its key)."""
    return split_of_key(key_of(op, k, digits))


def _all_keys(length: int) -> list[Key]:
    """Every problem of the given list length, in a fixed order."""
    heads = [(SORT, 0), (REVERSE, 0)] + [(KTH, k) for k in range(1, length + 1)]
    return [(op, k, f"{d:0{length}d}") for op, k in heads for d in range(10**length)]


def _draw(rng: random.Random, length: int) -> Key:
    op = rng.choice(OPS)
    k = rng.randint(1, length) if op == KTH else 0
    return op, k, "".join(rng.choice("0123456789") for _ in range(length))


def _expected_pool(split: Split, length: int) -> float:
    frac = EVAL_BUCKETS / HASH_BUCKETS
    return (length + 2) * 10**length * (frac if split == "eval" else 1.0 - frac)


def make_problems(n: int, *, seed: int, split: Split, length: int = 5) -> list[Problem]:
    """``n`` distinct problems of the given split, deterministic for ``(seed, split, length)``.

    Raises ``ValueError`` if the split holds fewer than ``n`` distinct problems. When
    ``n`` is over half the split, the problems are sampled uniformly from the whole split
    instead (then k-th problems are ``length`` times as common as sorts).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 1 <= length <= MAX_LENGTH:
        raise ValueError(f"length must be in 1..{MAX_LENGTH}, got {length}")
    # Mix the task and split into the seed so the draws are unrelated streams.
    rng = random.Random(f"list:{seed}:{split}:{length}")
    if n > _expected_pool(split, length) / 2:
        # Rejection sampling would stall near exhaustion: enumerate and sample instead.
        pool = [key for key in _all_keys(length) if split_of(*key) == split]
        if n > len(pool):
            raise ValueError(f"split {split!r} has only {len(pool)} problems, asked for {n}")
        return [make_problem(*key) for key in rng.sample(pool, n)]
    seen: set[Key] = set()
    out: list[Problem] = []
    while len(out) < n:
        key = _draw(rng, length)
        if key in seen or split_of(*key) != split:
            continue
        seen.add(key)
        out.append(make_problem(*key))
    return out


def main() -> None:
    """Print a few problems of each split."""
    for split in ("train", "eval"):
        for p in make_problems(4, seed=0, split=split):
            print(f"{split:5s} {p.prompt}{p.answer}")


if __name__ == "__main__":
    main()
