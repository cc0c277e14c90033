"""`opd demo`: the whole asynchronous OPD pipeline on one machine, start to summary.

Starts an embedded Redis (unless REDIS_URL is set), evaluates the initial student and the
teacher, runs learner + teacher + rollout processes until the learner's step budget or
the time limit, evaluates the trained student and prints a summary: accuracy before and
after, teacher accuracy, trajectories/s, tokens/s and the staleness distribution.

    opd demo                 # async, max_staleness 4, 2 rollouts, ~3-5 min on 2 CPU cores
    opd demo --sync          # strictly synchronous baseline (staleness 0)
    opd demo --multi-teacher # two teachers (addition, list) into one student, ~9 min: services/demo_multi.py
    opd demo --help
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.launcher import Launcher
from shared.streams import read_stats


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_DEMO_", use_attribute_docstrings=True,
                                      cli_kebab_case=True, cli_implicit_flags=True,
                                      cli_prog_name="opd demo")

    steps: int | None = None
    """Learner optimizer steps (unset: 1500; --multi-teacher: 3000, two tasks to learn, one
    of them from nothing)."""
    minutes: float | None = None
    """Stop training after this long even if the steps are not done (unset: 10; --multi-teacher: 15)."""
    rollouts: int = 2
    """Rollout replicas."""
    teachers: int = 1
    """Teacher replicas."""
    max_staleness: int = 4
    """Staleness bound (learner version - trajectory version)."""
    sync: bool = False
    """Strictly synchronous baseline: forces max_staleness = 0."""
    batch_size: int = 64
    """Trajectories per learner step."""
    rollout_batch_size: int = 32
    """Prompts per rollout generation batch."""
    mc_samples: int = 1
    """Tokens recorded per position by the rollouts (1 + extra MC draws)."""
    losses: dict[str, float] = Field(default_factory=lambda: {"fkl_topk": 1.0})
    """Learner estimators and weights (JSON)."""
    lr: float | None = None
    """Learner AdamW learning rate; unset: the estimators' default (services/learner/lr_defaults.py)."""
    warmup_steps: int = 30
    """Learner learning-rate warm-up steps."""
    lr_schedule: str = "cosine"
    """Learner learning rate after the warm-up: constant, or cosine decay over the steps."""
    backend: str = "transformers"
    """Rollout and teacher engine: transformers, or vllm (needs vLLM: scripts/vllm-venv.sh on CPU)."""
    gpu_memory_utilization: float = 0.3
    """vllm backend: each engine's share of the GPU (rollouts and teacher share one)."""
    student: str = "builtin:student"
    """Student checkpoint (path, hub id or builtin:student)."""
    teacher: str = "builtin:teacher"
    """Teacher checkpoint (path, hub id or builtin:teacher); --multi-teacher: the addition task's."""
    multi_teacher: bool = False
    """Distil two teachers into one student at once: the addition teacher and the list teacher,
    each its own teacher pool, prompts of both built-in tasks (services/demo_multi.py)."""
    list_teacher: str = "builtin:list-teacher"
    """--multi-teacher: the list task's teacher checkpoint."""
    eval_n: int = 500
    """Held-out problems for the accuracy evaluation before and after training."""
    eval_every: int = 100
    """The learner's held-out evaluation every this many steps (0: off): progress, curve, plot."""
    eval_problems: int = 200
    """Held-out problems per evaluation during training (the first of the same eval set)."""
    run_dir: str = "runs/demo"
    """Logs, weight versions, the final student and summary.json go here."""
    http_base_port: int = 18000
    """First /healthz+/metrics port; each process takes the next one."""
    seed: int = 0
    """Seed for the learner and rollouts."""

    @model_validator(mode="after")
    def _default_lr(self) -> DemoSettings:
        from services.learner.lr_defaults import resolve_lr

        self.lr = resolve_lr(self.lr, self.losses)
        if self.steps is None:
            self.steps = 3000 if self.multi_teacher else 1500
        if self.minutes is None:
            self.minutes = 15.0 if self.multi_teacher else 10.0
        return self


def evaluate(model_path: str, n: int) -> float:
    """Greedy exact-match accuracy on n held-out problems."""
    from shared.evaluate import EVAL_SEED, accuracy
    from shared.models import load_model, load_tokenizer, resolve_model
    from shared.task import make_problems

    path = resolve_model(model_path)
    return accuracy(load_model(path), load_tokenizer(path), make_problems(n, seed=EVAL_SEED, split="eval"))


def service_flags(s: DemoSettings, run_dir: Path) -> dict[str, dict[str, object]]:
    common = {"weights_dir": run_dir / "weights", "torch_threads": 1, "device": "cpu"}
    engine = {"backend": s.backend, **({"gpu_memory_utilization": s.gpu_memory_utilization}
                                       if s.backend == "vllm" else {})}
    return {
        "learner": {**common, "model": s.student, "batch_size": s.batch_size,
                    "max_staleness": 0 if s.sync else s.max_staleness, "max_steps": s.steps,
                    "losses": json.dumps(s.losses), "lr": s.lr, "seed": s.seed,
                    "warmup_steps": s.warmup_steps, "lr_schedule": s.lr_schedule,
                    "eval_every": s.eval_every, "eval_problems": s.eval_problems,
                    "output_dir": run_dir / "student", "checkpoint_dir": run_dir / "checkpoints"},
        "teacher": {**common, **engine, "model": s.teacher},
        "rollout": {**common, **engine, "model": s.student, "batch_size": s.rollout_batch_size,
                    "mc_samples": s.mc_samples, "seed": s.seed},
    }


def _start_all(launcher: Launcher, s: DemoSettings, run_dir: Path) -> None:
    flags, port = service_flags(s, run_dir), s.http_base_port
    plan = [("learner", "learner")] + [("teacher", f"teacher-{i}") for i in range(s.teachers)]
    plan += [("rollout", f"rollout-{i}") for i in range(s.rollouts)]
    for service, name in plan:
        launcher.start(service, name, {**flags[service], "replica": name, "http_port": port})
        port += 1


def _progress(stats: dict[str, str], s: DemoSettings) -> str:
    st = json.loads(stats.get("staleness", "{}") or "{}")
    m = json.loads(stats.get("metrics", "{}") or "{}")
    elapsed = float(stats.get("elapsed_s", 0)) or 1e-9
    curve = json.loads(stats.get("eval_curve", "[]") or "[]")
    held_out = f"held-out {curve[-1]['accuracy']:.3f} (step {curve[-1]['step']})  " if curve else ""
    return (f"step {stats.get('step', 0):>4}/{s.steps}  {held_out}fwdKL {m.get('kl/forward_topk', 0):.3f}  "
            f"sample acc {float(stats.get('sample_accuracy', 0)):.2f}  "
            f"{int(stats.get('trained_trajectories', 0)) / elapsed:6.1f} traj/s  "
            f"staleness mean {st.get('mean', 0)} max {st.get('max', 0)}")


def watch(launcher: Launcher, client, keys, s: DemoSettings,
          progress: Callable[[dict[str, str]], str] | None = None) -> dict[str, str]:
    """Print progress until the learner exits or time runs out; returns the final stats."""
    deadline = time.monotonic() + s.minutes * 60
    learner = launcher.children[0]
    last = ""
    while learner.proc.poll() is None:
        launcher.raise_if_failed()
        if time.monotonic() > deadline:
            print("time limit reached: stopping the learner", flush=True)
            launcher.stop(["learner"])
            break
        stats = read_stats(client, keys)
        line = (progress or (lambda st: _progress(st, s)))(stats) if stats.get("step") else \
            "waiting for the first step..."
        if line != last:
            print(line, flush=True)
            last = line
        time.sleep(2.0)
    launcher.raise_if_failed()
    return read_stats(client, keys)


def run_summary(stats: dict[str, str], s: DemoSettings) -> dict[str, Any]:
    """What every demo reports from the learner's stats: mode, steps, time, throughput,
    staleness, dead letters, the held-out curve."""
    elapsed = float(stats.get("elapsed_s", 0)) or 1e-9
    return {
        "mode": "sync" if s.sync else f"async (max_staleness {s.max_staleness})",
        "steps": int(stats.get("step", 0)), "train_seconds": round(elapsed, 1),
        "trajectories_per_s": round(int(stats.get("trained_trajectories", 0)) / elapsed, 2),
        "tokens_per_s": round(int(stats.get("trained_tokens", 0)) / elapsed, 1),
        "staleness": json.loads(stats.get("staleness", "{}") or "{}"),
        "dead_letters": int(stats.get("dead_letters", 0)),
        "eval_curve": json.loads(stats.get("eval_curve", "[]") or "[]"),
    }


def summarize(stats: dict[str, str], acc: dict[str, float], s: DemoSettings) -> dict[str, Any]:
    """The run's summary plus the student's accuracy before and after and the teacher's."""
    return {**run_summary(stats, s), "student_accuracy_before": acc["before"],
            "student_accuracy_after": acc["after"], "teacher_accuracy": acc["teacher"]}


def plot_accuracy(summary: dict[str, Any], path: Path, ylabel: str,
                  draw: Callable[[Any, str], None]) -> Path:
    """The demos' figure: held-out accuracy vs learner steps (left) and vs wall time (right);
    `draw(ax, x_key)` plots the curves and reference lines on each axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, label in ((axes[0], "step", "learner step"), (axes[1], "elapsed_s", "wall time (s)")):
        draw(ax, key)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"opd demo: {summary['mode']}, {summary['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curve(summary: dict[str, Any], path: Path) -> Path | None:
    """Held-out accuracy vs steps and vs wall time, with the teacher's and the initial student's."""
    curve = summary["eval_curve"]
    if not curve:
        return None

    def draw(ax: Any, key: str) -> None:
        ax.plot([c[key] for c in curve], [c["accuracy"] for c in curve], marker=".", label="student (held-out)")
        ax.axhline(summary["teacher_accuracy"], color="tab:green", ls="--", label="teacher")
        ax.axhline(0.9 * summary["teacher_accuracy"], color="tab:green", ls=":", label="0.9 x teacher")
        ax.axhline(summary["student_accuracy_before"], color="tab:gray", ls=":", label="student before")
    return plot_accuracy(summary, path, "greedy exact match", draw)


def print_summary(summary: dict[str, Any]) -> None:
    st = summary["staleness"]
    rows = [
        ("mode", summary["mode"]), ("steps", summary["steps"]),
        ("train time (s)", summary["train_seconds"]),
        ("student accuracy before", f"{summary['student_accuracy_before']:.3f}"),
        ("student accuracy after", f"{summary['student_accuracy_after']:.3f}"),
        ("teacher accuracy", f"{summary['teacher_accuracy']:.3f}"),
        ("trajectories/s", summary["trajectories_per_s"]), ("tokens/s", summary["tokens_per_s"]),
        ("staleness histogram", st.get("histogram", {})),
        ("staleness mean / max", f"{st.get('mean', 0)} / {st.get('max', 0)}"),
        ("dropped (stale / foreign)", f"{st.get('dropped_stale', 0)} / {st.get('dropped_foreign', 0)}"),
        ("dead letters", summary["dead_letters"]),
    ]
    print("\n== OPD demo summary ==")
    for k, v in rows:
        print(f"  {k:<28} {v}")


def run_demo(s: DemoSettings) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from shared.redis_server import EmbeddedRedis
    from shared.keys import Keys
    from shared.redis_client import connect

    hf_logging.disable_progress_bar()  # the evaluations load models: no progress bars in the summary

    run_dir = Path(s.run_dir).resolve()
    for stale in ("checkpoints", "weights", "student", "logs", "redis"):  # a new demo, not a resume
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    run = f"demo-{int(time.time())}"
    embedded = None if os.environ.get("REDIS_URL") else EmbeddedRedis(data_dir=str(run_dir / "redis")).start()
    url = os.environ.get("REDIS_URL") or embedded.url
    print(f"redis: {url.split('@')[-1]} ({'embedded' if embedded else 'external'}), run {run}, dir {run_dir}")
    launcher = Launcher(env={"REDIS_URL": url, "OPD_RUN": run, "PYTHONUNBUFFERED": "1"},
                        log_dir=run_dir / "logs")
    try:
        if s.multi_teacher:
            from services.demo_multi import run as run_multi

            return run_multi(s, launcher, connect(url), Keys(run), run_dir)
        print("evaluating the initial student and the teacher...", flush=True)
        acc = {"before": evaluate(s.student, s.eval_n), "teacher": evaluate(s.teacher, s.eval_n)}
        print(f"student {acc['before']:.3f}, teacher {acc['teacher']:.3f}; starting "
              f"{s.rollouts} rollout(s), {s.teachers} teacher(s), 1 learner", flush=True)
        _start_all(launcher, s, run_dir)
        stats = watch(launcher, connect(url), Keys(run), s)
        launcher.stop()
        acc["after"] = evaluate(str(run_dir / "student"), s.eval_n)
        summary = summarize(stats, acc, s)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
        if (plot := plot_curve(summary, run_dir / "accuracy.png")) is not None:
            print(f"  accuracy plot                {plot}")
        return summary
    finally:
        launcher.stop(grace_s=10)
        if embedded is not None:
            embedded.stop()
