"""Train the built-in tokenizer, teachers and (weak) student init from scratch on task data.

Supervised next-token training (AdamW, loss on completion tokens only, right-padded
batches) of tiny Llamas from ``shared.models.tiny_config``, saved as normal HF dirs
``<out>/<role>`` that share one tokenizer. Roles and the built-in task each learns
(``shared.builtin_tasks``):

* teacher (addition): the larger model, trained for a fixed number of steps until clearly good.
* list-teacher (list): the same architecture on the list task (``shared.list_task``),
  for multi-teacher runs; the student init has never seen that task.
* student init: the smaller model, trained only until its accuracy on a held-out
  train-split sample first reaches ``--student-stop-acc`` (default 0.2). Learning curves
  here are sharp (a long plateau, then a jump to >0.9 within a few hundred steps), so a
  fixed step count would land on either side of the jump depending on seed and platform;
  stopping on accuracy gives a student that reliably knows the format (digits then
  ``<eos>``) but is often wrong, leaving room for on-policy distillation.

``--tokenizer DIR`` (or ``builtin:<role>``) reuses a saved tokenizer instead of training
one, and copies its files into every output dir verbatim, so a model added later shares
the shipped tokenizer byte for byte.

Run (defaults reproduce the shipped checkpoints; ~6 minutes on one CPU thread)::

    python -m shared.pretrain --out shared/assets
    # the shipped list teacher (1200 steps, 1.000 on 500 held-out list problems, ~5
    # minutes on one CPU thread), with the shipped tokenizer; writes only <out>/list-teacher
    python -m shared.pretrain --out shared/assets --roles list-teacher --tokenizer builtin:teacher
    # capacity check: the student architecture trained to convergence (not shipped)
    python -m shared.pretrain --out /tmp/cap --roles student --student-steps 3000 \
        --student-stop-acc 0
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.builtin_tasks import problems as task_problems
from shared.task import Problem, make_problems

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# The shipped list teacher's schedule (see the module doc for the command).
LIST_TEACHER_STEPS = 1200
LIST_TEACHER_LR = 3e-3
IGNORE_INDEX = -100  # labels with this value do not contribute to the loss
ROLE_SEED_OFFSET = {"teacher": 0, "student": 1, "list-teacher": 2}  # same model whichever roles run
ROLE_TASK = {"teacher": "addition", "student": "addition", "list-teacher": "list"}


@dataclass(frozen=True)
class TrainSpec:
    """How long and how hard to train one model."""

    steps: int
    lr: float
    batch_size: int
    warmup: int = 100
    log_every: int = 200
    check_every: int = 25  # how often ``should_stop`` is consulted


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
        prompt = encode_prompt(tokenizer, p.prompt)
        completion = encode_completion(tokenizer, p.answer)
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
          spec: TrainSpec, *, seed: int, name: str,
          should_stop: Callable[[], bool] | None = None) -> int:
    """Train ``model`` in place; returns the number of steps taken.

    ``should_stop`` (if given) is called every ``spec.check_every`` steps and ends
    training early when it returns True.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    start = time.perf_counter()
    for step in range(1, spec.steps + 1):
        model.train()
        idx = torch.randint(0, input_ids.shape[0], (spec.batch_size,), generator=gen)
        ids = input_ids[idx]
        # Right padding: pads sit after <eos>; masking them keeps them out of attention.
        mask = (ids != model.config.pad_token_id).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % spec.log_every == 0 or step == spec.steps:
            print(f"[{name}] step {step}/{spec.steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
        if should_stop is not None and step % spec.check_every == 0 and should_stop():
            print(f"[{name}] early stop at step {step}", flush=True)
            break
    model.eval()
    return step


def save(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast", out_dir: Path,
         tokenizer_dir: str = "") -> None:
    """Save model + tokenizer as one ordinary HF checkpoint dir.

    With ``tokenizer_dir`` (where ``tokenizer`` was loaded from) each tokenizer file is
    then replaced by that dir's copy: loading adds per-load keys to the config that a
    fresh save would write, and the shipped tokenizer must stay byte-identical.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # The fast backend keeps the padding of its last batched call (e.g. evaluation's
    # left padding) and would write it into tokenizer.json; it is per-call state.
    tokenizer.backend_tokenizer.no_padding()
    written = tokenizer.save_pretrained(out_dir)
    if tokenizer_dir:
        for name in (Path(f).name for f in written):
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copyfile(source, out_dir / name)


def _accuracy_reached(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast",
                      problems: list[Problem], target: float) -> Callable[[], bool]:
    """A ``should_stop`` that fires once greedy accuracy on ``problems`` >= ``target``."""
    from shared.evaluate import accuracy

    return lambda: accuracy(model, tokenizer, problems) >= target


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="writes <out>/<role> for each of --roles")
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--student-steps", type=int, default=2000,
                        help="max student steps (it usually stops early, see --student-stop-acc)")
    parser.add_argument("--student-stop-acc", type=float, default=0.2,
                        help="stop the student once held-out accuracy reaches this; 0 = never")
    parser.add_argument("--list-teacher-steps", type=int, default=LIST_TEACHER_STEPS)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument("--list-teacher-lr", type=float, default=LIST_TEACHER_LR)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", type=int, default=3, help="addition operand digits")
    parser.add_argument("--list-length", type=int, default=5, help="list task: digits per list")
    parser.add_argument("--roles", nargs="+", choices=list(ROLE_TASK),
                        default=["teacher", "student"])
    parser.add_argument("--tokenizer", default="",
                        help="reuse this saved tokenizer (dir or builtin:<role>); default: train one")
    parser.add_argument("--eval-n", type=int, default=500, help="eval problems for the report")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def task_options(task: str, args: argparse.Namespace) -> dict[str, int]:
    """The size option of a built-in task's ``make_problems``, from the CLI flags."""
    return {"digits": args.digits} if task == "addition" else {"length": args.list_length}


def _spec(role: str, args: argparse.Namespace) -> TrainSpec:
    steps, lr = {"teacher": (args.teacher_steps, args.teacher_lr),
                 "student": (args.student_steps, args.student_lr),
                 "list-teacher": (args.list_teacher_steps, args.list_teacher_lr)}[role]
    return TrainSpec(steps, lr, args.batch_size)


def _train_role(
    role: str, args: argparse.Namespace, tokenizer: "PreTrainedTokenizerFast",
    data: tuple["torch.Tensor", "torch.Tensor"], tokenizer_dir: str,
) -> tuple["PreTrainedModel", int, float]:
    """Build, train and save one role; returns (model, steps taken, wall seconds)."""
    seed = args.seed + ROLE_SEED_OFFSET[role]
    model = make_model(role, tokenizer, seed)
    should_stop = None
    if role == "student" and args.student_stop_acc > 0:
        # Train-split problems (never the eval split) so eval numbers stay clean.
        held_out = make_problems(200, seed=seed + 1000, split="train", digits=args.digits)
        should_stop = _accuracy_reached(model, tokenizer, held_out, args.student_stop_acc)
    start = time.perf_counter()
    steps = train(model, *data, _spec(role, args), seed=seed, name=role, should_stop=should_stop)
    seconds = time.perf_counter() - start
    save(model, tokenizer, args.out / role, tokenizer_dir)
    return model, steps, seconds


def _tokenizer(args: argparse.Namespace) -> tuple["PreTrainedTokenizerFast", str]:
    """The tokenizer to train with, and the dir it was loaded from ("" when trained here)."""
    if not args.tokenizer:
        return build_tokenizer(args.seed, args.digits), ""
    from shared.models import load_tokenizer, resolve_model

    return load_tokenizer(args.tokenizer), resolve_model(args.tokenizer)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """CLI: train the requested roles, save them, print their accuracies."""
    import torch

    from shared.evaluate import accuracy

    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, tokenizer_dir = _tokenizer(args)
    report: list[str] = []
    for task in dict.fromkeys(ROLE_TASK[r] for r in args.roles):  # tasks in --roles order
        roles = [r for r in args.roles if ROLE_TASK[r] == task]
        options = task_options(task, args)
        pool = max(1, min(400_000, max(_spec(r, args).steps for r in roles) * args.batch_size))
        data = encode_examples(tokenizer, task_problems(task, pool, seed=args.seed,
                                                        split="train", **options))
        eval_problems = task_problems(task, args.eval_n, seed=args.seed, split="eval", **options)
        for role in roles:
            model, steps, seconds = _train_role(role, args, tokenizer, data, tokenizer_dir)
            acc = accuracy(model, tokenizer, eval_problems)
            n_params = sum(p.numel() for p in model.parameters())
            report.append(f"{role}: task={task} params={n_params} steps={steps} "
                          f"train_time={seconds:.0f}s eval_accuracy={acc:.4f} "
                          f"(n={args.eval_n}, seed={args.seed})")
    print("\n".join(report))


if __name__ == "__main__":
    main()
