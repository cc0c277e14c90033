"""`opd bench learner --learner-procs N`: learner step time on 1 vs N ranks, the same data.

The learner alone (no rollout, no teacher): `steps` batches of synthetic scored
trajectories (random prompts, completions and teacher top-k of the student's vocabulary,
weight version 0, max_staleness above the step count so none is dropped) are written to
the scored stream of a fresh run, and `opd-learner --procs P` trains on them, once with
P = 1 and once with P = N (torchrun: NCCL over N GPUs, gloo over N CPU processes).
Measured over steps 2..steps: the train step (the learner's busy time: forward, backward,
AdamW over all ranks) and the whole step (plus rank 0's collecting, publishing and
checkpointing). Speed-up = 1-rank time / N-rank time on the same global batch; scaling
efficiency = speed-up / N.

    opd bench learner --learner-procs 2 --steps 20 --batch-size 32 --max-new-tokens 64
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.launcher import Launcher
from shared.keys import Keys
from shared.wire import Prompt, ScoredTrajectory, TeacherScores, Trajectory, tail_mass


def synthetic_batches(steps: int, batch: int, vocab: int, top_k: int, tokens: int, seed: int = 0,
                      prefix: str = "") -> list[list[ScoredTrajectory]]:
    """`steps` batches of `batch` scored trajectories of 1..`tokens` completion tokens (prompts
    2..8 tokens), teacher top-k normalised with its tail; ids unique (`prefix` + counter)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        rows = []
        for i in range(batch):
            t = int(rng.integers(1, tokens + 1))
            comp = rng.integers(0, vocab, t).astype(np.int32)
            prompt = Prompt(f"{prefix}p{s}-{i}", rng.integers(0, vocab, int(rng.integers(2, 9))).astype(np.int32),
                            "", 0)
            traj = Trajectory(f"{prefix}t{s}-{i}", prompt, comp, -rng.random(t).astype(np.float32),
                              np.zeros(t, np.int32))
            lp = np.sort(np.log(rng.dirichlet(np.ones(top_k + 1), t)[:, :top_k]), axis=1)[:, ::-1].astype(np.float32)
            rows.append(ScoredTrajectory(traj, TeacherScores(rng.integers(0, vocab, (t, top_k)).astype(np.int32), lp,
                                                             tail_mass(lp), -rng.random(t).astype(np.float32))))
        out.append(rows)
    return out


def feed(client, keys: Keys, batches: list[list[ScoredTrajectory]], top_k: int) -> None:
    """Write batches to the run's scored stream as the teachers would: the run's record claimed
    (top-k width, no draws, no MC samples) and each counted as a trajectory handed off."""
    from shared.run_record import claim
    from shared.streams import produce
    from shared.wire import encode

    claim(client, keys, {"top_k": top_k, "draws": 0, "mc_samples": 1})
    for batch in batches:
        produce(client, keys.scored, [encode(m) for m in batch], counter=keys.trajectories)


def run_learner(url: str, procs: int, s: Any, run_dir: Path, batches: list[list[ScoredTrajectory]],
                top_k: int) -> dict[str, Any]:
    """One learner run on `procs` ranks over `batches`; its step times (steps 2..N)."""
    from shared.streams import read_stats
    from shared.redis_client import connect

    run = f"bench-learner-{procs}-{int(time.time())}"
    keys = Keys(run)
    client = connect(url)
    feed(client, keys, batches, top_k)
    launcher = Launcher(env={"REDIS_URL": url, "OPD_RUN": run}, log_dir=run_dir / run / "logs")
    flags = {"weights_dir": run_dir / run / "weights", "torch_threads": s.torch_threads, "device": s.device,
             "http_port": 0, "model": s.student, "batch_size": s.batch_size, "max_steps": len(batches),
             "max_staleness": len(batches) + 1, "procs": procs, "output_dir": run_dir / run / "student",
             "checkpoint_dir": run_dir / run / "checkpoints", "losses": json.dumps(s.losses)}
    try:
        launcher.start("learner", "learner", flags)
        _wait(launcher, s.timeout_s)
    finally:
        launcher.stop(grace_s=15)
    return step_times(read_stats(client, keys), procs)


def _wait(launcher: Launcher, timeout_s: float) -> None:
    learner, deadline = launcher.children[0], time.monotonic() + timeout_s
    while learner.proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError("learner did not finish in time")
        time.sleep(0.2)
    launcher.raise_if_failed()


def step_times(stats: dict[str, str], procs: int) -> dict[str, Any]:
    """Train-step and whole-step seconds over steps 2..N, from the learner's own snapshots."""
    def busy(snapshot: str) -> float:
        return next(r["busy_s"] for r in json.loads(snapshot).values() if r["service"] == "learner")

    measured = max(1, int(stats["step"]) - 1)
    return {"procs": procs, "steps": int(stats["step"]), "measured_steps": measured,
            "train_step_s": (busy(stats["last_step_replicas"]) - busy(stats["first_step_replicas"])) / measured,
            "step_s": (float(stats["updated_at"]) - float(stats["first_step_at"])) / measured}


def compare(one: dict[str, Any], many: dict[str, Any]) -> dict[str, Any]:
    """Speed-up and scaling efficiency of the N-rank learner over the 1-rank one."""
    n = many["procs"]
    train, whole = one["train_step_s"] / many["train_step_s"], one["step_s"] / many["step_s"]
    return {"train_speedup": train, "train_efficiency": train / n, "step_speedup": whole, "step_efficiency": whole / n}


def run(url: str, s: Any, run_dir: Path) -> dict[str, Any]:
    """Both runs on the same synthetic batches (ids the student's tokenizer can decode)."""
    from transformers import AutoConfig

    from shared.models import load_tokenizer, resolve_model

    vocab = min(len(load_tokenizer(s.student)), AutoConfig.from_pretrained(resolve_model(s.student)).vocab_size)
    top_k = min(s.codec_top_k, vocab)
    batches = synthetic_batches(s.steps, s.batch_size, vocab, top_k, s.max_new_tokens)
    one = run_learner(url, 1, s, run_dir, batches, top_k)
    many = run_learner(url, s.learner_procs, s, run_dir, batches, top_k)
    return {"one": one, "many": many, "comparison": compare(one, many)}
