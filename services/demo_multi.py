"""`opd demo --multi-teacher`: two teachers distilled into one student at once, on CPU.

The built-in addition teacher (`builtin:teacher`) and list teacher (`builtin:list-teacher`,
sort / reverse / k-th digit: shared/list_task.py) each run as their own teacher pool
(`--teacher-id addition`, `--teacher-id list`); the learner mixes both built-in tasks
(`tasks: ["addition", "list"]`), so every prompt is routed to its task's pool
(shared/teacher_pools.py), and the one student learns from both. Before and after, the
student is evaluated on each task's held-out problems next to both teachers; the learner's
held-out curve is kept per task (summary.json, accuracy.png).

    opd demo --multi-teacher            # 3000 steps, ~9 min on 2 shared CPU cores
    opd demo --multi-teacher --teachers 2 --rollouts 3
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.launcher import Launcher

if TYPE_CHECKING:
    from services.demo import DemoSettings

TASKS = ("addition", "list")


def teachers_of(s: DemoSettings) -> dict[str, str]:
    """Each task's teacher model."""
    return {"addition": s.teacher, "list": s.list_teacher}


def evaluate_tasks(model_path: str, n: int) -> dict[str, float]:
    """Greedy exact-match accuracy on n held-out problems of each built-in task."""
    from shared.evaluate import EVAL_SEED, task_accuracy
    from shared.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(model_path)
    model, tokenizer = load_model(path), load_tokenizer(path)
    return {t: task_accuracy(model, tokenizer, t, n, seed=EVAL_SEED) for t in TASKS}


def start_all(launcher: Launcher, s: DemoSettings, run_dir: Path) -> None:
    """Learner (both tasks), one pool of `s.teachers` replicas per task, the rollouts."""
    from services.demo import service_flags

    flags, port = service_flags(s, run_dir), s.http_base_port
    plan = [("learner", "learner", {**flags["learner"], "tasks": json.dumps(list(TASKS))})]
    for task, model in teachers_of(s).items():
        plan += [("teacher", f"teacher-{task}-{i}", {**flags["teacher"], "model": model, "teacher_id": task})
                 for i in range(s.teachers)]
    plan += [("rollout", f"rollout-{i}", flags["rollout"]) for i in range(s.rollouts)]
    for service, name, f in plan:
        launcher.start(service, name, {**f, "replica": name, "http_port": port})
        port += 1


def progress(stats: dict[str, str], s: DemoSettings) -> str:
    """One line: step, held-out accuracy per task, share of trained trajectories per task."""
    curve = json.loads(stats.get("eval_curve", "[]") or "[]")
    teachers = json.loads(stats.get("teachers", "{}") or "{}")
    total = sum(t["trajectories"] for t in teachers.values()) or 1
    held = "  ".join(f"{t} {v:.3f}" for t, v in curve[-1].get("by_teacher", {}).items()) if curve else ""
    share = " / ".join(f"{t} {100 * teachers[t]['trajectories'] / total:.0f}%" for t in sorted(teachers))
    return (f"step {stats.get('step', 0):>4}/{s.steps}  held-out {held or '-'} (step {curve[-1]['step'] if curve else '-'})"
            f"  trained {share}")


def summarize(stats: dict[str, str], acc: dict[str, dict[str, float]], s: DemoSettings) -> dict[str, Any]:
    """Per task: the student before/after, its own teacher and the other task's teacher."""
    from services.demo import run_summary

    summary = run_summary(stats, s)
    summary["mode"] = f"multi-teacher, {summary['mode']}"
    teachers = json.loads(stats.get("teachers", "{}") or "{}")
    summary["tasks"] = {
        t: {"student_before": acc["before"][t], "student_after": acc["after"][t], "teacher": acc[t][t],
            "other_teacher": acc[other][t], "teacher_model": teachers_of(s)[t],
            "trained_trajectories": teachers.get(t, {}).get("trajectories", 0)}
        for t, other in zip(TASKS, reversed(TASKS))}
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print("\n== OPD multi-teacher demo summary ==")
    print(f"  {summary['mode']}, {summary['steps']} steps, {summary['train_seconds']} s, "
          f"{summary['trajectories_per_s']} traj/s, dead letters {summary['dead_letters']}")
    print(f"  {'task':<10} {'student before':>15} {'student after':>14} {'its teacher':>12} "
          f"{'other teacher':>14} {'after/teacher':>14} {'trained':>8}")
    for task, r in summary["tasks"].items():
        ratio = r["student_after"] / r["teacher"] if r["teacher"] else 0.0
        print(f"  {task:<10} {r['student_before']:>15.3f} {r['student_after']:>14.3f} {r['teacher']:>12.3f} "
              f"{r['other_teacher']:>14.3f} {ratio:>13.3f}x {r['trained_trajectories']:>8}")


def plot_curves(summary: dict[str, Any], path: Path) -> Path | None:
    """Held-out accuracy per task vs steps and vs wall time, with each task's teacher."""
    from services.demo import plot_accuracy

    curve = [c for c in summary["eval_curve"] if "by_teacher" in c]
    if not curve:
        return None

    def draw(ax: Any, key: str) -> None:
        for color, (task, r) in zip(("tab:blue", "tab:orange"), summary["tasks"].items()):
            ax.plot([c[key] for c in curve], [c["by_teacher"].get(task, 0.0) for c in curve], marker=".",
                    color=color, label=f"student on {task}")
            ax.axhline(r["teacher"], color=color, ls="--", label=f"{task} teacher")
    return plot_accuracy(summary, path, "greedy exact match (held-out)", draw)


def run(s: DemoSettings, launcher: Launcher, client, keys, run_dir: Path) -> dict[str, Any]:
    """The multi-teacher demo inside run_demo's Redis and launcher."""
    from services.demo import watch

    print("evaluating the initial student and both teachers on both tasks...", flush=True)
    acc = {"before": evaluate_tasks(s.student, s.eval_n)}
    acc.update({task: evaluate_tasks(model, s.eval_n) for task, model in teachers_of(s).items()})
    for task in TASKS:
        print(f"  {task}: student {acc['before'][task]:.3f}, its teacher {acc[task][task]:.3f}", flush=True)
    print(f"starting {s.rollouts} rollout(s), {s.teachers} teacher(s) per task, 1 learner", flush=True)
    started = time.monotonic()
    start_all(launcher, s, run_dir)
    stats = watch(launcher, client, keys, s, lambda st: progress(st, s))
    launcher.stop()
    acc["after"] = evaluate_tasks(str(run_dir / "student"), s.eval_n)
    summary = summarize(stats, acc, s)
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    if (plot := plot_curves(summary, run_dir / "accuracy.png")) is not None:
        print(f"  accuracy plot: {plot}")
    return summary
