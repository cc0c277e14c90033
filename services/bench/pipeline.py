"""Async vs strictly synchronous pipeline throughput, measured side by side in one run.

Runs the real services (same launcher as `opd demo`) twice with identical settings:
max_staleness = 0 (synchronous) and max_staleness = S (asynchronous). Throughput counts
steps 2..N (start-up excluded). Per-stage busy time per step, over the same steps, comes from
each replica's status report (R rollout, T teacher, L learner; the learner snapshots all
reports at its first and last steps): the ideal async speed-up of a pipeline
over the synchronous loop is (R+T+L)/max(R,T,L); the synchronous step time beyond R+T+L
is pipeline overhead, split into the parts the services time themselves (codec: encode and
decode; weights: save + announce + load; checkpoint) and the rest: Redis round trips,
wake-ups and scheduling.
"""

from __future__ import annotations

import json
import time
from collections import Counter
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
    from shared.keys import Keys
    from shared.streams import read_stats
    from shared.redis_client import connect

    run = f"bench-s{max_staleness}-{int(time.time())}"
    launcher = Launcher(env={"REDIS_URL": url, "OPD_RUN": run}, log_dir=run_dir / run / "logs")
    common = {"weights_dir": run_dir / run / "weights", "torch_threads": s.torch_threads,
              "device": s.device, "http_port": 0}
    try:
        launcher.start("learner", "learner", {**common, "model": s.student, "batch_size": s.batch_size,
                       "max_staleness": max_staleness, "max_steps": s.steps, "procs": s.learner_procs,
                       "output_dir": run_dir / run / "student", "losses": json.dumps(s.losses),
                       "checkpoint_dir": run_dir / run / "checkpoints"})
        launcher.start("teacher", "teacher", {**common, "model": s.teacher, "batch_size": s.batch_size,
                                              "backend": s.engine})
        for i in range(s.rollouts):
            launcher.start("rollout", f"rollout-{i}", {**common, "model": s.student, "backend": s.engine,
                           "batch_size": s.batch_size // s.rollouts, "max_new_tokens": s.max_new_tokens})
        _wait(launcher, s.timeout_s)
    finally:
        launcher.stop(grace_s=15)
    client = connect(url)
    stats = read_stats(client, Keys(run))
    replicas = {k.decode(): json.loads(v) for k, v in client.hgetall(Keys(run).replicas).items()}
    return summarize(stats, replicas, max_staleness)


def _since_first_step(replicas: dict[str, dict[str, Any]], first: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each replica's busy and overhead seconds after the learner's first step (the window
    throughput is measured over), divided by its service's replica count: replicas of one
    service split a batch and run side by side. A replica that had not reported by then, or
    restarted since (a counter went down), counts from 0."""
    def delta(now: float, before: float) -> float:
        return now - before if now >= before else now

    count = Counter(r["service"] for r in replicas.values())
    out = []
    for name, r in replicas.items():
        before, n = first.get(name, {}), count[r["service"]]
        old = before.get("overhead_s", {})
        out.append({"service": r["service"], "busy_s": delta(r["busy_s"], before.get("busy_s", 0.0)) / n,
                    "overhead_s": {p: delta(s, old.get(p, 0.0)) / n for p, s in r.get("overhead_s", {}).items()}})
    return out


def summarize(stats: dict[str, str], replicas: dict[str, dict[str, Any]], max_staleness: int) -> dict[str, Any]:
    steps = int(stats["step"])
    span = float(stats["updated_at"]) - float(stats["first_step_at"])
    trajs = int(stats["trained_trajectories"]) - int(stats["first_step_trajectories"])
    tokens = int(stats["trained_tokens"]) - int(stats["first_step_tokens"])
    # at the learner's last step, like the first (a run without max_steps has none: final reports)
    last = json.loads(stats["last_step_replicas"])
    window = _since_first_step({name: last.get(name, r) for name, r in replicas.items()},
                               json.loads(stats["first_step_replicas"]))
    measured = max(1, steps - 1)
    busy = {svc: sum(r["busy_s"] for r in window if r["service"] == svc) / measured
            for svc in ("rollout", "teacher", "learner")}
    parts = {part for r in window for part in r["overhead_s"]}
    overhead = {part: sum(r["overhead_s"].get(part, 0.0) for r in window) / measured
                for part in sorted(parts)}
    lags = [r for r in replicas.values() if r["service"] == "rollout" and r.get("weight_loads")]
    return {
        "max_staleness": max_staleness, "steps": steps, "measured_steps": measured,
        "seconds": span, "step_s": span / measured,
        "trajectories_per_s": trajs / span, "tokens_per_s": tokens / span,
        "busy_per_step_s": busy, "overhead_per_step_s": overhead,
        "weight_lag_mean_s": sum(r["weight_lag_mean_s"] * r["weight_loads"] for r in lags)
        / max(1, sum(r["weight_loads"] for r in lags)),
        "weight_lag_max_s": max((r["weight_lag_max_s"] for r in lags), default=None),
        "staleness": json.loads(stats["staleness"]),
    }


def compare(sync: dict[str, Any], async_: dict[str, Any], cpus: int | None = None) -> dict[str, Any]:
    """Speed-up achieved vs the ideal pipeline bound, and the sync loop's overhead share.

    With `cpus` (services on CPU, one torch thread each), a machine bound too: the sync step's
    CPU work (stages plus the timed overhead parts) spread over `cpus` cores. Approximate:
    the untimed rest of the step is taken as waiting, and contention is ignored."""
    b = sync["busy_per_step_s"]
    stages = b["rollout"] + b["teacher"] + b["learner"]
    bound = stages / max(b.values())
    speedup = async_["trajectories_per_s"] / sync["trajectories_per_s"]
    step = sync["step_s"]
    parts = dict(sync["overhead_per_step_s"])
    work = stages + sum(parts.values())
    machine = step / max(max(b.values()), work / cpus) if cpus else bound
    parts["redis, wake-ups, scheduling"] = step - work
    return {"speedup": speedup, "ideal_bound": bound, "fraction_of_bound": speedup / bound,
            "cpus": cpus, "machine_bound": min(bound, machine),
            "fraction_of_machine_bound": speedup / min(bound, machine),
            "sync_stage_sum_s": stages, "sync_step_s": step,
            "sync_overhead_share": max(0.0, step - stages) / step,
            "sync_overhead_parts_s": parts}
