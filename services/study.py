"""`opd study staleness`: accuracy of each estimator under controlled staleness, on the built-in task.

Each run trains the student with one estimator variant while its rollouts come from the
weights of exactly `s` steps earlier (the worst case the bound `max_staleness = s` admits;
s = 0 is synchronous). It uses the services' own code paths in one process (rollout
sampler, teacher scorer, learner trainer) so staleness is exact and runs are comparable,
and records greedy exact-match accuracy on held-out problems every `eval_every` steps.

A variant is an estimator name (services/learner/losses.py) or `rkl_stale+<stabiliser>`
(services/learner/stabilisers.py, or `+vcpo`). With `--lr-sweep` the study first trains
each listed estimator at staleness 0 at every candidate rate and keeps the best mean final
accuracy over seeds; variants take their base estimator's rate. Rates not swept come from
`--lrs`, then `--lr`, then the estimator's default (services/learner/lr_defaults.py).
`--gradients` adds the bias-variance analysis of services/study_gradients.py.

Wall time is measured per stage (generate G, score S, train L) and reported two ways:
synchronous = sum G+S+L per step; asynchronous (s >= 1) = max(G, S, L) per step, the
perfectly-overlapped pipeline bound. Real service-level throughput is `opd bench`'s job.

    opd study staleness --out reports/staleness                        # full grid, default rates
    opd study staleness --staleness '[0,4]' --seeds 1 --steps 100      # a quick look
    opd study staleness --merge '["dirA","dirB"]' --out reports/staleness   # combine split runs
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

from services.study_gradients import GradientSettings

VARIANTS = ["fkl_topk", "rkl_stale", "rkl_recompute", "rkl_mc", "rkl_stale+ppo_clip",
            "rkl_stale+decoupled_ppo", "rkl_stale+m2po", "rkl_stale+tis", "rkl_stale+mis",
            "rkl_stale+minpro", "rkl_stale+vcpo"]


class StudySettings(GradientSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_STUDY_", use_attribute_docstrings=True,
                                      cli_kebab_case=True, cli_implicit_flags=True,
                                      cli_prog_name="opd study staleness")

    staleness: list[int] = [0, 1, 2, 4, 8]
    """Staleness values (steps between the behaviour weights and the learner's)."""
    estimators: list[str] = VARIANTS
    """Variants compared: estimator names, or rkl_stale+<stabiliser> (ppo_clip, decoupled_ppo,
    m2po, tis, mis, minpro, vcpo)."""
    seeds: int = 3
    """Seeds per (staleness, variant)."""
    steps: int = 400
    """Optimizer steps per run."""
    batch_size: int = 64
    """Trajectories per step."""
    mc_samples: int = 4
    """Samples per position for rkl_mc (other estimators use the sampled token only)."""
    lr: float | None = None
    """AdamW learning rate for every variant not swept nor in --lrs (unset: estimator defaults)."""
    lrs: dict[str, float] = {}
    """Per-variant (or base-estimator) learning rates, JSON, e.g. '{"fkl_topk": 3e-3}'."""
    lr_sweep: dict[str, list[float]] = {}
    """Candidate rates per base estimator, swept at staleness 0 before the grid (best mean
    final accuracy wins), e.g. '{"fkl_topk": [1e-3, 3e-3, 1e-2]}'."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up (then constant)."""
    eval_every: int = 100
    """Evaluate every this many steps."""
    eval_n: int = 200
    """Held-out problems per evaluation."""
    curves: bool = False
    """Also tabulate every run's accuracy at each evaluation (per seed) in table.md."""
    student: str = "builtin:student"
    """Student checkpoint."""
    teacher: str = "builtin:teacher"
    """Teacher checkpoint."""
    top_k: int = 64
    """Teacher top-k cached per position (the built-in vocabulary has 15 ids: 64 = all)."""
    reuse: list[str] = []
    """Report folders whose runs are reused where variant, staleness, seed, rate and steps match
    (resume a study, or split one over processes; the folders must use the same settings)."""
    merge: list[str] = []
    """Instead of running, combine the results.json (and gradients.json) of these report
    folders (e.g. runs split across processes) into one report."""
    out: str = "reports/staleness"
    """Report folder: results.json, table.md, accuracy_vs_steps.png, accuracy_vs_time.png."""


def parse_variant(spec: str):
    """(base estimator, ObjectiveConfig) of a variant name such as "rkl_stale+ppo_clip"."""
    from services.learner.losses import ObjectiveConfig
    from services.learner.stabilisers import StabiliserConfig

    base, _, stab = spec.partition("+")
    if stab and base not in ("rkl_stale", "rkl_recompute"):
        raise ValueError(f"{spec!r}: stabilisers apply to rkl_stale / rkl_recompute only")
    kind = "none" if stab in ("", "vcpo") else stab
    return base, ObjectiveConfig(losses={base: 1.0}, stabiliser=StabiliserConfig(kind), vcpo=stab == "vcpo")


def variant_lr(s: StudySettings, spec: str, chosen: dict[str, float]) -> float:
    """Sweep winner of the base estimator, else --lrs (variant, then base), --lr, default."""
    from services.learner.lr_defaults import estimator_lr

    base = spec.partition("+")[0]
    for table, key in ((chosen, base), (s.lrs, spec), (s.lrs, base)):
        if key in table:
            return table[key]
    return s.lr if s.lr is not None else estimator_lr(base)


class Models:
    """Teacher, tokenizer, initial student weights and eval problems, loaded once."""

    def __init__(self, s: StudySettings) -> None:
        from shared.models import load_model, load_tokenizer, resolve_model
        from shared.task import make_problems

        self.student_path = resolve_model(s.student)
        self.teacher = load_model(s.teacher)
        self.tokenizer = load_tokenizer(self.student_path)
        self.eval_problems = make_problems(s.eval_n, seed=4321, split="eval")


def scored_batch(models: Models, behaviour, problems, lag_version: int, mc: int, top_k: int):
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


def run_one(s: StudySettings, models: Models, staleness: int, spec: str, seed: int,
            lr: float) -> dict[str, Any]:
    """One training run; returns its accuracy curve with step and modelled wall times."""
    import torch

    from services.learner.trainer import Trainer
    from shared.evaluate import accuracy
    from shared.models import load_model
    from shared.task import make_problems

    torch.manual_seed(seed)
    base, objective = parse_variant(spec)
    student, behaviour = load_model(models.student_path), load_model(models.student_path)
    trainer = Trainer(student, lr=lr, weight_decay=0.0, grad_clip=1.0, objective=objective,
                      pad_id=models.tokenizer.pad_token_id, warmup_steps=s.warmup_steps)
    snapshots = deque([copy.deepcopy(student.state_dict())], maxlen=staleness + 1)
    train = make_problems(s.steps * s.batch_size, seed=seed, split="train")
    mc = s.mc_samples if base == "rkl_mc" else 1
    acc = lambda: accuracy(student, models.tokenizer, models.eval_problems)  # noqa: E731
    curve = [{"step": 0, "sync_s": 0.0, "async_s": 0.0, "accuracy": acc()}]
    sync_s = async_s = 0.0
    for step in range(s.steps):
        behaviour.load_state_dict(snapshots[0])  # version max(0, step - staleness)
        chunk = train[step * s.batch_size:(step + 1) * s.batch_size]
        batch, gen_s, score_s = scored_batch(models, behaviour, chunk, max(0, step - staleness), mc, s.top_k)
        t0 = time.perf_counter()
        metrics = trainer.step(batch)
        train_s = time.perf_counter() - t0
        snapshots.append(copy.deepcopy(student.state_dict()))
        sync_s += gen_s + score_s + train_s
        async_s += max(gen_s, score_s, train_s) if staleness > 0 else gen_s + score_s + train_s
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            curve.append({"step": step + 1, "sync_s": round(sync_s, 2), "async_s": round(async_s, 2),
                          "accuracy": acc(), "kl_forward": round(metrics["kl/forward_topk"], 4)})
    return {"staleness": staleness, "estimator": spec, "seed": seed, "lr": lr, "curve": curve}


class Runner:
    """Runs (or reuses) training runs, keeps them all, saves results.json after each."""

    def __init__(self, s: StudySettings, models: Models) -> None:
        self.s, self.models, self.runs = s, models, load_merged(s.reuse)[0] if s.reuse else []
        self.started = time.perf_counter()

    def get(self, spec: str, staleness: int, seed: int, lr: float, phase: str) -> dict[str, Any]:
        for r in self.runs:
            if run_key(r) == (spec, staleness, seed, lr, self.s.steps):
                return r
        t0 = time.perf_counter()
        run = {**run_one(self.s, self.models, staleness, spec, seed, lr), "phase": phase}
        self.runs.append(run)
        print(f"[{len(self.runs)}] {phase:<5} {spec:<24} staleness {staleness}  seed {seed}  lr {lr:.0e}  "
              f"accuracy {run['curve'][-1]['accuracy']:.3f}  ({time.perf_counter() - t0:.1f}s, "
              f"{(time.perf_counter() - self.started) / 60:.1f} min total)", flush=True)
        save_results(self.s, self.runs)
        return run


def save_results(s: StudySettings, runs: list[dict[str, Any]]) -> None:
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = s.model_dump(exclude={"merge", "reuse"})  # folders of this machine: not part of the result
    (out / "results.json").write_text(json.dumps({"settings": settings, "runs": runs},
                                                 separators=(",", ":")))


def run_study(s: StudySettings) -> list[dict[str, Any]]:
    """Sweep (if asked), then the staleness x variant x seed grid, then the report."""
    from services.study_report import best_lrs, write_report

    Path(s.out).mkdir(parents=True, exist_ok=True)
    if s.merge:
        return write_report(s, *load_merged(s.merge))
    models = Models(s)
    runner = Runner(s, models)
    for base, lrs in s.lr_sweep.items():
        for lr, seed in itertools.product(lrs, range(s.seeds)):
            runner.get(base, 0, seed, lr, "sweep")
    chosen = best_lrs(runner.runs)
    for spec, k, seed in itertools.product(s.estimators, s.staleness, range(s.seeds)):
        runner.get(spec, k, seed, variant_lr(s, spec, chosen), "grid")
    gradients = None
    if s.gradients:
        from services.study_gradients import run_gradients

        gradients = run_gradients(s, models, {spec: variant_lr(s, spec, chosen) for spec in s.estimators})
        (Path(s.out) / "gradients.json").write_text(json.dumps(gradients, separators=(",", ":")))
    return write_report(s, runner.runs, gradients)


def run_key(run: dict[str, Any]) -> tuple[str, int, int, float, int]:
    """What makes two runs the same: variant, staleness, seed, rate and length (final step)."""
    return run["estimator"], run["staleness"], run["seed"], run["lr"], run["curve"][-1]["step"]


def load_merged(dirs: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """All runs of these report folders (a run kept once) and their gradient results, if any."""
    runs, seen, gradients = [], set(), None
    for d in dirs:
        results = Path(d) / "results.json"
        for r in json.loads(results.read_text())["runs"] if results.exists() else []:
            key = run_key(r)
            if key not in seen:
                seen.add(key)
                runs.append(r)
        g = Path(d) / "gradients.json"
        if g.exists():
            gradients = json.loads(g.read_text())
    return runs, gradients


def main(argv: list[str]) -> None:
    from pydantic_settings import CliApp

    if not argv or argv[0] != "staleness":
        raise SystemExit("usage: opd study staleness [--flags]  (see --help)")
    run_study(CliApp.run(StudySettings, cli_args=argv[1:]))
