"""Train the built-in tokenizer, teacher and (weak) student init from scratch on task data.

Supervised next-token training (AdamW, loss on completion tokens only, right-padded
batches) of two tiny Llamas from ``shared.models.tiny_config``. The teacher trains until
it is clearly good; the student is the smaller architecture trained for far fewer steps,
so it knows the output format (digits then ``<eos>``) but is often wrong, leaving room
for on-policy distillation. Both are saved as normal HF dirs with the shared tokenizer.

Run (defaults reproduce the shipped checkpoints; ~8 minutes on one CPU thread)::

    python -m shared.pretrain --out shared/assets
    python -m shared.pretrain --out /tmp/cap --roles student --student-steps 6000  # capacity check
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.task import Problem, make_problems

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

IGNORE_INDEX = -100  # labels with this value do not contribute to the loss


@dataclass(frozen=True)
class TrainSpec:
    """How long and how hard to train one model."""

    steps: int
    lr: float
    batch_size: int
    warmup: int = 100
    log_every: int = 200


def build_tokenizer(seed: int, digits: int) -> "PreTrainedTokenizerFast":
    """Train the shared tokenizer on full task texts (prompt + answer)."""
    from shared.tokenizer import train_tokenizer

    texts = [p.prompt + p.answer for p in make_problems(5000, seed=seed, split="train",
                                                        digits=digits)]
    return train_tokenizer(texts)


def encode_examples(tokenizer: "PreTrainedTokenizerFast",
                    problems: list[Problem]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-padded ``(input_ids, labels)``; labels are ``IGNORE_INDEX`` off the completion."""
    import torch

    from shared.tokenizer import encode_completion, encode_prompt

    rows: list[tuple[list[int], list[int]]] = []
    for p in problems:
        prompt, completion = encode_prompt(tokenizer, p.prompt), encode_completion(tokenizer, p.answer)
        rows.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    width = max(len(ids) for ids, _ in rows)
    pad = int(tokenizer.pad_token_id)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    return input_ids, labels


def make_model(role: str, tokenizer: "PreTrainedTokenizerFast", seed: int) -> "PreTrainedModel":
    """A freshly initialised tiny Llama for ``role``."""
    import torch
    from transformers import LlamaForCausalLM

    from shared.models import tiny_config

    torch.manual_seed(seed)
    config = tiny_config(role, len(tokenizer), tokenizer.pad_token_id,  # type: ignore[arg-type]
                         tokenizer.bos_token_id, tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def _lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warmup then cosine decay to 10%: stable for tiny models at high lr."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model: "PreTrainedModel", input_ids: "torch.Tensor", labels: "torch.Tensor",
          spec: TrainSpec, *, seed: int, name: str) -> float:
    """Train ``model`` in place; returns wall seconds spent."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    model.train()
    start = time.perf_counter()
    for step in range(spec.steps):
        idx = torch.randint(0, input_ids.shape[0], (spec.batch_size,), generator=gen)
        ids = input_ids[idx]
        # Right padding: pads sit after <eos> and are masked out of attention and loss.
        mask = (ids != model.config.pad_token_id).long()
        out = model(input_ids=ids, attention_mask=mask, labels=labels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % spec.log_every == 0 or step + 1 == spec.steps:
            print(f"[{name}] step {step + 1}/{spec.steps} loss {out.loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    model.eval()
    return time.perf_counter() - start


def save(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast", out_dir: Path) -> None:
    """Save model + tokenizer as one ordinary HF checkpoint dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="writes <out>/teacher, <out>/student")
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--roles", nargs="+", choices=["teacher", "student"],
                        default=["teacher", "student"])
    parser.add_argument("--eval-n", type=int, default=500, help="eval problems for the final report")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI: train the requested roles, save them, print their accuracies."""
    import torch

    from shared.evaluate import accuracy

    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(args.seed, args.digits)
    specs = {"teacher": TrainSpec(args.teacher_steps, args.teacher_lr, args.batch_size),
             "student": TrainSpec(args.student_steps, args.student_lr, args.batch_size,
                                  warmup=min(100, max(1, args.student_steps // 5)))}
    pool = min(400_000, max(specs[r].steps * args.batch_size for r in args.roles))
    input_ids, labels = encode_examples(
        tokenizer, make_problems(max(pool, 1), seed=args.seed, split="train", digits=args.digits))
    eval_problems = make_problems(args.eval_n, seed=args.seed + 1, split="eval", digits=args.digits)
    report: list[str] = []
    for i, role in enumerate(args.roles):
        model = make_model(role, tokenizer, args.seed + i)
        seconds = train(model, input_ids, labels, specs[role], seed=args.seed + i, name=role)
        save(model, tokenizer, args.out / role)
        acc = accuracy(model, tokenizer, eval_problems)
        n_params = sum(p.numel() for p in model.parameters())
        report.append(f"{role}: params={n_params} steps={specs[role].steps} "
                      f"train_time={seconds:.0f}s eval_accuracy={acc:.4f} (n={args.eval_n})")
    print("\n".join(report))


if __name__ == "__main__":
    main()
