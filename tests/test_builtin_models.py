"""Tests of the shipped built-in checkpoints in ``shared/assets/``.

The teacher must be good, the student init clearly worse but well-formed, and both must
share one tokenizer; the list teacher must be good on the list task, with the student's
tokenizer byte for byte. Run: ``python -m pytest tests/test_builtin_models.py -q``
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from shared.list_task import make_problems as make_list_problems
from shared.models import builtin_path, resolve_model
from shared.task import Problem, make_problems

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

N_EVAL = 200


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return make_problems(N_EVAL, seed=0, split="eval")


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple["PreTrainedModel", "PreTrainedTokenizerBase"]]:
    import torch

    from shared.models import load_model, load_tokenizer

    torch.set_num_threads(1)  # keep the suite from grabbing every core
    return {role: (load_model(f"builtin:{role}"), load_tokenizer(f"builtin:{role}"))
            for role in ("teacher", "student")}


@pytest.fixture(scope="module")
def accuracies(loaded: dict[str, Any], problems: list[Problem]) -> dict[str, float]:
    from shared.evaluate import accuracy

    return {role: accuracy(model, tok, problems) for role, (model, tok) in loaded.items()}


def test_builtin_paths() -> None:
    for role in ("teacher", "student", "list-teacher"):
        path = Path(builtin_path(role))
        assert path.is_absolute() and path.name == role
        assert resolve_model(f"builtin:{role}") == str(path)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (path / name).is_file()
    assert resolve_model("some/dir") == "some/dir"
    with pytest.raises(ValueError):
        resolve_model("builtin:nope")


def test_teacher_is_good(accuracies: dict[str, float]) -> None:
    assert accuracies["teacher"] >= 0.9


def test_student_is_clearly_worse(accuracies: dict[str, float]) -> None:
    assert accuracies["student"] <= accuracies["teacher"] - 0.25


def test_shared_tokenizer(loaded: dict[str, Any]) -> None:
    (teacher, t_tok), (student, s_tok) = loaded["teacher"], loaded["student"]
    assert t_tok.get_vocab() == s_tok.get_vocab()
    assert teacher.config.vocab_size == student.config.vocab_size
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(t_tok, attr) == getattr(s_tok, attr)
        assert getattr(teacher.config, attr) == getattr(t_tok, attr)
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters())


def test_student_answers_are_well_formed(loaded: dict[str, Any], problems: list[Problem]) -> None:
    """Even when wrong, the student writes digits then <eos>, so it can be graded."""
    from shared.evaluate import greedy_completions

    model, tok = loaded["student"]
    completions = greedy_completions(model, tok, [p.prompt for p in problems[:100]])
    well_formed = [c.isdigit() and 1 <= len(c) <= 4 for c in completions]
    assert sum(well_formed) >= 95


def test_batched_greedy_matches_unbatched(loaded: dict[str, Any]) -> None:
    """Left padding (prompts of different lengths) must not change greedy outputs."""
    from shared.evaluate import greedy_completions

    model, tok = loaded["teacher"]
    prompts = [p.prompt for d in (1, 2, 3)
               for p in make_problems(4, seed=1, split="eval", digits=d)]
    batched = greedy_completions(model, tok, prompts)
    assert batched == [greedy_completions(model, tok, [p])[0] for p in prompts]


@pytest.fixture(scope="module")
def list_teacher() -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    from shared.models import load_model, load_tokenizer

    return load_model("builtin:list-teacher"), load_tokenizer("builtin:list-teacher")


def test_list_teacher_shares_the_tokenizer_byte_for_byte(list_teacher: Any, loaded: dict[str, Any]) -> None:
    model, tok = list_teacher
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shipped = (Path(builtin_path("student")) / name).read_bytes()
        assert (Path(builtin_path("list-teacher")) / name).read_bytes() == shipped
    assert len(tok) == model.config.vocab_size == loaded["student"][0].config.vocab_size == 15
    assert model.config.head_dim == 32  # vLLM's smallest attention head size
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(model.config, attr) == getattr(tok, attr)


def test_list_teacher_is_good_on_lists_only(list_teacher: Any) -> None:
    from shared.evaluate import accuracy

    model, tok = list_teacher
    assert accuracy(model, tok, make_list_problems(100, seed=0, split="eval")) >= 0.9
    assert accuracy(model, tok, make_problems(50, seed=0, split="eval")) <= 0.2


def test_eval_cli_grades_a_named_task(capsys: pytest.CaptureFixture[str]) -> None:
    from shared.evaluate import main

    main(["--model", "builtin:list-teacher", "--task", "list", "--n", "40"])
    line = capsys.readouterr().out
    assert "task=list" in line and float(line.split("accuracy=")[1].split()[0]) >= 0.8


def test_pretrain_list_teacher_reuses_the_shipped_tokenizer(tmp_path: Path) -> None:
    """The shipped list teacher's command, for 2 steps: only <out>/list-teacher is written,
    with the student's tokenizer files byte for byte and the teacher's architecture."""
    import json

    from shared.pretrain import main

    main(["--out", str(tmp_path), "--roles", "list-teacher", "--tokenizer", "builtin:teacher",
          "--list-teacher-steps", "2", "--eval-n", "4", "--batch-size", "8"])
    assert [p.name for p in tmp_path.iterdir()] == ["list-teacher"]
    out = tmp_path / "list-teacher"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (Path(builtin_path("student")) / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    teacher = json.loads((Path(builtin_path("teacher")) / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "vocab_size"):
        assert config[key] == teacher[key]


def test_greedy_completions_are_safe_while_another_thread_encodes(loaded: dict[str, Any]) -> None:
    """The learner's feeder encodes on its own thread while the evaluation decodes batches of
    prompts of different lengths: no shared tokenizer padding state to race on."""
    import threading

    from shared.builtin_tasks import problems
    from shared.evaluate import greedy_completions

    model, tok = loaded["student"]
    prompts = [p.prompt for p in problems("list", 16, seed=0, split="eval")]  # 8- and 9-character prompts
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1
    want = greedy_completions(model, tok, prompts, max_new_tokens=2)
    stop = threading.Event()

    def encode() -> None:
        while not stop.is_set():
            tok("123+456=")

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a race shows up at once
    worker = threading.Thread(target=encode, daemon=True)
    worker.start()
    try:
        for _ in range(30):
            assert greedy_completions(model, tok, prompts, max_new_tokens=1) == [w[:1] for w in want]
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(interval)
