"""The teacher hook's one-pass step scoring (services/teacher/step_scores.py) on CPU, without vLLM.

Jobs scored over two engine steps (a chunked prefill), one with MC ids and one without,
against a dense float64 log-softmax of the same logits, row by row.
"""

from __future__ import annotations

import numpy as np
import torch

from services.teacher.step_scores import new_job, score_rows, split_rows, step_inputs, widths

V, K, DRAWS = 50, 5, 3


def run_step(segments: list, hidden_rows: list, targets: list, logits_all: torch.Tensor,
             generator: torch.Generator) -> None:
    inputs = torch.from_numpy(step_inputs(segments, hidden_rows, targets))
    k, d = widths(segments)
    split_rows(segments, score_rows(logits_all[inputs[:, 0]], inputs, k, d, generator).numpy(), k, d)


def test_two_jobs_over_two_steps_match_a_dense_float64_reference() -> None:
    rng = np.random.default_rng(0)
    logits_all = torch.from_numpy((rng.standard_normal((40, V)) * 2).astype(np.float32))  # hidden rows
    mc = rng.integers(0, V, (6, 4)).astype(np.int32)
    a, b = new_job(3, 6, K, DRAWS, mc), new_job(2, 4, 3, 0, None)
    rows_a, rows_b = np.arange(10, 16), np.arange(30, 34)  # the hidden rows of each job's tokens
    tgt_a, tgt_b = rng.integers(0, V, 6), rng.integers(0, V, 4)
    gen = torch.Generator().manual_seed(0)
    run_step([(a, 0, 4), (b, 0, 1)], [rows_a[:4], rows_b[:1]], [tgt_a[:4], tgt_b[:1]], logits_all, gen)
    run_step([(b, 1, 3), (a, 4, 2)], [rows_b[1:], rows_a[4:]], [tgt_b[1:], tgt_a[4:]], logits_all, gen)
    ref = torch.log_softmax(logits_all.double(), -1).numpy()
    for job, rows, tgt, k in ((a, rows_a, tgt_a, K), (b, rows_b, tgt_b, 3)):
        r = ref[rows]
        assert job["filled"] == len(rows)
        np.testing.assert_array_equal(job["topk_ids"], np.argsort(-r, 1)[:, :k])
        np.testing.assert_allclose(job["topk_logprobs"], -np.sort(-r, 1)[:, :k], atol=2e-6)
        np.testing.assert_allclose(job["tail_mass"], 1 - np.exp(-np.sort(-r, 1)[:, :k]).sum(1), atol=2e-6)
        np.testing.assert_allclose(job["sampled"], r[np.arange(len(rows)), tgt], atol=2e-6)
    np.testing.assert_allclose(a["mc"], np.take_along_axis(ref[rows_a], mc.astype(np.int64), 1), atol=2e-6)
    assert b["mc"] is None and b["draw_ids"] is None
    draws = a["draw_ids"].astype(np.int64)
    assert draws.shape == (6, DRAWS) and (draws >= 0).all() and (draws < V).all()
    np.testing.assert_allclose(a["draw_logprobs"], np.take_along_axis(ref[rows_a], draws, 1), atol=2e-6)


def test_draws_are_seeded_and_follow_p() -> None:
    """10,000 draws on one row of a 12-token vocabulary: the same seed gives the same ids, and
    the counts are within chance of p (chi-square under df + 5 sd)."""
    logits = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 12)).astype(np.float32))
    inputs = torch.zeros((1, 2), dtype=torch.long)

    def draws(seed: int) -> np.ndarray:
        job = new_job(1, 1, 2, 10_000, None)
        packed = score_rows(logits, inputs, 2, 10_000, torch.Generator().manual_seed(seed)).numpy()
        split_rows([(job, 0, 1)], packed, 2, 10_000)
        return job["draw_ids"][0]

    first = draws(5)
    np.testing.assert_array_equal(first, draws(5))
    p = torch.softmax(logits.double(), -1).numpy()[0]
    counts = np.bincount(first, minlength=12)
    stat = float(((counts - 10_000 * p) ** 2 / (10_000 * p)).sum())
    assert stat < 11 + 5 * np.sqrt(22), stat
