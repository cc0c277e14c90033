"""Stabilisers and drift control behave as specified (clipping, masking, weights)."""

from __future__ import annotations

import math

import pytest
import torch

from services.learner.drift import DriftConfig, drift_weights, topk_overlap
from services.learner.stabilisers import (StabiliserConfig, m2po_mask, policy_gradient,
                                          prefix_min_ratio, sequence_log_weights,
                                          vcpo_lr_scale)

LOG_R = torch.tensor([[math.log(3.0), math.log(0.5), 0.0, math.log(1.1)]], dtype=torch.float64)
MASK = torch.ones(1, 4, dtype=torch.bool)


def grad_of(kind: str, adv: float = 1.0, **kw) -> torch.Tensor:
    """d loss / d log pi per token, with mu fixed so that r = LOG_R.exp()."""
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    behaviour = -LOG_R
    loss = policy_gradient(torch.full((1, 4), adv, dtype=torch.float64), logp, behaviour, MASK,
                           StabiliserConfig(kind, **kw))
    g, = torch.autograd.grad(loss.sum(), logp)
    return g


def test_unstabilised_gradient_is_minus_a_times_ratio():
    torch.testing.assert_close(grad_of("none"), -LOG_R.exp())


def test_ppo_clip_zeroes_gradient_outside_the_trust_region():
    g = grad_of("ppo_clip", clip_eps=0.2)  # A > 0: ratios above 1.2 are clipped
    torch.testing.assert_close(g, torch.tensor([[0.0, -0.5, -1.0, -1.1]], dtype=torch.float64))
    g_neg = grad_of("ppo_clip", adv=-1.0, clip_eps=0.2)  # A < 0: ratios below 0.8 are clipped
    torch.testing.assert_close(g_neg, torch.tensor([[3.0, 0.0, 1.0, 1.1]], dtype=torch.float64))


def test_truncated_and_masked_importance_sampling():
    torch.testing.assert_close(grad_of("tis", is_cap=2.0), torch.tensor([[-2.0, -0.5, -1.0, -1.1]], dtype=torch.float64))
    torch.testing.assert_close(grad_of("mis", is_cap=2.0), torch.tensor([[0.0, -0.5, -1.0, -1.1]], dtype=torch.float64))


def test_decoupled_ppo_weights_by_prox_over_mu_and_drops_above_cap():
    # prox = current pi (one update per batch): weight pi/mu = r, tokens with r > cap dropped
    g = grad_of("decoupled_ppo", decoupled_cap=2.0)
    torch.testing.assert_close(g, torch.tensor([[0.0, -0.5, -1.0, -1.1]], dtype=torch.float64))


def test_m2po_drops_largest_second_moments_until_bound_holds():
    log_r = torch.tensor([[2.0, 0.1, -0.1, 0.0, -1.0]])
    keep = m2po_mask(log_r, torch.ones(1, 5, dtype=torch.bool), tau=0.04)
    assert keep.tolist() == [[False, True, True, True, False]]
    assert ((log_r[keep] ** 2).mean() <= 0.04)
    keep_all = m2po_mask(log_r * 0.01, torch.ones(1, 5, dtype=torch.bool), tau=0.04)
    assert keep_all.all()
    padded = m2po_mask(log_r, torch.tensor([[True, True, True, True, False]]), tau=0.04)
    assert padded.tolist() == [[False, True, True, True, False]]


def test_minpro_uses_minimum_ratio_of_the_preceding_prefix():
    r = torch.tensor([[2.0, 0.5, 3.0, 1.0]])
    assert prefix_min_ratio(r, torch.ones(1, 4, dtype=torch.bool)).tolist() == [[1.0, 2.0, 0.5, 0.5]]
    # ratios above 1 are kept too: the prefix minimum, not min(1, ...)
    assert prefix_min_ratio(torch.tensor([[2.0, 3.0, 4.0]]), torch.ones(1, 3, dtype=torch.bool)).tolist() == [[1.0, 2.0, 2.0]]
    g = grad_of("minpro")  # r = [3, 0.5, 1, 1.1] -> weights [1, 3, 0.5, 0.5]
    torch.testing.assert_close(g, torch.tensor([[-3.0, -1.5, -0.5, -0.55]], dtype=torch.float64))


def test_vcpo_scale_from_effective_sample_size():
    behaviour = torch.zeros(4, 2)
    mask = torch.ones(4, 2, dtype=torch.bool)
    assert vcpo_lr_scale(sequence_log_weights(torch.zeros(4, 2), behaviour, mask)) == pytest.approx(1.0)
    logp = torch.tensor([[5.0, 5.0], [0, 0], [0, 0], [0, 0]])  # one sequence dominates: ESS ~ 1
    assert vcpo_lr_scale(sequence_log_weights(logp, behaviour, mask)) == pytest.approx(0.5, abs=1e-3)


def test_topk_overlap_and_monotone_drift_weights():
    student = torch.log_softmax(torch.tensor([[[5.0, 4, 3, 0, 0], [0, 0, 3, 4, 5]]]), -1)
    teacher_ids = torch.tensor([[[0, 1, 2], [0, 1, 2]]])
    overlap = topk_overlap(student.topk(5, -1).indices, teacher_ids, k=2)
    assert overlap.tolist() == [[1.0, 0.0]]
    cfg = DriftConfig(enabled=True, low=0.25, high=0.75)
    ov = torch.tensor([[1.0, 0.5, 1.0, 0.9, 0.0]])
    w = drift_weights(ov, torch.tensor([[True, True, True, True, False]]), cfg)
    assert w.tolist() == [[1.0, 0.5, 0.5, 0.5, 0.0]]  # never recovers after drift; padding 0
    trunc = drift_weights(ov, torch.ones(1, 5, dtype=torch.bool), DriftConfig(True, truncate_below=0.6))
    assert trunc.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]
