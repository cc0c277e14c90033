"""The rollout MC hook's per-step math and bookkeeping on CPU, without vLLM.

services/rollout/mc_draws.py (batched temperature / top-k / top-p, draws, gathers) against a
dense float64 per-row reference of vLLM's sampling semantics; services/rollout/mc_record.py
(rows to requests, one record per step, buffers per request) against per-row writes; and
shared/packed_columns.py (the one device -> host copy) for bit exactness.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.rollout.mc_draws import log_mu, mc_step, nucleus
from services.rollout.mc_record import McRecorder
from shared.packed_columns import pack, unpack


def reference_log_mu(row: np.ndarray, temperature: float, top_p: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """One row in float64: temperature, then top-k (values >= the k-th largest), then top-p
    (ascending cumulative probability <= 1 - p masked, the largest kept), then log-softmax."""
    x = row.astype(np.float64) / temperature
    if top_k is not None:
        x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
    order = np.argsort(x, kind="stable")
    p = np.exp(x[order] - x.max())
    outside = np.cumsum(p / p.sum()) <= 1 - top_p
    outside[-1] = False
    x[order[outside]] = -np.inf
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def mid_gap_top_p(row: np.ndarray, temperature: float, rng: np.random.Generator) -> float:
    """A top-p whose nucleus boundary sits half a token's probability away from any
    cumulative sum, so float32 and float64 must agree on the mask."""
    x = row.astype(np.float64) / temperature
    p = np.sort(np.exp(x - x.max()))
    cum = np.cumsum(p / p.sum())
    candidates = [j for j in range(len(cum) // 4, len(cum) - 2) if cum[j + 1] - cum[j] > 1e-3]
    j = int(rng.choice(candidates))
    return float(1 - (cum[j] + cum[j + 1]) / 2)


def batch(seed: int = 0, rows: int = 6, vocab: int = 257) -> dict:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    temps = np.array([0.5, 1.0, 1.7, 1.0, 0.8, 1.3][:rows], np.float32)
    top_p = np.array([mid_gap_top_p(r, t, rng) if i % 3 else 1.0 for i, (r, t) in enumerate(zip(logits, temps))],
                     np.float32)
    return {"logits": logits, "temps": temps, "top_p": top_p,
            "ref": np.stack([reference_log_mu(r, t, p) for r, t, p in zip(logits, temps, top_p)])}


def test_log_mu_matches_the_float64_reference_row_by_row() -> None:
    b = batch()
    got = log_mu(torch.from_numpy(b["logits"]).clone(), torch.from_numpy(b["temps"]),
                 top_p=torch.from_numpy(b["top_p"])).double().numpy()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(b["ref"]))  # the very same nuclei
    kept = np.isfinite(b["ref"])
    assert 0 < kept[1::3].sum() < kept[1::3].size  # top-p rows really are truncated
    np.testing.assert_allclose(got[kept], b["ref"][kept], atol=2e-6)


def test_top_k_rows_mask_like_the_reference() -> None:
    b = batch(seed=1)
    ks = np.array([5, 257, 1, 40, 257, 12], np.int32)  # 257 = the vocabulary: no top-k
    got = log_mu(torch.from_numpy(b["logits"]).clone(), torch.from_numpy(b["temps"]),
                 top_k=torch.from_numpy(ks)).double().numpy()
    ref = np.stack([reference_log_mu(r, t, 1.0, int(k)) for r, t, k in zip(b["logits"], b["temps"], ks)])
    np.testing.assert_array_equal(np.isfinite(got).sum(1), ks)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], atol=2e-6)


def test_nucleus_without_k_or_p_changes_nothing() -> None:
    x = torch.randn(3, 11)
    assert nucleus(x.clone(), None, None).equal(x)


def test_mc_step_puts_the_sampled_token_first_and_gathers_log_mu() -> None:
    b = batch(seed=2)
    rng = np.random.default_rng(2)
    sampled = np.array([rng.choice(np.flatnonzero(np.isfinite(r))) for r in b["ref"]])
    ids, lps = mc_step(torch.from_numpy(b["logits"]).clone(), torch.from_numpy(sampled).to(torch.int32), draws=7,
                       generator=torch.Generator().manual_seed(0), temperature=torch.from_numpy(b["temps"]),
                       top_p=torch.from_numpy(b["top_p"]))
    assert ids.shape == lps.shape == (6, 8) and ids.dtype == torch.long and lps.dtype == torch.float32
    np.testing.assert_array_equal(ids[:, 0].numpy(), sampled)
    want = np.take_along_axis(b["ref"], ids.numpy(), 1)
    assert np.isfinite(want).all()  # no draw outside its row's nucleus
    np.testing.assert_allclose(lps.double().numpy(), want, atol=2e-6)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    support = probs > 0
    expected = counts.sum() * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def test_draws_follow_mu_by_chi_square() -> None:
    """20,000 draws per row of a 16-token vocabulary: within chance of mu (the statistic under
    df + 5 sd, far beyond its 0.999 quantile), and far from the untempered distribution."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((3, 16)) * 2).astype(np.float32)
    temps = np.array([0.7, 1.0, 1.6], np.float32)
    top_p = np.array([mid_gap_top_p(logits[0], 0.7, rng), 1.0, mid_gap_top_p(logits[2], 1.6, rng)], np.float32)
    ids, _ = mc_step(torch.from_numpy(logits).clone(), torch.zeros(3, dtype=torch.long), draws=20_000,
                     generator=torch.Generator().manual_seed(3), temperature=torch.from_numpy(temps),
                     top_p=torch.from_numpy(top_p))
    for r in range(3):
        counts = np.bincount(ids[r, 1:].numpy(), minlength=16)
        mu = np.exp(reference_log_mu(logits[r], temps[r], top_p[r]))
        assert counts[mu == 0].sum() == 0
        stat, df = chi_square(counts, mu)
        assert stat < df + 5 * np.sqrt(2 * df), (r, stat, df)
        untempered = np.exp(reference_log_mu(logits[r], 1.0))
        wrong, df_wrong = chi_square(counts, untempered)
        if r != 1:  # row 1 is at temperature 1 without top-p: the same distribution
            assert wrong > 10 * (df_wrong + 5 * np.sqrt(2 * df_wrong)), (r, wrong)


def test_draws_are_reproducible_with_the_seed() -> None:
    b = batch(seed=4)

    def draw(seed: int) -> np.ndarray:
        ids, _ = mc_step(torch.from_numpy(b["logits"]).clone(), torch.zeros(6, dtype=torch.long), 5,
                         torch.Generator().manual_seed(seed), torch.from_numpy(b["temps"]), None,
                         torch.from_numpy(b["top_p"]))
        return ids.numpy()

    np.testing.assert_array_equal(draw(7), draw(7))
    assert (draw(7) != draw(8)).any()


def test_packed_columns_round_trip_bit_for_bit() -> None:
    ids = torch.tensor([[0, 151935], [7, 2**31 - 1]], dtype=torch.long)
    floats = torch.tensor([[-float("inf"), -0.0, 1e-45], [float("nan"), -3.25, 3e38]], dtype=torch.float32)
    packed = pack([ids], [floats[:, :1], floats[:, 1:]])
    assert packed.dtype == torch.int32 and packed.shape == (2, 5)
    got_ids, got_floats = unpack(packed.numpy(), 2)
    np.testing.assert_array_equal(got_ids, ids.numpy())
    np.testing.assert_array_equal(got_floats.view(np.int32), floats.numpy().view(np.int32))
    with pytest.raises(ValueError):
        unpack(packed.numpy().astype(np.int64), 2)


def recorder_step(rec: McRecorder, requests: dict, order: list, positions: list, sampled: list,
                  logits: torch.Tensor, calls: list) -> None:
    def lookup(req: str):
        calls.append(req)
        return requests.get(req)

    slots = rec.slots_of(order, lookup)
    rec.step(logits.clone(), torch.tensor(sampled), slots, np.array(positions))


def test_recorder_keeps_each_positions_last_write_per_request() -> None:
    """Two tagged requests (N 3 and 2) and an untagged one, rows reordered between steps, a
    position recorded twice (the later write wins) and one past max_tokens (dropped)."""
    requests = {"r0": ("a", 3, 4), "r1": ("b", 2, 3), "r9": None}
    rec, calls, logits = McRecorder(seed=0), [], torch.randn(3, 9)
    lsm = torch.log_softmax(logits, -1)
    recorder_step(rec, requests, ["r0", "r9", "r1"], [0, 5, 0], [1, 2, 3], logits, calls)
    recorder_step(rec, requests, ["r0", "r9", "r1"], [0, 6, 1], [4, 2, 5], logits, calls)  # r0 t=0 again
    recorder_step(rec, requests, ["r1", "r0"], [3, 1], [6, 7], logits[:2], calls)  # r1 t=3 >= max_tokens 3
    assert sorted(calls) == ["r0", "r1", "r9"]  # each request looked up once
    out = rec.take(["a", "b", "c"])
    assert set(out) == {"a", "b"}
    ids_a, lps_a = out["a"]
    assert ids_a.shape == lps_a.shape == (4, 3) and ids_a.dtype == np.int32 and lps_a.dtype == np.float32
    np.testing.assert_array_equal(ids_a[:, 0], [4, 7, -1, -1])
    assert (ids_a[2:] == -1).all() and (ids_a[:2] >= 0).all()
    np.testing.assert_allclose(lps_a[0], lsm[0, ids_a[0]].numpy(), atol=1e-6)  # from the second step's row 0
    np.testing.assert_allclose(lps_a[1], lsm[1, ids_a[1]].numpy(), atol=1e-6)  # from the third step's row 1
    ids_b, lps_b = out["b"]
    assert ids_b.shape == (3, 2)
    np.testing.assert_array_equal(ids_b[:, 0], [3, 5, -1])
    np.testing.assert_allclose(lps_b[1], lsm[2, ids_b[1]].numpy(), atol=1e-6)
    assert rec.take(["a"]) == {} and rec.steps == []  # handed over: all forgotten


def test_recorder_ignores_steps_without_tagged_rows() -> None:
    rec = McRecorder(seed=0)
    slots = rec.slots_of(["x", "y"], lambda req: None)
    np.testing.assert_array_equal(slots, [-1, -1])
    rec.step(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), slots, np.zeros(2, np.int64))
    assert rec.steps == [] and rec.generator is None and rec.take(["x"]) == {}


def test_recorder_takes_a_wider_request_joining_mid_batch() -> None:
    """Steps recorded at width 2, then a request with N 4 joins: each step unpacks at its own width."""
    requests = {"r0": ("a", 2, 3), "r1": ("b", 4, 3)}
    rec, calls, logits = McRecorder(seed=0), [], torch.randn(2, 9)
    recorder_step(rec, requests, ["r0"], [0], [1], logits[:1], calls)
    recorder_step(rec, requests, ["r0", "r1"], [1, 0], [2, 3], logits, calls)
    out = rec.take(["a", "b"])
    assert out["a"][0].shape == (3, 2) and out["b"][0].shape == (3, 4)
    np.testing.assert_array_equal(out["a"][0][:, 0], [1, 2, -1])
    np.testing.assert_array_equal(out["b"][0][:, 0], [3, -1, -1])
    assert (out["b"][0][0] >= 0).all()
