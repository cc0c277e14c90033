"""Smoke: a JSONL chat dataset with numeric answers trains end to end with the numeric verifier.

Real learner + teacher + rollout processes on the built-in tiny models (which are no good at
chat: this checks the plumbing, not the accuracy): chat rows go through a chat template, the
numeric verifier grades the samples and the held-out eval file, the samples stream fills
with the rows' teacher ids, and `opd tail` prints its entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.launcher import Launcher
from shared.keys import Keys
from shared.redis_server import free_port
from tests.test_smoke import wait_until

pytestmark = [pytest.mark.smoke, pytest.mark.redis]
STEPS = 4
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


def chat_rows(pairs: list[tuple[int, int]]) -> str:
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": f"{a:03d}+{b:03d}"}],
                                 "answer": a + b, "teacher_id": "adder"}) for a, b in pairs) + "\n"


def test_chat_jsonl_with_numeric_answers_trains(tmp_path: Path, redis_server, client):
    keys = Keys("chat-smoke")
    (tmp_path / "train.jsonl").write_text(chat_rows([(i * 7 % 1000, i * 13 % 1000) for i in range(40)]))
    (tmp_path / "eval.jsonl").write_text(chat_rows([(i * 11 % 1000, i * 3 % 1000) for i in range(8)]))
    common = {"weights_dir": tmp_path / "weights", "torch_threads": 1, "device": "cpu"}
    env = {"REDIS_URL": redis_server.url, "OPD_RUN": keys.run}
    launcher = Launcher(env=env, log_dir=tmp_path / "logs")
    try:
        launcher.start("learner", "learner", {
            **common, "batch_size": 8, "max_steps": STEPS, "max_staleness": 2, "output_dir": tmp_path / "student",
            "prompt_backlog": 32, "checkpoint_dir": tmp_path / "ckpt", "http_port": free_port(),
            "prompts_file": tmp_path / "train.jsonl", "eval_file": tmp_path / "eval.jsonl", "eval_every": 2,
            "verifier": "numeric", "chat_template": TEMPLATE, "samples_every": 1, "samples_per_step": 2})
        launcher.start("teacher", "teacher", {**common, "batch_size": 8, "http_port": free_port(),
                                              "teacher_id": "adder"})  # the rows' teacher_id routes to it
        launcher.start("rollout", "rollout", {**common, "batch_size": 8, "http_port": free_port()})
        wait_until(lambda: client.hget(keys.stats, "status") == b"finished", 180, "the learner to finish", launcher)
        launcher.stop()
        assert not launcher.failed(), [launcher.tail(c) for c in launcher.failed()]
    finally:
        launcher.stop(grace_s=5)

    stats = {k.decode(): v.decode() for k, v in client.hgetall(keys.stats).items()}
    assert int(stats["step"]) == STEPS and int(stats["trained_trajectories"]) == 8 * STEPS
    curve = json.loads(stats["eval_curve"])  # the eval file, graded by the numeric verifier
    assert [p["step"] for p in curve] == [0, 2, 4] and all(0.0 <= p["accuracy"] <= 1.0 for p in curve)
    samples = [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(keys.samples)]
    assert len(samples) == 2 * STEPS and {s["step"] for s in samples} == {"1", "2", "3", "4"}
    for s in samples:
        # the prompt as the template rendered it; the reward is the numeric verifier's grade
        assert s["prompt"].endswith("=") and "+" in s["prompt"] and s["teacher_id"] == "adder"
        assert s["reward"] in ("0.0", "1.0") and s["answer"].isdigit() and s["teacher"]
    out = subprocess.run([sys.executable, "-m", "services.cli", "tail", "-n", "3"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("teacher_id adder") == 3 and "completion:" in out.stdout
    assert f"step {STEPS}" in out.stdout.splitlines()[-4]  # the newest entry comes last
    log = (tmp_path / "logs" / "learner.log").read_text()
    assert "sample step 1 reward" in log and "held-out accuracy" in log


def test_a_bad_row_stops_the_learner_before_it_publishes(tmp_path: Path, redis_server, client):
    keys = Keys("bad-row")
    bad = tmp_path / "train.jsonl"
    bad.write_text(chat_rows([(1, 2)]) + '{"messages": [{"role": "user", "content": "1+1"}], "answer": [2]}\n')
    launcher = Launcher(env={"REDIS_URL": redis_server.url, "OPD_RUN": keys.run}, log_dir=tmp_path / "logs")
    try:
        learner = launcher.start("learner", "learner", {
            "weights_dir": tmp_path / "weights", "device": "cpu", "http_port": free_port(), "prompts_file": bad,
            "checkpoint_dir": tmp_path / "ckpt", "chat_template": TEMPLATE})
        assert learner.proc.wait(timeout=60) == 1
    finally:
        launcher.stop(grace_s=5)
    lines = (tmp_path / "logs" / "learner.log").read_text().splitlines()
    assert lines[-1] == f"opd-learner: {bad}:2: field 'answer': need a string or a number, got list"
    assert not any(client.exists(k) for k in keys.all()) and not (tmp_path / "ckpt").exists()
