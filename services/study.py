"""`opd study staleness`: accuracy of each estimator under controlled staleness, on the built-in task.

Each run trains the student with one estimator while its rollouts come from the weights
of exactly `s` steps earlier (the worst case the bound `max_staleness = s` admits; s = 0
is synchronous). It uses the services' own code paths in one process (rollout sampler,
teacher scorer, learner trainer) so staleness is exact and runs are comparable, and
records greedy exact-match accuracy on held-out problems every `eval_every` steps.

Wall time is measured per stage (generate G, score S, train L) and reported two ways:
synchronous = sum G+S+L per step; asynchronous (s >= 1) = max(G, S, L) per step, the
perfectly-overlapped pipeline bound. Real service-level throughput is `opd bench`'s job.

    opd study staleness --out reports/staleness          # full grid (~30 min on one core)
    opd study staleness --staleness '[0,4]' --seeds 1    # a quick look
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from pydantic_settings import BaseSettings, SettingsConfigDict


class StudySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_STUDY_", use_attribute_docstrings=True,
                                      cli_kebab_case=True, cli_implicit_flags=True,
                                      cli_prog_name="opd study staleness")

    staleness: list[int] = [0, 1, 2, 4, 8]
    """Staleness values (steps between the behaviour weights and the learner's)."""
    estimators: list[str] = ["fkl_topk", "rkl_stale", "rkl_recompute", "rkl_mc"]
    """Estimators compared (names from services/learner/losses.py)."""
    seeds: int = 2
    """Seeds per (staleness, estimator)."""
    steps: int = 150
    """Optimizer steps per run."""
    batch_size: int = 64
    """Trajectories per step."""
    mc_samples: int = 4
    """Samples per position for rkl_mc (other estimators use the sampled token only)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up."""
    eval_every: int = 25
    """Evaluate every this many steps."""
    eval_n: int = 200
    """Held-out problems per evaluation."""
    student: str = "builtin:student"
    """Student checkpoint."""
    teacher: str = "builtin:teacher"
    """Teacher checkpoint."""
    top_k: int = 64
    """Teacher top-k cached per position."""
    merge: list[str] = []
    """Instead of running, combine the results.json of these report folders (e.g. runs split
    across processes) into one report."""
    out: str = "reports/staleness"
    """Report folder: results.json, table.md, accuracy_vs_steps.png, accuracy_vs_time.png."""


class Models:
    """Teacher, tokenizer, initial student weights and eval problems, loaded once."""

    def __init__(self, s: StudySettings) -> None:
        from shared.models import load_model, load_tokenizer, resolve_model
        from shared.task import make_problems

        self.student_path = resolve_model(s.student)
        self.teacher = load_model(s.teacher)
        self.tokenizer = load_tokenizer(self.student_path)
        self.eval_problems = make_problems(s.eval_n, seed=4321, split="eval")


def _batch(models: Models, behaviour, problems, lag_version: int, mc: int, top_k: int):
    """Sample a batch with the behaviour weights, score it with the teacher: (scored, G, S)."""
    from services.rollout.sampler import sample
    from services.teacher.scorer import score
    from shared.wire import Prompt, ScoredTrajectory, Trajectory

    tok = models.tokenizer
    prompts = [Prompt(str(i), np.asarray(tok(p.prompt)["input_ids"], np.int32), p.answer, lag_version)
               for i, p in enumerate(problems)]
    t0 = time.perf_counter()
    samples = sample(behaviour, [p.prompt_ids_P for p in prompts], eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id, max_new_tokens=8, mc_samples=mc)
    t1 = time.perf_counter()
    trajs = [Trajectory(p.prompt_id, p, x.completion_ids_T, x.behaviour_logprobs_T,
                        np.full(len(x.completion_ids_T), lag_version, np.int32), x.mc_ids_TN,
                        x.mc_logprobs_TN) for p, x in zip(prompts, samples)]
    scores = score(models.teacher, trajs, top_k=top_k, pad_id=tok.pad_token_id)
    return [ScoredTrajectory(t, sc) for t, sc in zip(trajs, scores)], t1 - t0, time.perf_counter() - t1


def run_one(s: StudySettings, models: Models, staleness: int, estimator: str, seed: int) -> dict[str, Any]:
    """One training run; returns its accuracy curve with step and modelled wall times."""
    import torch

    from services.learner.losses import ObjectiveConfig
    from services.learner.trainer import Trainer
    from shared.evaluate import accuracy
    from shared.models import load_model
    from shared.task import make_problems

    torch.manual_seed(seed)
    student, behaviour = load_model(models.student_path), load_model(models.student_path)
    trainer = Trainer(student, lr=s.lr, weight_decay=0.0, grad_clip=1.0,
                      objective=ObjectiveConfig(losses={estimator: 1.0}),
                      pad_id=models.tokenizer.pad_token_id, warmup_steps=s.warmup_steps)
    snapshots = deque([copy.deepcopy(student.state_dict())], maxlen=staleness + 1)
    train = make_problems(s.steps * s.batch_size, seed=seed, split="train")
    mc = s.mc_samples if estimator == "rkl_mc" else 1
    acc = lambda: accuracy(student, models.tokenizer, models.eval_problems)  # noqa: E731
    curve = [{"step": 0, "sync_s": 0.0, "async_s": 0.0, "accuracy": acc()}]
    sync_s = async_s = 0.0
    for step in range(s.steps):
        behaviour.load_state_dict(snapshots[0])  # version max(0, step - staleness)
        lag = max(0, step - staleness)
        chunk = train[step * s.batch_size:(step + 1) * s.batch_size]
        batch, gen_s, score_s = _batch(models, behaviour, chunk, lag, mc, s.top_k)
        t0 = time.perf_counter()
        metrics = trainer.step(batch)
        train_s = time.perf_counter() - t0
        snapshots.append(copy.deepcopy(student.state_dict()))
        sync_s += gen_s + score_s + train_s
        async_s += max(gen_s, score_s, train_s) if staleness > 0 else gen_s + score_s + train_s
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            curve.append({"step": step + 1, "sync_s": sync_s, "async_s": async_s, "accuracy": acc(),
                          "kl_forward": metrics["kl/forward_topk"]})
    return {"staleness": staleness, "estimator": estimator, "seed": seed, "curve": curve}


def final_table(results: list[dict[str, Any]], s: StudySettings) -> str:
    """Markdown: final accuracy mean ± std over seeds, estimators x staleness."""
    lines = ["| estimator | " + " | ".join(f"s={k}" for k in s.staleness) + " |",
             "|---|" + "---|" * len(s.staleness)]
    for est in s.estimators:
        cells = []
        for k in s.staleness:
            finals = [r["curve"][-1]["accuracy"] for r in results
                      if r["estimator"] == est and r["staleness"] == k]
            cells.append(f"{np.mean(finals):.3f} ± {np.std(finals):.3f}" if finals else "-")
        lines.append(f"| {est} | " + " | ".join(cells) + " |")
    start = np.mean([r["curve"][0]["accuracy"] for r in results])
    return "\n".join(lines) + f"\n\nInitial student accuracy: {start:.3f}. Final greedy exact-match " \
        f"accuracy on {s.eval_n} held-out problems after {s.steps} steps, {s.seeds} seed(s).\n"


def plot(results: list[dict[str, Any]], s: StudySettings, x_key: str, path: Path) -> None:
    """One panel per estimator; a line per staleness (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(s.estimators), figsize=(4 * len(s.estimators), 3.4), sharey=True, squeeze=False)
    for ax, est in zip(axes[0], s.estimators):
        for k in s.staleness:
            runs = [r["curve"] for r in results if r["estimator"] == est and r["staleness"] == k]
            if not runs:
                continue
            xs = np.mean([[p[x_key] for p in c] for c in runs], axis=0)
            ys = np.mean([[p["accuracy"] for p in c] for c in runs], axis=0)
            ax.plot(xs, ys, marker="o", ms=3, label=f"staleness {k}")
        ax.set_title(est)
        ax.set_xlabel({"step": "optimizer step", "async_s": "modelled wall time (s)"}[x_key])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(s: StudySettings) -> list[dict[str, Any]]:
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    if s.merge:
        return write_report([r for d in s.merge for r in json.loads((Path(d) / "results.json").read_text())["runs"]], s)
    models = Models(s)
    results = []
    grid = list(itertools.product(s.estimators, s.staleness, range(s.seeds)))
    for i, (est, k, seed) in enumerate(grid, 1):
        started = time.perf_counter()
        results.append(run_one(s, models, k, est, seed))
        final = results[-1]["curve"][-1]["accuracy"]
        print(f"[{i}/{len(grid)}] {est:<14} staleness {k}  seed {seed}  accuracy {final:.3f}  "
              f"({time.perf_counter() - started:.1f}s)", flush=True)
        (out / "results.json").write_text(json.dumps({"settings": s.model_dump(), "runs": results}, indent=1))
    return write_report(results, s)


def write_report(results: list[dict[str, Any]], s: StudySettings) -> list[dict[str, Any]]:
    out = Path(s.out)
    (out / "results.json").write_text(json.dumps({"settings": s.model_dump(), "runs": results}, indent=1))
    table = final_table(results, s)
    (out / "table.md").write_text(table)
    plot(results, s, "step", out / "accuracy_vs_steps.png")
    plot(results, s, "async_s", out / "accuracy_vs_time.png")
    print(table)
    print(f"report written to {out}/")
    return results


def main(argv: list[str]) -> None:
    from pydantic_settings import CliApp

    if not argv or argv[0] != "staleness":
        raise SystemExit("usage: opd study staleness [--flags]  (see --help)")
    run_study(CliApp.run(StudySettings, cli_args=argv[1:]))
