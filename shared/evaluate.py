"""Greedy-decoding accuracy of a causal LM: a built-in task, or a held-out dataset.

Prompts are tokenised one by one, left-padded into batches by hand (never through the
tokenizer's padding state) and decoded greedily with ``model.generate``; on the
built-in tasks (``shared.builtin_tasks``: addition, list) a completion is correct when its
leading digits equal the answer exactly (``shared.task.is_correct``). ``dataset_accuracy``
grades a dataset's rows (text or chat, ``shared.datasets``) with any verifier
(``shared.verifiers``).

Run::

    python -m shared.evaluate --model builtin:teacher --n 500 --seed 0
    python -m shared.evaluate --model builtin:list-teacher --task list --n 500
    python -m shared.evaluate --model path/to/checkpoint --n 500 --split eval
    python -m shared.evaluate --model path/to/checkpoint --eval-file held_out.jsonl --verifier numeric
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.task import Problem, Split, is_correct

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def greedy_completions(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                       prompts: list[str], *, max_new_tokens: int = 8) -> list[str]:
    """Greedy completions (decoded text, special tokens dropped) for one batch of prompts.

    Each prompt is tokenised alone (`tokenizer(text)`, its own BOS convention) and the batch
    left-padded by `greedy_from_ids`: no padding through the tokenizer, whose padding state
    a fast tokenizer keeps per object, not per call (unsafe when another thread encodes)."""
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    return greedy_from_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens)


EVAL_SEED = 1234  # the held-out problems every report grades (demo, learner, eval CLI)


def accuracy(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
             problems: list[Problem], *, batch_size: int = 128,
             max_new_tokens: int = 8) -> float:
    """Fraction of ``problems`` whose greedy completion is exactly right."""
    def correct_in(batch: list[Problem]) -> int:
        completions = greedy_completions(model, tokenizer, [p.prompt for p in batch], max_new_tokens=max_new_tokens)
        return sum(is_correct(c, p) for c, p in zip(completions, batch))

    return _fraction_correct(model, problems, batch_size, correct_in)


def task_accuracy(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", task: str,
                  n: int, *, seed: int, split: Split = "eval", batch_size: int = 128,
                  max_new_tokens: int = 8, **options: int) -> float:
    """``accuracy`` on ``n`` problems of the built-in task named ``task`` (``options``, e.g.
    ``digits=3`` or ``length=5``, go to its ``make_problems``)."""
    from shared.builtin_tasks import problems

    return accuracy(model, tokenizer, problems(task, n, seed=seed, split=split, **options),
                    batch_size=batch_size, max_new_tokens=max_new_tokens)


def _fraction_correct(model: "PreTrainedModel", items: list, batch_size: int,
                      correct_in: Callable[[list], int]) -> float:
    """sum(correct_in(batch)) / len(items) over batches of `items`, with the model in eval
    mode meanwhile (its training flag restored after); 0 for no items."""
    if not items:
        return 0.0
    was_training = model.training
    model.eval()
    try:
        correct = sum(correct_in(items[start:start + batch_size]) for start in range(0, len(items), batch_size))
    finally:
        model.train(was_training)
    return correct / len(items)


def greedy_from_ids(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                    prompts: list[list[int]], *, max_new_tokens: int) -> list[str]:
    """Greedy completions for already-tokenised prompts (left-padded here), decoded as text."""
    import torch

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def dataset_accuracy(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", examples: list,
                     verifier, *, template_kwargs: dict | None = None, batch_size: int = 64,
                     max_new_tokens: int = 8) -> float:
    """Fraction of dataset rows whose greedy completion the verifier accepts."""
    from shared.datasets import prompt_ids

    def correct_in(batch: list) -> int:
        ids = [prompt_ids(tokenizer, e, template_kwargs) for e in batch]
        completions = greedy_from_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens)
        return sum(bool(verifier(c, e.answer)) for c, e in zip(completions, batch))

    return _fraction_correct(model, examples, batch_size, correct_in)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from shared.builtin_tasks import TASK_NAMES

    parser.add_argument("--model", default="builtin:teacher",
                        help="builtin:student, builtin:teacher, builtin:list-teacher, or a checkpoint path")
    parser.add_argument("--task", choices=TASK_NAMES, default="addition", help="the built-in task to grade")
    parser.add_argument("--n", type=int, default=500, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["train", "eval"], default="eval")
    parser.add_argument("--eval-file", default="", help="JSONL/Parquet rows to grade instead of the built-in task")
    parser.add_argument("--verifier", default="exact", help="exact, numeric or module:function (with --eval-file)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--digits", type=int, default=3, help="addition operand digits")
    parser.add_argument("--list-length", type=int, default=5, help="list task: digits per list")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI: print the exact-match accuracy of one model."""
    import torch

    from shared.models import load_model, load_tokenizer

    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    start = time.perf_counter()
    if args.eval_file:
        from shared.datasets import load
        from shared.verifiers import load_verifier

        rows = load(args.eval_file)[:args.n]
        acc = dataset_accuracy(model, tokenizer, rows, load_verifier(args.verifier), batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens)
        what = f"eval_file={args.eval_file} verifier={args.verifier} n={len(rows)}"
    else:
        options = {"digits": args.digits} if args.task == "addition" else {"length": args.list_length}
        acc = task_accuracy(model, tokenizer, args.task, args.n, seed=args.seed, split=args.split,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, **options)
        what = f"task={args.task} split={args.split} n={args.n} seed={args.seed}"
    print(f"model={args.model} {what} accuracy={acc:.4f} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
