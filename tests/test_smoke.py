"""Smoke: the real service entry points, as separate processes, on the built-in tiny models.

Runs learner + teacher + rollout for a few steps against a real Redis and checks that the
student's weights and version changed, health and metrics are served, and that once the
services stop no message is left pending in any consumer group.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from services.launcher import Launcher
from shared.models import builtin_path
from shared.redis_server import free_port
from shared.keys import GROUPS, Keys

pytestmark = [pytest.mark.smoke, pytest.mark.redis]
STEPS = 3


def wait_until(cond, timeout_s: float, what: str, launcher: Launcher):
    deadline = time.monotonic() + timeout_s
    while not cond():
        failed = launcher.failed()
        if failed:
            raise AssertionError(f"{failed[0].name} died:\n{launcher.tail(failed[0])}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_services_train_for_a_few_steps(tmp_path: Path, redis_server, client):
    keys = Keys("smoke")
    ports = {name: free_port() for name in ("learner", "teacher", "rollout")}
    common = {"weights_dir": tmp_path / "weights", "torch_threads": 1, "device": "cpu"}
    launcher = Launcher(env={"REDIS_URL": redis_server.url, "OPD_RUN": keys.run},
                        log_dir=tmp_path / "logs")
    try:
        launcher.start("learner", "learner", {**common, "batch_size": 8, "max_steps": STEPS,
                       "max_staleness": 1, "output_dir": tmp_path / "student", "prompt_backlog": 64,
                       "checkpoint_dir": tmp_path / "ckpt", "idle_when_done": True,
                       "http_port": ports["learner"]})
        launcher.start("teacher", "teacher", {**common, "batch_size": 8, "http_port": ports["teacher"]})
        launcher.start("rollout", "rollout", {**common, "batch_size": 4, "http_port": ports["rollout"]})
        # the learner publishes v0 right away, long before the rollout has loaded its model
        wait_until(lambda: client.get(keys.version) is not None, 120, "version 0", launcher)
        health = httpx.get(f"http://127.0.0.1:{ports['learner']}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["ok"] is True
        metrics = httpx.get(f"http://127.0.0.1:{ports['learner']}/metrics", timeout=5).text
        assert "opd_weight_version" in metrics and "opd_staleness_bucket" in metrics
        wait_until(lambda: int(client.get(keys.version) or 0) >= 1, 120, "the first step", launcher)
        health = httpx.get(f"http://127.0.0.1:{ports['rollout']}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["weight_version"] >= 0
        assert "opd_items_total" in httpx.get(f"http://127.0.0.1:{ports['rollout']}/metrics", timeout=5).text
        learner = launcher.children[0]
        wait_until(lambda: client.hget(keys.stats, "status") == b"finished", 120, "the learner to finish", launcher)
        time.sleep(1.5)  # done, and still up: healthy and idle (a deployment keeps scaling)
        health = httpx.get(f"http://127.0.0.1:{ports['learner']}/healthz", timeout=5)
        assert learner.proc.poll() is None and health.status_code == 200 and health.json()["state"] == "finished"
        launcher.stop()
        assert learner.proc.returncode == 0, launcher.tail(learner)
        assert not launcher.failed(), [launcher.tail(c) for c in launcher.failed()]
    finally:
        launcher.stop(grace_s=5)

    assert int(client.get(keys.version)) == STEPS
    stats = {k.decode(): v.decode() for k, v in client.hgetall(keys.stats).items()}
    assert stats["status"] == "finished" and int(stats["trained_trajectories"]) == 8 * STEPS
    staleness = json.loads(stats["staleness"])
    assert staleness["max"] <= 1 and sum(staleness["histogram"].values()) == 8 * STEPS
    reports = {r["service"]: r for r in map(json.loads, client.hgetall(keys.replicas).values())}
    for service, parts in {"rollout": ("codec", "weights"), "teacher": ("codec",),
                           "learner": ("codec", "weights", "checkpoint")}.items():
        assert reports[service]["busy_s"] > 0
        assert all(reports[service]["overhead_s"][part] > 0 for part in parts), reports[service]
    for stream_name, group in GROUPS.items():
        stream = getattr(keys, stream_name)
        assert client.xpending(stream, group)["pending"] == 0, f"{stream} has pending entries"
    before = load_file(str(Path(builtin_path("student")) / "model.safetensors"))
    after = load_file(str(tmp_path / "student" / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "the student's weights did not change"
    assert sorted(p.name for p in (tmp_path / "weights").iterdir())[-1] == f"v{STEPS:06d}"


def test_opd_demo_runs_end_to_end(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--steps", "2", "--batch-size", "8",
         "--rollout-batch-size", "4", "--rollouts", "1", "--eval-n", "40",
         "--run-dir", str(tmp_path), "--http-base-port", str(free_port())],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["trajectories_per_s"] > 0
    assert 0.0 <= summary["student_accuracy_after"] <= 1.0
    assert summary["teacher_accuracy"] > summary["student_accuracy_before"]
    assert "OPD demo summary" in out.stdout


def test_opd_demo_multi_teacher_runs_end_to_end(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--multi-teacher", "--steps", "4", "--batch-size", "8",
         "--rollout-batch-size", "4", "--rollouts", "1", "--eval-n", "20", "--eval-every", "2",
         "--eval-problems", "10", "--run-dir", str(tmp_path), "--http-base-port", str(free_port())],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["mode"].startswith("multi-teacher")
    tasks = summary["tasks"]
    assert set(tasks) == {"addition", "list"}
    assert sum(t["trained_trajectories"] for t in tasks.values()) == 4 * 8
    assert all(t["trained_trajectories"] > 0 for t in tasks.values())  # both pools scored their share
    for t in tasks.values():  # each teacher knows its own task, not the other's
        assert t["teacher"] >= 0.9 and t["other_teacher"] <= 0.2
    assert [set(c["by_teacher"]) for c in summary["eval_curve"]] == [{"addition", "list"}] * 3
    assert (tmp_path / "accuracy.png").exists() and "multi-teacher demo summary" in out.stdout
