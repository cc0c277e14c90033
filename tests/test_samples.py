"""The learner's samples stream: written every N steps, graded by the verifier, capped; `opd tail` reads it."""

from __future__ import annotations

import numpy as np
import pytest

from services.learner.samples import SampleLog
from services.tail import format_entry, last
from shared.models import load_tokenizer
from shared.verifiers import numeric
from shared.wire import Prompt, ScoredTrajectory, TeacherScores, Trajectory

pytestmark = pytest.mark.redis


def scored(tok, prompt: str, completion: str, answer: str, i: int) -> ScoredTrajectory:
    p = Prompt(f"p{i}", np.asarray(tok(prompt)["input_ids"], np.int32), answer, 0, teacher_id="t-a")
    comp = np.asarray(tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], np.int32)
    t = len(comp)
    traj = Trajectory(f"t{i}", p, comp, np.zeros(t, np.float32), np.zeros(t, np.int32))
    top = np.zeros((t, 1), np.float32)
    scores = TeacherScores(comp[:, None], top, np.zeros(t, np.float32), np.zeros(t, np.float32), teacher="big")
    return ScoredTrajectory(traj, scores)


def test_samples_every_n_steps_graded_and_capped(client, keys):
    tok = load_tokenizer("builtin:student")
    log = SampleLog(client, keys.samples, tok, numeric, every=2, per_step=2, max_entries=10)
    batch = [scored(tok, "1+2=", "3", "3", 0), scored(tok, "2+2=", "5", "4", 1), scored(tok, "0+0=", "0", "0", 2)]
    assert log.maybe_write(1, batch) == 0 and client.xlen(keys.samples) == 0
    assert log.maybe_write(2, batch) == 2
    first, second = last(client, keys.samples, 5)
    assert first[1][b"prompt"] == b"1+2=" and first[1][b"completion"] == b"3" and first[1][b"reward"] == b"1.0"
    assert second[1][b"reward"] == b"0.0" and second[1][b"teacher_id"] == b"t-a" and second[1][b"teacher"] == b"big"
    assert "step 2  reward 1.0  teacher_id t-a  scored by big" in format_entry(first[1])
    for step in range(4, 600, 2):
        log.maybe_write(step, batch)
    assert client.xlen(keys.samples) < 200  # MAXLEN ~ 10: trimmed in whole nodes, never unbounded
    assert last(client, keys.samples, 1)[0][1][b"step"] == b"598"


def test_opd_tail_follows_new_samples(client, keys, redis_server):
    import os
    import subprocess
    import sys

    tok = load_tokenizer("builtin:student")
    log = SampleLog(client, keys.samples, tok, numeric, every=1, per_step=1, max_entries=10)
    log.maybe_write(6, [scored(tok, "1+2=", "3", "3", 0)])
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "tail", "--run", keys.run, "-n", "1", "--follow"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "REDIS_URL": redis_server.url})
    try:
        assert proc.stdout.readline().startswith("step 6  reward 1.0")  # the newest entry first
        for _ in range(3):
            proc.stdout.readline()
        log.maybe_write(7, [scored(tok, "2+2=", "5", "4", 1)])
        assert proc.stdout.readline().startswith("step 7  reward 0.0")  # then each new one as it comes
    finally:
        proc.terminate()
        proc.wait(timeout=10)
