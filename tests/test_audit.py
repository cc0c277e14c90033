"""`opd audit` against a real Redis: it balances a consistent run and names what breaks one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.audit import audit

pytestmark = pytest.mark.redis


def fake_run(client, keys, ckpt: Path, consumed: int, queued: int, dropped: int) -> None:
    step = ckpt / "step-000002"
    step.mkdir(parents=True)
    state = {"version": 2, "consumed": {f"t{i}": 1 for i in range(consumed // 2)},  # a pruned dedup window
             "tracker": {"trained": {"0": consumed - 3, "1": 3}}, "stats": {"duplicates": 1}}
    (step / "state.json").write_text(json.dumps(state))
    client.hset(keys.produced, keys.trajectories, consumed + queued + dropped)
    for i in range(queued):
        client.xadd(keys.scored, {"payload": b"x"})
    for i in range(dropped):
        client.xadd(keys.dead, {"reason": b"dropped: stale, staleness 5 (max 4)"})
    client.xadd(keys.dead, {"reason": b"invalid message: bad dtype"})
    client.hset(keys.stats, mapping={"step": 2, "trained_trajectories": consumed, "duplicates": 1})


def test_audit_balances_a_consistent_run(client, keys, tmp_path):
    fake_run(client, keys, tmp_path, consumed=16, queued=3, dropped=2)
    report, problems = audit(client, keys, tmp_path, batch_size=8)
    assert problems == []
    assert report == {"trajectories_produced": 21, "trained": 16, "dropped_stale_or_foreign": 2,
                      "abandoned_by_rollback": 0, "invalid_dead_letters": 1, "still_queued": 3,
                      "checkpoint_version": 2, "recent_ids_kept": 8, "duplicate_deliveries_skipped": 1}


def test_audit_names_a_lost_trajectory_and_a_counter_mismatch(client, keys, tmp_path, redis_server):
    fake_run(client, keys, tmp_path, consumed=16, queued=0, dropped=0)
    client.hincrby(keys.produced, keys.trajectories, 1)  # one handed off, found nowhere
    client.hset(keys.stats, "trained_trajectories", 17)  # the learner and its checkpoint disagree
    _, problems = audit(client, keys, tmp_path, batch_size=4)
    assert len(problems) == 3, problems
    cli = subprocess.run([sys.executable, "-m", "services.cli", "audit", "--checkpoint-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "REDIS_URL": redis_server.url, "OPD_RUN": keys.run})
    assert cli.returncode == 1 and "FAIL: produced != trained + dropped" in cli.stdout, cli.stdout + cli.stderr
