"""Tests of the built-in task and its tokenizer: splits, grading, token layout.

Run: ``python -m pytest tests/test_task.py -q``
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shared.task import Problem, extract_answer, is_correct, make_problems, split_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def tokenizer() -> "PreTrainedTokenizerFast":
    from shared.tokenizer import train_tokenizer

    problems = make_problems(500, seed=0, split="train")
    return train_tokenizer(p.prompt + p.answer for p in problems)


def test_splits_are_disjoint() -> None:
    train = {p.prompt for p in make_problems(20_000, seed=0, split="train")}
    evals = {p.prompt for p in make_problems(2_000, seed=0, split="eval")}
    assert len(evals) == 2_000  # distinct within a split
    assert not train & evals
    assert {split_of(*map(int, p[:-1].split("+"))) for p in evals} == {"eval"}


def test_splits_are_deterministic() -> None:
    assert make_problems(50, seed=3, split="eval") == make_problems(50, seed=3, split="eval")
    assert make_problems(50, seed=3, split="eval") != make_problems(50, seed=4, split="eval")
    assert make_problems(50, seed=3, split="train") != make_problems(50, seed=3, split="eval")


def test_answers_are_sums() -> None:
    for p in make_problems(200, seed=1, split="train"):
        a, b = p.prompt.removesuffix("=").split("+")
        assert len(a) == len(b) == 3
        assert p.answer == str(int(a) + int(b))


def test_small_digit_split_exhaustion() -> None:
    pool = sum(split_of(a, b) == "eval" for a in range(10) for b in range(10))
    one_digit = make_problems(pool, seed=0, split="eval", digits=1)
    assert len(set(one_digit)) == pool and one_digit[0].prompt[1] == "+"
    with pytest.raises(ValueError):
        make_problems(pool + 1, seed=0, split="eval", digits=1)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [("168", True), (" 168", True), ("168 ", True), ("168<eos>", True), ("168\n99", True),
     ("1680", False), ("16", False), ("", False), ("abc", False), ("+168", False)],
)
def test_is_correct(completion: str, expected: bool) -> None:
    assert is_correct(completion, Problem(prompt="123+045=", answer="168")) is expected


def test_extract_answer() -> None:
    assert extract_answer("  0123x") == "0123"
    assert extract_answer("x12") == ""


def test_tokenizer_round_trip_is_exact(tokenizer: "PreTrainedTokenizerFast") -> None:
    for p in make_problems(200, seed=5, split="eval"):
        text = p.prompt + p.answer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) == len(text)  # every character, each digit included, is one token


def test_prompt_completion_layout(tokenizer: "PreTrainedTokenizerFast") -> None:
    from shared.tokenizer import encode_completion, encode_prompt

    p = Problem(prompt="999+999=", answer="1998")
    prompt_ids = encode_prompt(tokenizer, p.prompt)
    completion_ids = encode_completion(tokenizer, p.answer)
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in prompt_ids[1:]
    assert prompt_ids == tokenizer(p.prompt)["input_ids"]
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert len(prompt_ids) <= 12 and len(completion_ids) <= 6
    text = tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    assert text == "999+999=1998"
    specials = (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token)
    assert specials == ("<pad>", "<bos>", "<eos>")


def test_tokenizer_save_load(tokenizer: "PreTrainedTokenizerFast", tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert loaded("12+3=")["input_ids"] == tokenizer("12+3=")["input_ids"]
    assert loaded.decode(loaded("12+3=")["input_ids"], skip_special_tokens=True) == "12+3="
