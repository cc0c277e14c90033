"""Fault injection with real processes and a real Redis: nothing lost, nothing trained twice.

kill -9 a teacher, a rollout replica and the learner mid-run (the learner is restarted and
resumes from its checkpoint), restart Redis (append-only persistence), inject malformed
messages into every stream. Afterwards every trajectory the rollouts handed off is trained
exactly once, recorded in the dead-letter stream, or still queued; every injected message
is in the dead-letter stream; and the run finishes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import msgpack
import pytest

from services.launcher import Launcher
from shared.redis_server import EmbeddedRedis
from shared.keys import Keys
from shared.streams import produce
from shared.redis_client import connect
from shared.wire import SCHEMA_VERSION

pytestmark = [pytest.mark.smoke, pytest.mark.redis]
STEPS, BATCH = 14, 8


def until(cond, timeout_s: float, what: str, launcher: Launcher) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        failed = [c for c in launcher.failed() if c.proc.returncode != -signal.SIGKILL]
        if failed:
            raise AssertionError(f"{failed[0].name} died:\n{launcher.tail(failed[0])}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def version(client) -> int:
    return int(client.get(KEYS.version) or 0)


KEYS = Keys("faults")


def malformed() -> list[bytes]:
    good_shape = [{"schema": SCHEMA_VERSION, "kind": "scored", "weight_version": 0}, b""]
    return [b"\xc1garbage", msgpack.packb({"schema": 99, "kind": "scored"}),
            msgpack.packb(good_shape), b"x" * 10]


def kill(launcher: Launcher, name: str) -> None:
    child = next(c for c in launcher.children if c.name == name and c.proc.poll() is None)
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait()


def test_pipeline_survives_faults(tmp_path: Path):
    server = EmbeddedRedis(data_dir=str(tmp_path / "redis"), persist=True, password="s3cret").start()
    client = connect(server.url)
    common = {"weights_dir": tmp_path / "weights", "torch_threads": 1, "device": "cpu",
              "reclaim_idle_s": 2, "http_port": 0}
    learner_flags = {**common, "batch_size": BATCH, "max_steps": STEPS, "max_staleness": 2,
                     "checkpoint_every": 2, "checkpoint_dir": tmp_path / "ckpt",
                     "output_dir": tmp_path / "student", "prompt_backlog": 16}
    launcher = Launcher(env={"REDIS_URL": server.url, "OPD_RUN": KEYS.run}, log_dir=tmp_path / "logs")
    faults: list[str] = []
    injected = 0
    try:
        launcher.start("learner", "learner", learner_flags)
        for i in range(2):
            launcher.start("teacher", f"teacher-{i}", {**common, "batch_size": 4})
            launcher.start("rollout", f"rollout-{i}", {**common, "batch_size": 4})
        until(lambda: version(client) >= 2, 180, "step 2", launcher)
        for stream in (KEYS.prompts, KEYS.trajectories, KEYS.scored):
            produce(client, stream, malformed())
            injected += len(malformed())
        faults.append(f"injected {injected} malformed messages")
        kill(launcher, "teacher-0")
        kill(launcher, "rollout-0")
        faults += ["kill -9 teacher-0", "kill -9 rollout-0"]
        until(lambda: version(client) >= 5, 180, "step 5 after replica kills", launcher)
        kill(launcher, "learner")
        launcher.start("learner", "learner-restarted", learner_flags)
        faults.append(f"kill -9 learner at version {version(client)}, restarted")
        until(lambda: version(client) >= 8, 180, "the restarted learner to progress", launcher)
        server.stop()
        time.sleep(1.0)
        server.start()
        faults.append("Redis restarted (append-only file)")
        learner = launcher.children[-1]
        until(lambda: learner.proc.poll() is not None, 240, "the run to finish", launcher)
        assert learner.proc.returncode == 0, launcher.tail(learner)
        launcher.stop()
    finally:
        launcher.stop(grace_s=5)
    try:
        report = account(client, tmp_path / "ckpt", injected)
    finally:
        server.close()
    print("\nfaults injected:", *faults, sep="\n  ")
    print("accounting:", json.dumps(report, indent=2))


def account(client, ckpt_dir: Path, injected: int) -> dict[str, int]:
    from services.learner.checkpoint import latest

    state = json.loads((latest(ckpt_dir) / "state.json").read_text())
    stats = {k.decode(): v.decode() for k, v in client.hgetall(KEYS.stats).items()}
    assert stats["status"] == "finished" and int(stats["step"]) == STEPS
    consumed = state["consumed"]  # trajectory id -> version trained at (a JSON map: unique ids)
    assert len(consumed) == int(stats["trained_trajectories"]) == STEPS * BATCH
    outcome = accounting(client, KEYS, consumed)
    report = {**outcome, "injected": injected, "duplicate_deliveries_skipped": int(stats["duplicates"])}
    assert outcome["invalid_dead_letters"] == injected, report
    return report


def accounting(client, keys: Keys, consumed: dict) -> dict[str, int]:
    """Where every trajectory the rollouts handed off ended up (services/audit.py), each
    outcome counted apart; asserts none is missing or counted twice."""
    from services.audit import accounting as outcomes, balanced

    out = outcomes(client, keys, len(consumed))  # short runs: the dedup window still holds every id
    assert balanced(out), out
    return out
