"""Async vs strictly synchronous pipeline throughput, measured side by side in one run.

Runs the real services (same launcher as `opd demo`) twice with identical settings:
max_staleness = 0 (synchronous) and max_staleness = S (asynchronous). Throughput counts
steps 2..N (start-up excluded). Per-stage busy time per step comes from each replica's
status report (R rollout, T teacher, L learner): the ideal async speed-up of a pipeline
over the synchronous loop is (R+T+L)/max(R,T,L); the synchronous step time beyond R+T+L
is pipeline overhead, split into the parts the services time themselves (codec: encode and
decode; weights: save + announce + load; checkpoint) and the rest: Redis round trips,
wake-ups and scheduling.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from services.launcher import Launcher


def _wait(launcher: Launcher, timeout_s: float) -> None:
    learner = launcher.children[0]
    deadline = time.monotonic() + timeout_s
    while learner.proc.poll() is None:
        launcher.raise_if_failed()
        if time.monotonic() > deadline:
            raise TimeoutError("learner did not finish in time")
        time.sleep(0.2)
    launcher.raise_if_failed()


def run_mode(url: str, max_staleness: int, s: Any, run_dir: Path) -> dict[str, Any]:
    """One pipeline run; returns throughput, per-stage busy time per step and weight lag."""
    from shared.streams import Keys, connect, read_stats

    run = f"bench-s{max_staleness}-{int(time.time())}"
    launcher = Launcher(env={"REDIS_URL": url, "OPD_RUN": run}, log_dir=run_dir / run / "logs")
    common = {"weights_dir": run_dir / run / "weights", "torch_threads": s.torch_threads,
              "device": s.device, "http_port": 0}
    try:
        launcher.start("learner", "learner", {**common, "model": s.student, "batch_size": s.batch_size,
                       "max_staleness": max_staleness, "max_steps": s.steps,
                       "output_dir": run_dir / run / "student", "losses": json.dumps(s.losses),
                       "checkpoint_dir": run_dir / run / "checkpoints"})
        launcher.start("teacher", "teacher", {**common, "model": s.teacher, "batch_size": s.batch_size})
        for i in range(s.rollouts):
            launcher.start("rollout", f"rollout-{i}", {**common, "model": s.student,
                           "batch_size": s.batch_size // s.rollouts, "max_new_tokens": s.max_new_tokens})
        _wait(launcher, s.timeout_s)
    finally:
        launcher.stop(grace_s=15)
    client = connect(url)
    stats = read_stats(client, Keys(run))
    replicas = [json.loads(v) for v in client.hgetall(Keys(run).replicas).values()]
    return summarize(stats, replicas, max_staleness)


def summarize(stats: dict[str, str], replicas: list[dict[str, Any]], max_staleness: int) -> dict[str, Any]:
    steps = int(stats["step"])
    span = float(stats["updated_at"]) - float(stats["first_step_at"])
    trajs = int(stats["trained_trajectories"]) - int(stats["first_step_trajectories"])
    tokens = int(stats["trained_tokens"]) - int(stats["first_step_tokens"])
    busy = {svc: sum(r["busy_s"] for r in replicas if r["service"] == svc) / steps
            for svc in ("rollout", "teacher", "learner")}
    parts = {part for r in replicas for part in r.get("overhead_s", {})}
    overhead = {part: sum(r.get("overhead_s", {}).get(part, 0.0) for r in replicas) / steps
                for part in sorted(parts)}
    lags = [r for r in replicas if r["service"] == "rollout" and r.get("weight_loads")]
    return {
        "max_staleness": max_staleness, "steps": steps, "measured_steps": steps - 1,
        "seconds": span, "step_s": span / max(1, steps - 1),
        "trajectories_per_s": trajs / span, "tokens_per_s": tokens / span,
        "busy_per_step_s": busy, "overhead_per_step_s": overhead,
        "weight_lag_mean_s": sum(r["weight_lag_mean_s"] * r["weight_loads"] for r in lags)
        / max(1, sum(r["weight_loads"] for r in lags)),
        "weight_lag_max_s": max((r["weight_lag_max_s"] for r in lags), default=None),
        "staleness": json.loads(stats["staleness"]),
    }


def compare(sync: dict[str, Any], async_: dict[str, Any]) -> dict[str, Any]:
    """Speed-up achieved vs the ideal pipeline bound, and the sync loop's overhead share."""
    b = sync["busy_per_step_s"]
    stages = b["rollout"] + b["teacher"] + b["learner"]
    bound = stages / max(b.values())
    speedup = async_["trajectories_per_s"] / sync["trajectories_per_s"]
    step = sync["step_s"]
    parts = dict(sync["overhead_per_step_s"])
    parts["redis, wake-ups, scheduling"] = step - stages - sum(parts.values())
    return {"speedup": speedup, "ideal_bound": bound, "fraction_of_bound": speedup / bound,
            "sync_stage_sum_s": stages, "sync_step_s": step,
            "sync_overhead_share": max(0.0, step - stages) / step,
            "sync_overhead_parts_s": parts}
