"""The torchrun learner (2 gloo ranks on CPU, FSDP2) against the single-process one, with real
processes, a real Redis and the built-in tiny student.

One scenario, two runs on the same 8 batches of synthetic scored trajectories:

- run A: 1 process trains steps 1-4 and stops; restarted on 2 ranks it trains 5-8;
- run B: 2 ranks train while the test feeds batches; rank 1 is killed (-9) after step 3;
  the learner must end promptly, non-zero; restarted as 1 process it resumes from its
  checkpoint and trains to step 8.

So every published version of A and B, before and after the restarts, comes from the same
data: 2 ranks must publish what 1 process publishes (float32 tolerance), each restore
must reproduce its checkpoint exactly on the other world size, and run B must account
for every trajectory exactly once (tests/test_faults.py accounting).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.bench.learner import feed, synthetic_batches
from services.launcher import Child, Launcher
from shared.keys import Keys
from shared.redis_client import connect
from test_faults import accounting

pytestmark = [pytest.mark.smoke, pytest.mark.redis]
STEPS, HALF, BATCH, TOP_K, VOCAB = 8, 4, 4, 8, 15  # VOCAB: the built-in student's
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # float32: 2 ranks add the same gradients in another order
KILL_AFTER = 3


@dataclass
class Scenario:
    client: object
    a: Keys
    b: Keys
    root: Path
    kill_version: int = 0
    exit_after_kill_s: float = 0.0
    killed: Child | None = None
    saved: dict[str, Path] = field(default_factory=dict)  # checkpoints the restarts resumed from
    logs: dict[str, str] = field(default_factory=dict)


def flags(root: Path, name: str, procs: int, max_steps: int, checkpoint_every: int = 2) -> dict[str, object]:
    """checkpoint_every 100 after a restart: the restore's own checkpoint stays on disk (2 are kept)."""
    return {"weights_dir": root / name / "weights", "checkpoint_dir": root / name / "ckpt",
            "output_dir": root / name / "student", "torch_threads": 1, "device": "cpu", "http_port": 0,
            "reclaim_idle_s": 2, "batch_size": BATCH, "max_steps": max_steps, "max_staleness": STEPS + 1,
            "checkpoint_every": checkpoint_every, "prompt_backlog": 8, "keep_versions": 100, "procs": procs,
            "lr": 1e-3}  # TOLERANCE is for steps of this size (fkl_topk's default, 3e-3, drifts 1.7e-6 in 8 steps)


def version(client, keys: Keys) -> int:
    return int(client.get(keys.version) or 0)


def rank_pid(torchrun: Child, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    children = Path(f"/proc/{torchrun.proc.pid}/task/{torchrun.proc.pid}/children").read_text().split()
    for pid in children:
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no rank {rank} among torchrun's children {children}")


def wait(launcher: Launcher, child: Child, timeout_s: float = 120) -> int:
    try:
        return child.proc.wait(timeout=timeout_s)
    except Exception:
        raise AssertionError(f"{child.name} did not finish:\n{launcher.tail(child)}") from None


def kill_rank_mid_run(s: Scenario, launcher: Launcher, learner: Child, batches) -> None:
    """Feed run B two batches ahead of its learner; after step KILL_AFTER kill -9 its rank 1."""
    fed, deadline = 0, time.monotonic() + 120
    while version(s.client, s.b) < KILL_AFTER:
        assert learner.proc.poll() is None and time.monotonic() < deadline, launcher.tail(learner)
        if fed < min(STEPS, version(s.client, s.b) + 2):
            feed(s.client, s.b, batches[fed:fed + 1], TOP_K)
            fed += 1
        time.sleep(0.02)
    os.kill(rank_pid(learner, 1), signal.SIGKILL)
    killed_at, s.kill_version = time.monotonic(), version(s.client, s.b)
    wait(launcher, learner, 60)
    s.exit_after_kill_s, s.killed = time.monotonic() - killed_at, learner
    feed(s.client, s.b, batches[fed:], TOP_K)


def save_latest(s: Scenario, name: str) -> None:
    from services.learner.checkpoint import latest

    ckpt = latest(s.root / name / "ckpt")
    s.saved[name] = shutil.copytree(ckpt, s.root / "saved" / name / ckpt.name)


@pytest.fixture(scope="module")
def scenario(redis_server, tmp_path_factory) -> Scenario:
    tag = uuid.uuid4().hex[:6]
    s = Scenario(connect(redis_server.url), Keys(f"dist-a-{tag}"), Keys(f"dist-b-{tag}"),
                 tmp_path_factory.mktemp("distributed"))
    batches = synthetic_batches(STEPS, BATCH, VOCAB, TOP_K, tokens=6, seed=1)
    feed(s.client, s.a, batches, TOP_K)
    launchers = {n: Launcher(env={"REDIS_URL": redis_server.url, "OPD_RUN": k.run}, log_dir=s.root / n / "logs")
                 for n, k in (("a", s.a), ("b", s.b))}
    try:
        a1 = launchers["a"].start("learner", "a1", flags(s.root, "a", 1, HALF))
        b1 = launchers["b"].start("learner", "b1", flags(s.root, "b", 2, STEPS))
        kill_rank_mid_run(s, launchers["b"], b1, batches)
        assert wait(launchers["a"], a1) == 0, launchers["a"].tail(a1)
        save_latest(s, "a")
        save_latest(s, "b")
        a2 = launchers["a"].start("learner", "a2", flags(s.root, "a", 2, STEPS, 100))
        b2 = launchers["b"].start("learner", "b2", flags(s.root, "b", 1, STEPS, 100))
        for launcher, child in ((launchers["a"], a2), (launchers["b"], b2)):
            assert wait(launcher, child) == 0, launcher.tail(child, 60)
    finally:
        for launcher in launchers.values():
            launcher.stop(grace_s=5)
    s.logs = {c.name: c.log_path.read_text(errors="replace") for lc in launchers.values() for c in lc.children}
    return s


def weights(s: Scenario, run: str, v: int, epoch: int = 0) -> dict[str, torch.Tensor]:
    return load_file(s.root / run / "weights" / (f"v{v:06d}" + (f".e{epoch}" if epoch else "")) / "model.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance) -> float:
    """Equal tensors (same keys) within tolerance; returns the largest absolute difference."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tolerance, msg=lambda m, k=k: f"{k}: {m}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_publish_what_one_process_publishes(scenario: Scenario):
    s = scenario
    assert s.kill_version >= KILL_AFTER
    diffs = [assert_same(weights(s, "a", v), weights(s, "b", v), **TOLERANCE)  # B: 2 ranks, A: 1 process
             for v in range(1, min(s.kill_version, HALF) + 1)]
    final = assert_same(weights(s, "a", STEPS, epoch=1), weights(s, "b", STEPS, epoch=1), **TOLERANCE)
    assert assert_same(weights(s, "a", 0), weights(s, "a", 1), rtol=0, atol=1) > 1e-5  # it trains
    # AdamW is blind to a gradient's scale; its moments and the step's metrics are not
    # (step 8: A on 2 ranks, B on 1 process)
    a, b = (load_file(s.root / r / "ckpt" / f"step-{STEPS:06d}.e1" / "optimizer.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys()
    moments = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)  # elements near 0 differ more
    assert moments < 1e-5, moments
    ma, mb = (json.loads(s.client.hget(k.stats, "metrics")) for k in (s.a, s.b))
    for key in ("loss/total", "kl/forward_topk", "grad_norm"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-5), key
    print(f"\nmax |2 ranks - 1 process| of the weights per version: {diffs}; after both restarts: {final:.2e}; "
          f"of AdamW's state at step {STEPS}, relative (L2): {moments:.2e}")


def test_a_killed_rank_ends_the_whole_learner_promptly(scenario: Scenario):
    s = scenario
    assert s.killed.proc.returncode != 0
    assert s.exit_after_kill_s < 30, s.exit_after_kill_s  # torchrun's shutdown timeout: nobody hung
    log = s.logs["b1"]
    assert "exitcode  : -9" in log and "(SIGKILL)" in log, log[-3000:]
    stats = {k.decode(): v.decode() for k, v in s.client.hgetall(s.b.stats).items()}
    assert stats["status"] == "finished" and int(stats["step"]) == STEPS
    print(f"\nrank 1 killed at version {s.kill_version}; torchrun exited {s.killed.proc.returncode} "
          f"after {s.exit_after_kill_s:.2f}s")


def test_the_restarted_learner_trains_every_trajectory_exactly_once(scenario: Scenario):
    from services.learner.checkpoint import latest

    s = scenario
    resumed = s.saved["b"].name
    assert f"resumed from {s.root / 'b' / 'ckpt' / resumed} at version {int(resumed[5:11])}" in s.logs["b2"]
    state = json.loads((latest(s.root / "b" / "ckpt") / "state.json").read_text())
    stats = {k.decode(): v.decode() for k, v in s.client.hgetall(s.b.stats).items()}
    assert len(state["consumed"]) == int(stats["trained_trajectories"]) == STEPS * BATCH
    outcome = accounting(s.client, s.b, state["consumed"])
    assert outcome["trained"] == outcome["trajectories_produced"] == STEPS * BATCH, outcome


@pytest.mark.parametrize("run", ["a", "b"])
def test_a_checkpoint_resumes_exactly_on_another_world_size(scenario: Scenario, run: str):
    """A: 1 process's checkpoint restored on 2 ranks; B: 2 ranks' restored on 1 process. The
    restored learner checkpoints at once (its new epoch): the same tensors, bit for bit."""
    s = scenario
    before = s.saved[run]
    after = s.root / run / "ckpt" / f"{before.name}.e1"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_same(load_file(before / name), load_file(after / name), rtol=0, atol=0)
    old, new = (json.loads((p / "state.json").read_text()) for p in (before, after))
    assert old["version"] == new["version"] and old["consumed"] == new["consumed"]
    assert len(load_file(before / "optimizer.safetensors")) == 3 * 20  # step, exp_avg, exp_avg_sq x params


def test_sharded_steps_equal_one_process_for_every_objective(tmp_path):
    """Trainer steps on 2 ranks (FSDP2, DDP) vs 1 process in float64 (tests/distributed_step.py)."""
    import subprocess
    import sys

    out, root = tmp_path / "steps.json", Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(root / "tests" / "distributed_step.py"), str(out)], cwd=root, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 9
    for case, r in results.items():
        assert r["max_diff"] < 1e-12 < 1e-3 < r["moved"], (case, r["max_diff"], r["moved"])
        alone, sharded = r["alone"], r["sharded"]
        assert alone.pop("microbatches") == r["passes"] and sharded.pop("microbatches") >= 1
        assert sharded == pytest.approx(alone, rel=1e-12, abs=1e-15), case
    print(f"\nfloat64, max |2 ranks - 1 process| of the weights over {len(results)} cases: "
          f"{max(r['max_diff'] for r in results.values()):.1e}")
