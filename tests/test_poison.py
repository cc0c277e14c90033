"""Poison messages, bad input, restarts and Redis errors with real processes and a real Redis.

Each scenario reproduces findings of the harsher fault run: a message that sets the run's
widths, admission moved by messages never admitted, out-of-vocabulary ids crash-looping
a service, a restart before the first checkpoint wiping the run, Redis credentials that
hang a service, an unbounded dead-letter stream, an unnormalised teacher top-k. The
accounting is asserted as in test_faults.py: every trajectory handed off is trained
exactly once, dead-lettered with its reason, or still queued.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest

from services.launcher import Launcher, service_command
from shared.redis_server import EmbeddedRedis, free_port
from shared.keys import Keys
from shared.streams import produce
from shared.redis_client import connect
from shared.wire import Prompt, ScoredTrajectory, TeacherScores, Trajectory, encode
from test_faults import accounting, kill, until

pytestmark = [pytest.mark.smoke, pytest.mark.redis]
BATCH = 8
VOCAB = json.loads((Path(__file__).parents[1] / "shared/assets/student/config.json").read_text())["vocab_size"]
K = min(64, VOCAB)  # the teacher's default top-k, capped at the built-in vocabulary


def scored(k: int = K, completion: list[int] | None = None, normalised: bool = True) -> bytes:
    """A well-formed scored trajectory (version 0) that the learner may still have to refuse."""
    comp = np.array(completion or [5, 6, 7], np.int32)
    t = len(comp)
    lp = np.log(np.full((t, k), 0.5 / k)).astype(np.float32) if normalised else np.zeros((t, k), np.float32)
    tail = np.full(t, 0.5 if normalised else 0.0, np.float32)
    traj = Trajectory(f"odd-{k}-{comp[0]}", Prompt("odd", np.array([1, 5], np.int32), "", 0), comp,
                      np.full(t, -1.0, np.float32), np.zeros(t, np.int32))
    scores = TeacherScores(np.tile(np.arange(k, dtype=np.int32), (t, 1)), lp, tail, np.full(t, -1.0, np.float32))
    return encode(ScoredTrajectory(traj, scores))


def prompt(ids: list[int], schema: object = None) -> bytes:
    raw = encode(Prompt("bad-prompt", np.array(ids, np.int32), "1", 0))
    if schema is None:
        return raw
    header, blob = msgpack.unpackb(raw)
    header["schema"] = schema
    return msgpack.packb([header, blob], use_bin_type=True)


def common(tmp_path: Path) -> dict[str, object]:
    return {"weights_dir": tmp_path / "weights", "torch_threads": 1, "device": "cpu", "reclaim_idle_s": 2,
            "http_port": 0, "max_deliveries": 3, "dead_letter_max_payload_bytes": 256}


def learner_flags(tmp_path: Path, **over: object) -> dict[str, object]:
    return {**common(tmp_path), "batch_size": BATCH, "max_steps": 10, "max_staleness": 0,
            "checkpoint_every": 100, "checkpoint_dir": tmp_path / "ckpt", "output_dir": tmp_path / "student",
            "prompt_backlog": 16, **over}


def dead_reasons(client, keys: Keys) -> list[str]:
    return [f[b"reason"].decode() for _, f in client.xrange(keys.dead)]


def test_bad_input_is_dead_lettered_and_admission_never_moves(tmp_path: Path):
    """Findings 1, 2, 3, 6 and 7 in a synchronous run (max_staleness 0)."""
    keys = Keys("poison")
    server = EmbeddedRedis().start()
    client = connect(server.url)
    launcher = Launcher(env={"REDIS_URL": server.url, "OPD_RUN": keys.run}, log_dir=tmp_path / "logs")
    try:
        launcher.start("learner", "learner", learner_flags(tmp_path))
        until(lambda: client.exists(keys.version), 120, "the learner's version 0", launcher)
        # before any teacher: an odd-width message must not fix the run's top-k (finding 1)
        produce(client, keys.scored, [scored(k=3), b"\xc1garbage", b"\xc1more garbage"])
        produce(client, keys.prompts, [prompt([1, VOCAB + 7]), prompt([1, 5], schema=2.0)])  # finding 3
        launcher.start("teacher", "teacher", {**common(tmp_path), "batch_size": 4})
        for i in range(2):
            launcher.start("rollout", f"rollout-{i}", {**common(tmp_path), "batch_size": 4})
        until(lambda: int(client.get(keys.version) or 0) >= 3, 180, "step 3", launcher)
        produce(client, keys.scored, [scored(completion=[5, VOCAB + 1]), scored(normalised=False), scored(k=3)])
        learner = launcher.children[0]
        until(lambda: learner.proc.poll() is not None, 240, "the run to finish", launcher)
        assert learner.proc.returncode == 0, launcher.tail(learner)
        launcher.stop()
        assert not launcher.failed(), [launcher.tail(c) for c in launcher.failed()]  # no crash loops
        stats = {k.decode(): v.decode() for k, v in client.hgetall(keys.stats).items()}
        staleness = json.loads(stats["staleness"])
        reasons = dead_reasons(client, keys)
        admitted, tokens = int(client.get(keys.admitted)), client.scard(keys.admission_tokens)
        report = {"steps": stats["step"], "trained": staleness["trained"], "dropped_stale": staleness["dropped_stale"],
                  "admitted": admitted, "tokens_held": tokens, "dead_letters": reasons}
        print("\npoison run:", json.dumps(report, indent=2))
        assert int(stats["step"]) == 10 and staleness["trained"] == 10 * BATCH
        # finding 2: garbage released no slots, so the sync run never admitted past its bound
        assert staleness["dropped_stale"] == 0 and staleness["histogram"] == {"0": 10 * BATCH}
        assert admitted == 10 * BATCH + tokens  # every slot is trained or held by a queued trajectory
        expected = ["record has no top_k", "not valid msgpack", "not valid msgpack", "prompt ids outside the student vocabulary",
                    "schema must be an int", "completion ids outside the student vocabulary", "sum to", "top_k 3"]
        for want in expected:  # each injected message, with its reason (findings 1, 3, 7)
            match = next((r for r in reasons if want in r), None)
            assert match is not None, (want, reasons)
            reasons.remove(match)
        assert reasons == []  # and nothing else: no real trajectory was refused
        sizes = [int(f[b"bytes"]) for _, f in client.xrange(keys.dead)]
        assert all(len(f[b"m"]) <= 256 for _, f in client.xrange(keys.dead)) and max(sizes) > 256  # finding 6
        assert client.hget(keys.record, "top_k") == str(K).encode()
    finally:
        launcher.stop(grace_s=5)
        server.close()


def test_learner_killed_before_its_first_checkpoint_resumes_without_wiping(tmp_path: Path):
    """Finding 4: the restart resumes from the version-0 checkpoint; the run's data stays;
    a learner without a checkpoint is refused; --reset starts over."""
    keys = Keys("restart")
    server = EmbeddedRedis().start()
    client = connect(server.url)
    launcher = Launcher(env={"REDIS_URL": server.url, "OPD_RUN": keys.run}, log_dir=tmp_path / "logs")
    flags = learner_flags(tmp_path, max_staleness=2)
    try:
        launcher.start("learner", "learner", flags)
        until(lambda: client.exists(keys.version), 120, "the learner's version 0", launcher)
        produce(client, keys.scored, [b"\xc1garbage"])
        launcher.start("teacher", "teacher", {**common(tmp_path), "batch_size": 4})
        launcher.start("rollout", "rollout", {**common(tmp_path), "batch_size": 4})
        until(lambda: int(client.get(keys.version) or 0) >= 3, 180, "step 3", launcher)
        kill(launcher, "learner")
        before = {"produced": int(client.hget(keys.produced, keys.trajectories)), "dead": client.xlen(keys.dead)}
        restarted = launcher.start("learner", "learner-restarted", flags)
        until(lambda: restarted.proc.poll() is not None, 240, "the restarted run to finish", launcher)
        assert restarted.proc.returncode == 0, launcher.tail(restarted)
        assert "resumed from" in restarted.log_path.read_text()
        launcher.stop(["teacher", "rollout"])
        produced = int(client.hget(keys.produced, keys.trajectories))
        assert produced >= before["produced"] and client.xlen(keys.dead) >= before["dead"] >= 1  # nothing wiped
        from services.learner.checkpoint import latest

        state = json.loads((latest(tmp_path / "ckpt") / "state.json").read_text())
        outcome = accounting(client, keys, state["consumed"])  # asserts produced = the sum of the outcomes
        print("\nrestart run:", {**outcome, "before_kill": before})
        assert outcome["trained"] == 10 * BATCH and outcome["invalid_dead_letters"] == 1  # the garbage
        # the rollback to version 0: what the dead learner's versions >= 1 generated is abandoned
        assert state["lineage"] == {"0": 0, "1": 0} and outcome["abandoned_by_rollback"] >= 1
        abandoned = [r.decode() for _, f in client.xrange(keys.dead) if (r := f[b"reason"]).startswith(b"abandoned")]
        assert all("of epoch 0" in r and "prompt re-queued" in r for r in abandoned)
        # a learner with no checkpoint for this run is refused with a clear error ...
        other = subprocess.run(service_command("learner", {**flags, "checkpoint_dir": tmp_path / "other"}),
                               env={**launcher_env(server.url, keys)}, capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "already has state" in other.stderr and "--reset" in other.stderr
        # ... and --reset starts the run over, on purpose (no producers run now: it stays at version 0)
        reset = launcher.start("learner", "learner-reset", {**flags, "reset": True})
        until(lambda: (tmp_path / "ckpt" / "step-000000").exists() and not client.exists(keys.dead)
              and client.hget(keys.stats, "status") is None and int(client.get(keys.version) or -1) == 0,
              120, "the reset learner's fresh start", launcher)
        assert client.hget(keys.produced, keys.trajectories) is None
        assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-000000"]  # old checkpoints gone
        launcher.stop(["learner-reset"])
        assert reset.proc.returncode == 0, launcher.tail(reset)
    finally:
        launcher.stop(grace_s=5)
        server.close()


def launcher_env(url: str, keys: Keys) -> dict[str, str]:
    import os

    return {**os.environ, "REDIS_URL": url, "OPD_RUN": keys.run}


def run_teacher(url: str, timeout_s: float = 45) -> subprocess.CompletedProcess:
    return subprocess.run(service_command("teacher", {"device": "cpu", "http_port": 0}),
                          env={**launcher_env(url, Keys("auth"))}, capture_output=True, text=True, timeout=timeout_s)


def test_redis_errors_fail_fast_and_unavailability_shows_in_health(tmp_path: Path):
    """Finding 5: wrong or missing password and a bad database fail at once with one line;
    Redis going away shows in /healthz and opd_redis_up within seconds; /openapi.json is
    not a 500 (finding 8)."""
    server = EmbeddedRedis(password="s3cret").start()
    try:
        port = server.port
        for url, want in ((f"redis://:wrong@127.0.0.1:{port}/0", "refused this client"),
                          (f"redis://127.0.0.1:{port}/0", "refused this client"),
                          (f"redis://:s3cret@127.0.0.1:{port}/99", "DB index")):
            r = run_teacher(url)
            lines = [line for line in r.stderr.strip().splitlines() if line]
            assert r.returncode != 0 and want in lines[-1] and "Traceback" not in r.stderr, r.stderr[-2000:]
        http = free_port()
        proc = subprocess.Popen(service_command("teacher", {"device": "cpu", "http_port": http}),
                                env=launcher_env(server.url, Keys("health")), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            health = lambda: httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=2)  # noqa: E731
            wait_for(lambda: _ok(health) == 200, 120)
            assert health().json()["redis"] == "ok"
            assert httpx.get(f"http://127.0.0.1:{http}/openapi.json", timeout=2).status_code == 404
            server.kill()
            wait_for(lambda: _ok(health) == 503, 15)
            assert health().json()["redis"].startswith("unreachable")
            assert "opd_redis_up{" in (metrics := httpx.get(f"http://127.0.0.1:{http}/metrics").text)
            assert any(line.startswith("opd_redis_up{") and line.endswith(" 0.0") for line in metrics.splitlines())
            server.start()
            wait_for(lambda: _ok(health) == 200, 30)  # back once Redis answers again
        finally:
            proc.kill()
            proc.wait()
    finally:
        server.close()


def _ok(health) -> int:
    try:
        return health().status_code
    except httpx.HTTPError:
        return 0


def wait_for(cond, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_opd_redis_takes_port_password_and_persistence_dir(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "redis", "--port", str(port), "--password", "pw",
                             "--dir", str(tmp_path / "data")], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url == f"redis://:pw@127.0.0.1:{port}/0"
        client = connect(url)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("dir")["dir"] == str(tmp_path / "data")
    finally:
        proc.terminate()
        proc.wait(10)
    import socket

    with socket.socket() as probe:  # SIGTERM stopped the server too, not only the wrapper
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    help_text = subprocess.run([sys.executable, "-m", "services.cli", "redis", "--help"], capture_output=True,
                               text=True, timeout=30)
    assert help_text.returncode == 0 and "--password" in help_text.stdout  # and no server was started
