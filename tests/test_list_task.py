"""Tests of the built-in list task (``shared.list_task``) and the task registry.

Run: ``python -m pytest tests/test_list_task.py -q``
"""

from __future__ import annotations

from collections import Counter

import pytest

from shared import builtin_tasks, list_task
from shared.list_task import make_problems, split_of
from shared.task import Problem, is_correct


def _parse(prompt: str) -> tuple[int, int, str]:
    """(op, k, digits) read back from a prompt's text."""
    head, digits = prompt.removesuffix("=").split("+")
    return int(head[0]), int(head[1:] or 0), digits


def _expected(op: int, k: int, digits: str) -> str:
    """The answer computed independently of ``list_task.answer_of``."""
    values = [int(c) for c in digits]
    if op == 1:  # counting sort
        counts = Counter(values)
        return "".join(str(d) * counts[d] for d in range(10))
    if op == 2:
        return "".join(str(values[len(values) - 1 - i]) for i in range(len(values)))
    assert op == 3
    return str(int(digits) // 10 ** (len(digits) - k) % 10)


def test_examples_from_the_docs() -> None:
    assert list_task.make_problem(1, 0, "52817") == Problem("1+52817=", "12578")
    assert list_task.make_problem(2, 0, "52817") == Problem("2+52817=", "71825")
    assert list_task.make_problem(3, 4, "52817") == Problem("34+52817=", "1")
    assert list_task.make_problem(1, 0, "50210").answer == "00125"  # leading zeros kept


def test_answers_match_an_independent_computation() -> None:
    problems = make_problems(2_000, seed=1, split="train")
    for p in problems:
        op, k, digits = _parse(p.prompt)
        assert len(digits) == 5 and (k == 0) == (op != 3) and 0 <= k <= 5
        assert p.answer == _expected(op, k, digits)
    ops = Counter(_parse(p.prompt)[0] for p in problems)
    assert set(ops) == {1, 2, 3} and min(ops.values()) > 550  # uniform over the ops
    assert {_parse(p.prompt)[1] for p in problems if p.prompt[0] == "3"} == {1, 2, 3, 4, 5}


def test_splits_are_disjoint() -> None:
    train = {p.prompt for p in make_problems(20_000, seed=0, split="train")}
    evals = {p.prompt for p in make_problems(2_000, seed=0, split="eval")}
    assert len(train) == 20_000 and len(evals) == 2_000  # distinct within a split
    assert not train & evals
    assert {split_of(*_parse(p)) for p in evals} == {"eval"}


def test_splits_are_deterministic() -> None:
    assert make_problems(50, seed=3, split="eval") == make_problems(50, seed=3, split="eval")
    assert make_problems(50, seed=3, split="eval") != make_problems(50, seed=4, split="eval")
    assert make_problems(50, seed=3, split="train") != make_problems(50, seed=3, split="eval")


def test_keys_are_distinct() -> None:
    keys = [list_task.key_of(*key) for length in (1, 2, 3) for key in list_task._all_keys(length)]
    assert len(set(keys)) == len(keys) == 3 * 10 + 4 * 100 + 5 * 1000


def test_small_split_exhaustion_and_bad_arguments() -> None:
    pool = sum(split_of(*key) == "eval" for key in list_task._all_keys(2))
    everything = make_problems(pool, seed=0, split="eval", length=2)
    assert len(set(everything)) == pool
    with pytest.raises(ValueError):
        make_problems(pool + 1, seed=0, split="eval", length=2)
    for bad in (0, 10):
        with pytest.raises(ValueError):
            make_problems(1, seed=0, split="eval", length=bad)
    with pytest.raises(ValueError):
        make_problems(1, seed=0, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        list_task.answer_of(3, 6, "12345")


def test_alphabet_and_shipped_tokenizer_round_trip() -> None:
    from shared.models import load_tokenizer
    from shared.tokenizer import encode_completion, encode_prompt

    tok = load_tokenizer("builtin:student")
    unk = tok.unk_token_id
    for p in make_problems(300, seed=5, split="eval") + make_problems(50, seed=5, split="train", length=9):
        text = p.prompt + p.answer
        assert set(text) <= set("0123456789+=")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and unk not in ids and max(ids) < len(tok) == 15
        assert tok.decode(ids) == text
        full = encode_prompt(tok, p.prompt) + encode_completion(tok, p.answer)
        assert tok.decode(full, skip_special_tokens=True) == text


def test_is_correct_grades_list_answers() -> None:
    p = list_task.make_problem(1, 0, "50210")
    assert is_correct("00125", p) and is_correct("00125<eos>", p)
    assert not is_correct("125", p) and not is_correct("001250", p) and not is_correct("", p)
    assert all(is_correct(q.answer, q) for q in make_problems(100, seed=2, split="eval"))


def test_registry() -> None:
    assert builtin_tasks.TASK_NAMES == ("addition", "list")
    assert builtin_tasks.problems("list", 20, seed=0, split="eval") == make_problems(20, seed=0, split="eval")
    addition = builtin_tasks.problems("addition", 5, seed=0, split="train", digits=2)
    assert [len(p.prompt) for p in addition] == [6] * 5
    assert builtin_tasks.problems("list", 3, seed=0, split="train", length=3)[0].prompt.endswith("=")
    with pytest.raises(ValueError, match="addition, list"):
        builtin_tasks.problems("nope", 1, seed=0, split="eval")
