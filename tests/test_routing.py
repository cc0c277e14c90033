"""Multi-teacher routing on a real Redis: pools, parked slots, tokenizer refusal, two live pools.

Unit level (real Redis, no models): the pool survey (live replicas from status reports,
queued entries, down), what it publishes, and admission control not counting parked
trajectories. Process level (real learner, teacher and rollout processes, tiny built-in
models): a teacher with another tokenizer refuses to start; with two teacher pools each
trajectory goes to its own pool's stream and is scored by it, and killing one pool stalls
only its share: the learner keeps training the other's, the dead pool's work stays queued
and visible, and every trajectory is still accounted for once.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest

from services.audit import accounting, balanced
from services.launcher import Launcher
from shared import teacher_pools
from shared.admission import Admission, set_limits
from shared.keys import Keys, check_teacher_id
from shared.models import builtin_path
from shared.redis_server import free_port
from shared.streams import produce
from shared.tokenizer_check import TokenizerMismatch, fingerprint, mismatch, publish, wait_and_check
from tests.test_faults import kill, until

pytestmark = [pytest.mark.redis]


def report(client, keys: Keys, replica: str, teacher_id: str, at: float, service: str = "teacher",
           healthy: bool = True) -> None:
    client.hset(keys.replicas, replica, json.dumps({"service": service, "teacher_id": teacher_id, "at": at,
                                                    "state": "waiting", "healthy": healthy}))


def test_teacher_ids_become_stream_names_or_are_refused():
    keys = Keys("r")
    assert keys.trajectories_for("") == "opd:r:trajectories"
    assert keys.trajectories_for("math-v2.1") == "opd:r:trajectories:math-v2.1"
    assert keys.trajectories_for("Qwen/Qwen2.5-7B") == "opd:r:trajectories:Qwen/Qwen2.5-7B"  # a hub id
    for bad in ("a b", "x:y", "é", "a" * 129):
        with pytest.raises(ValueError, match="teacher id"):
            check_teacher_id(bad)
    from services.teacher.settings import TeacherSettings

    with pytest.raises(ValueError, match="run name 'a:b'"):  # a ':' would break every key's layout
        TeacherSettings(run="a:b")
    with pytest.raises(ValueError, match="teacher id"):
        TeacherSettings(teacher_id="x y")


def test_survey_counts_live_replicas_and_finds_down_pools(client, keys):
    for replica, tid in (("t-a-0", "a"), ("t-a-1", "a"), ("t-b-0", "b"), ("t-y-0", "y")):
        report(client, keys, replica, tid, at=1.0)
    report(client, keys, "t-a-2", "a", at=1.0, healthy=False)  # its loop is stuck: never live
    report(client, keys, "rollout-0", "", at=1.0, service="rollout")
    produce(client, keys.trajectories_for("a"), [b"1", b"2"])
    produce(client, keys.trajectories_for("b"), [b"1", b"2", b"3"])
    produce(client, keys.trajectories_for("x"), [b"1"])  # an id the data does not have, e.g. re-queued
    client.hset(keys.produced, keys.trajectories_for("x"), 1)
    survey = teacher_pools.Survey(client, keys, ["a", "b", "c"], live_after_s=15)
    first = survey.poll(now=100.0)  # every report is new: live until it stops changing
    assert first["a"].replicas == 2 and first["b"].replicas == 1
    report(client, keys, "t-a-0", "a", at=9e9)  # a's first replica keeps reporting (any clock)
    pools = survey.poll(now=120.0)
    P = teacher_pools.PoolStatus
    assert pools == {"a": P(1, 2, False), "b": P(0, 3, True), "c": P(0, 0, False),  # nothing queued: not down
                     "x": P(0, 1, True), "y": P(0, 0, False)}  # stream-only and replica-only ids are surveyed
    teacher_pools.publish(client, keys, pools, cap=100)
    assert teacher_pools.read(client, keys) == pools
    assert int(client.get(keys.parked)) == 4 and 0 < client.ttl(keys.parked) <= teacher_pools.PARKED_TTL_S
    teacher_pools.publish(client, keys, pools, cap=3)
    assert int(client.get(keys.parked)) == 3  # at most (max_staleness + 1) x batch_size
    assert teacher_pools.open_streams(keys, pools) == [keys.trajectories_for(t) for t in "acy"]
    assert teacher_pools.open_streams(keys, {}) == [keys.trajectories]
    # no pool has a live replica: none is set aside, nothing parked, backpressure on all
    dead = {"a": P(0, 2, True), "c": P(0, 0, False)}
    assert teacher_pools.set_aside(dead) == set() and teacher_pools.parked(dead, 100) == 0
    assert teacher_pools.open_streams(keys, dead) == [keys.trajectories_for("a"), keys.trajectories_for("c")]
    teacher_pools.withdraw(client, keys)
    assert not client.exists(keys.parked, keys.teachers)


def test_admission_does_not_count_trajectories_parked_at_a_down_pool(client, keys):
    set_limits(client, keys, batch_size=4, max_staleness=1)
    client.set(keys.version, 0)
    admission = Admission(client, keys)
    assert admission.request(100) == (8, 0)  # (v + s + 1) * B
    assert admission.request(1) == (0, 0)  # at the bound
    client.set(keys.parked, 3)  # three of those wait at a pool set aside as down
    assert admission.request(100) == (3, 0)
    client.delete(keys.parked)  # the pool is back (or the learner gone): no new grants until it catches up
    assert admission.request(100) == (0, 0)


def test_fingerprints_differ_by_size_or_by_ids():
    from shared.models import load_tokenizer

    tok = load_tokenizer(builtin_path("student"))
    same = fingerprint(tok)
    assert same == fingerprint(load_tokenizer(builtin_path("teacher"))) and same["vocab_size"] == 15
    assert mismatch(same, same) is None
    assert "vocabulary size 16 != the student's 15" in mismatch({**same, "vocab_size": 16}, same)
    assert "different tokens or ids" in mismatch({**same, "sha256": "0" * 64}, same)


def test_wait_and_check_refuses_another_tokenizer(client, keys):
    from shared.models import load_tokenizer

    tok = load_tokenizer(builtin_path("student"))
    assert wait_and_check(client, keys, tok, "t", stop=lambda: True) is False  # no learner yet: waits
    client.set(keys.tokenizer, json.dumps({"vocab_size": 15, "sha256": "0" * 64, "model": "other"}))
    with pytest.raises(TokenizerMismatch, match="its tokenizer is not the student's"):
        wait_and_check(client, keys, tok, "t")
    publish(client, keys, tok, "builtin:student")
    assert wait_and_check(client, keys, tok, "t") is True


def swapped_tokenizer_teacher(out: Path) -> Path:
    """The built-in teacher with the ids of two digits swapped in its tokenizer (same size)."""
    shutil.copytree(builtin_path("teacher"), out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


@pytest.mark.smoke
def test_a_teacher_with_another_tokenizer_refuses_to_start(tmp_path: Path, redis_server, client, keys):
    from shared.models import load_tokenizer

    publish(client, keys, load_tokenizer(builtin_path("student")), "builtin:student")
    launcher = Launcher(env={"REDIS_URL": redis_server.url, "OPD_RUN": keys.run}, log_dir=tmp_path / "logs")
    child = launcher.start("teacher", "teacher", {"model": swapped_tokenizer_teacher(tmp_path / "other"),
                                                  "device": "cpu", "http_port": free_port(), "torch_threads": 1})
    try:
        assert child.proc.wait(timeout=120) == 1
    finally:
        launcher.stop(grace_s=5)
    assert "its tokenizer is not the student's (builtin:student): same size (15) but different tokens or ids" \
        in launcher.tail(child)


def routed_rows(n: int) -> str:
    """Addition prompts as text rows, alternately for teacher pools a and b."""
    rows = [{"prompt": f"{i * 7 % 1000:03d}+{i * 13 % 1000:03d}=", "answer": str(i * 7 % 1000 + i * 13 % 1000),
             "teacher_id": "ab"[i % 2]} for i in range(n)]
    return "\n".join(map(json.dumps, rows)) + "\n"


def per_teacher(client, keys: Keys) -> dict[str, int]:
    return {t: row["trajectories"] for t, row in json.loads(client.hget(keys.stats, "teachers") or b"{}").items()}


def items_of(client, keys: Keys, replica: str) -> int:
    return int(json.loads(client.hget(keys.replicas, replica))["items"])


@pytest.mark.smoke
def test_two_teacher_pools_each_score_their_own_and_a_dead_pool_stalls_only_its_share(
        tmp_path: Path, redis_server, client):
    keys, batch, learner_port = Keys("two-pools"), 8, free_port()
    (tmp_path / "train.jsonl").write_text(routed_rows(64))
    common = {"weights_dir": tmp_path / "weights", "torch_threads": 1, "device": "cpu"}
    launcher = Launcher(env={"REDIS_URL": redis_server.url, "OPD_RUN": keys.run}, log_dir=tmp_path / "logs")

    def step() -> int:
        return int(client.hget(keys.stats, "step") or 0)

    def teacher(pool: str, name: str) -> None:
        launcher.start("teacher", name, {**common, "teacher_id": pool, "batch_size": batch, "replica": name,
                                         "http_port": free_port()})
    try:
        launcher.start("learner", "learner", {
            **common, "batch_size": batch, "max_steps": 0, "max_staleness": 2, "prompt_backlog": 32,
            "output_dir": tmp_path / "student", "checkpoint_dir": tmp_path / "ckpt", "checkpoint_every": 2,
            "http_port": learner_port, "prompts_file": tmp_path / "train.jsonl", "teacher_live_s": 3,
            "reset": True, "samples_every": 0, "teacher_weights": '{"b": 0.5}'})
        teacher("a", "teacher-a")
        teacher("b", "teacher-b")
        launcher.start("rollout", "rollout", {**common, "batch_size": batch, "max_backlog": 16,
                                              "http_port": free_port()})
        until(lambda: min(per_teacher(client, keys).get(t, 0) for t in "ab") >= batch, 180,
              "both pools' trajectories to be trained", launcher)
        kill(launcher, "teacher-b")
        b_at_kill = per_teacher(client, keys)["b"]
        until(lambda: teacher_pools.read(client, keys).get("b", teacher_pools.PoolStatus(1, 0, False)).down,
              60, "pool b to be seen down", launcher)
        down_at = step()
        until(lambda: step() >= down_at + 6, 120, "six steps without pool b", launcher)
        b_without = per_teacher(client, keys)["b"] - b_at_kill
        down = teacher_pools.read(client, keys)["b"]
        teacher("b", "teacher-b2")  # the pool comes back: its queued work is scored
        until(lambda: teacher_pools.read(client, keys)["b"].replicas == 1, 60, "pool b to be back", launcher)
        until(lambda: client.xlen(keys.trajectories_for("b")) == 0, 60, "pool b's backlog to be scored", launcher)
        back_at = step()
        until(lambda: step() >= back_at + 4, 120, "four more steps with both pools", launcher)
        metrics = httpx.get(f"http://127.0.0.1:{learner_port}/metrics", timeout=10).text
        launcher.stop([c.name for c in launcher.children if c.name != "learner"])  # producers first
        launcher.stop()  # the learner checkpoints what it trained
    finally:
        launcher.stop(grace_s=5)

    assert b_without <= 3 * batch  # only what b had scored before it died (+ in flight) while a trained on
    assert down.replicas == 0 and down.queued > 0  # its work waited, visible
    assert items_of(client, keys, "teacher-b2") > 0  # ... and was scored when the pool came back
    streams = {t: keys.trajectories_for(t) for t in "ab"}
    produced = {t: int(client.hget(keys.produced, s)) for t, s in streams.items()}
    # routing: each pool scored exactly what was routed to it and is no longer queued (b's killed
    # replica may not have reported its last batch)
    b_scored = items_of(client, keys, "teacher-b") + items_of(client, keys, "teacher-b2")
    assert items_of(client, keys, "teacher-a") == produced["a"] - client.xlen(streams["a"])
    assert b_scored <= produced["b"] - client.xlen(streams["b"])
    assert client.xlen(keys.trajectories) == 0 and client.hget(keys.produced, keys.trajectories) is None
    import services.learner.checkpoint as checkpoint

    state = json.loads((checkpoint.latest(tmp_path / "ckpt") / "state.json").read_text())
    outcome = accounting(client, keys, sum(state["tracker"]["trained"].values()))
    assert balanced(outcome) and outcome["invalid_dead_letters"] == 0, outcome
    assert sum(per_teacher(client, keys).values()) == outcome["trained"] == int(state["version"]) * batch
    log = (tmp_path / "logs" / "learner.log").read_text()
    assert "teacher pool 'b' is down" in log and "teacher pool 'b' is back" in log
    for name in ("opd_teacher_trained_tokens_total", "opd_teacher_loss", "opd_teacher_sample_accuracy"):
        assert re.search(rf'{name}{{[^}}]*teacher_id="a"}} ', metrics), name  # per teacher id
    assert re.search(r'opd_teacher_down\{[^}]*teacher_id="b"\} 0.0', metrics)
    assert re.search(r'opd_teacher_replicas\{[^}]*teacher_id="a"\} 1.0', metrics)
    skipped = re.search(r'opd_prompts_skipped_total\{[^}]*teacher_id="b"\} ([0-9.]+)', metrics)
    assert skipped and float(skipped.group(1)) > 0  # b's rows were passed over while it was down


@pytest.mark.smoke
def test_a_running_teacher_stops_when_the_learner_restarts_with_another_tokenizer(
        tmp_path: Path, redis_server, client, keys):
    """A learner --reset with another student: the teacher's next hand-off checks again and stops."""
    import numpy as np

    from shared.models import load_tokenizer
    from shared.wire import Prompt, Trajectory, encode

    publish(client, keys, load_tokenizer(builtin_path("student")), "builtin:student")
    launcher = Launcher(env={"REDIS_URL": redis_server.url, "OPD_RUN": keys.run}, log_dir=tmp_path / "logs")
    child = launcher.start("teacher", "teacher", {"device": "cpu", "http_port": free_port(), "torch_threads": 1,
                                                  "replica": "teacher"})
    try:
        until(lambda: json.loads(client.hget(keys.replicas, "teacher") or b"{}").get("state") == "waiting",
              120, "the teacher to pass its start-up check", launcher)
        client.set(keys.tokenizer, json.dumps({"vocab_size": 15, "sha256": "0" * 64, "model": "other-student"}))
        ids = np.array([1, 4, 5, 6, 3, 4, 5, 6, 14], np.int32)
        traj = Trajectory("t0", Prompt("p0", ids, "2", 0), np.array([6, 2], np.int32),
                          np.array([-0.5, -0.1], np.float32), np.zeros(2, np.int32))
        produce(client, keys.trajectories, [encode(traj)])
        assert child.proc.wait(timeout=60) == 1
    finally:
        launcher.stop(grace_s=5)
    assert "its tokenizer is not the student's (other-student)" in launcher.tail(child)
    assert client.xlen(keys.scored) == 0  # nothing scored against the other student
    assert client.xlen(keys.trajectories) == 1  # the trajectory waits (pending) for a teacher that fits
