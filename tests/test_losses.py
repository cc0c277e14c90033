"""OPD estimators against dense float64 references on a small vocabulary."""

from __future__ import annotations

import pytest
import torch

from services.learner.losses import (LossInputs, forward_kl_topk, mc_reverse_kl, objective,
                                     sampled_reverse_kl)

torch.manual_seed(0)
B, T, V = 3, 4, 11


def dense_inputs(student_BTV, mask_BT, sampled_ids_BT, behaviour_BT, teacher_sampled_BT, topk_ids_BTK,
                 topk_lp_BTK, mc_ids_BTN=None, mc_behaviour_BTN=None, mc_teacher_BTN=None,
                 draw_ids_BTN=None, draw_lp_BTN=None) -> LossInputs:
    """LossInputs gathered from a dense [B, T, V] student log-prob tensor (the reference layout)."""
    at = lambda ids: None if ids is None else student_BTV.gather(-1, ids.long())  # noqa: E731
    return LossInputs(mask_BT, at(sampled_ids_BT[..., None])[..., 0], behaviour_BT, teacher_sampled_BT,
                      topk_ids_BTK, topk_lp_BTK, at(topk_ids_BTK), at(mc_ids_BTN), mc_behaviour_BTN,
                      mc_teacher_BTN, at(draw_ids_BTN), draw_lp_BTN,
                      student_BTV.detach().topk(student_BTV.shape[-1], -1).indices)


def dists(scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    student = torch.log_softmax(torch.randn(B, T, V, dtype=torch.float64) * scale, -1)
    teacher = torch.log_softmax(torch.randn(B, T, V, dtype=torch.float64) * scale, -1)
    return student, teacher


def exact_forward_kl(student, teacher):
    return (teacher.exp() * (teacher - student)).sum(-1)


def exact_reverse_kl(student, teacher):
    return (student.exp() * (student - teacher)).sum(-1)


@pytest.mark.parametrize("variant", ["plain", "renorm", "tail"])
def test_forward_kl_topk_equals_exact_kl_when_k_is_vocab(variant):
    student, teacher = dists()
    top_lp, top_ids = teacher.topk(V, -1)
    got = forward_kl_topk(student.gather(-1, top_ids), top_lp, variant)
    torch.testing.assert_close(got, exact_forward_kl(student, teacher), rtol=1e-9, atol=1e-9)


def test_forward_kl_topk_truncated_and_tail_bucket():
    student, teacher = dists()
    k = 3
    top_lp, top_ids = teacher.topk(k, -1)
    s_k = student.gather(-1, top_ids)
    ref = (top_lp.exp() * (top_lp - s_k)).sum(-1)
    torch.testing.assert_close(forward_kl_topk(s_k, top_lp, "plain"), ref)
    p_tail = 1 - top_lp.exp().sum(-1)
    pi_tail = 1 - s_k.exp().sum(-1)
    torch.testing.assert_close(forward_kl_topk(s_k, top_lp, "tail"),
                               ref + p_tail * (p_tail / pi_tail).log())
    # the tail bucket makes the estimate a KL between (k+1)-bucket distributions: >= 0
    assert (forward_kl_topk(s_k, top_lp, "tail") >= -1e-12).all()


def test_forward_kl_gradient_matches_exact():
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    _, teacher = dists()
    top_lp, top_ids = teacher.topk(V, -1)
    g_topk, = torch.autograd.grad(forward_kl_topk(torch.log_softmax(logits, -1).gather(-1, top_ids), top_lp).sum(), logits)
    g_exact, = torch.autograd.grad(exact_forward_kl(torch.log_softmax(logits, -1), teacher).sum(), logits)
    torch.testing.assert_close(g_topk, g_exact)


def reverse_kl_grad_by_sampling(n: int, behaviour_logits, student_logits, teacher, estimator):
    """Average gradient over exact enumeration of tokens weighted by mu (expectation, no noise)."""
    logits = student_logits.clone().requires_grad_(True)
    student = torch.log_softmax(logits, -1)
    mu = torch.log_softmax(behaviour_logits, -1)
    ids = torch.arange(V).expand(B, T, V)
    # E_mu[f(y)] = sum_y mu(y) f(y): weight each token's per-sample loss by mu(y)
    loss = estimator(student.gather(-1, ids), mu.gather(-1, ids), teacher.gather(-1, ids))
    g, = torch.autograd.grad((mu.exp() * loss).sum(), logits)
    return g


def test_recompute_gradient_is_exact_reverse_kl_gradient_even_when_stale():
    student_logits = torch.randn(B, T, V, dtype=torch.float64)
    stale_logits = student_logits + torch.randn(B, T, V, dtype=torch.float64)  # mu != pi
    _, teacher = dists()
    got = reverse_kl_grad_by_sampling(V, stale_logits, student_logits, teacher,
                                      lambda s, b, t: sampled_reverse_kl(s, b, t, "recompute"))
    logits = student_logits.clone().requires_grad_(True)
    exact, = torch.autograd.grad(exact_reverse_kl(torch.log_softmax(logits, -1), teacher).sum(), logits)
    torch.testing.assert_close(got, exact)
    stale = reverse_kl_grad_by_sampling(V, stale_logits, student_logits, teacher,
                                        lambda s, b, t: sampled_reverse_kl(s, b, t, "stale"))
    assert (stale - exact).abs().max() > 1e-2  # the stale advantage is biased off-policy


def test_mc_reverse_kl_average_gradient_matches_exact_under_stale_behaviour():
    student_logits = torch.randn(1, 1, V, dtype=torch.float64)
    mu_logits = student_logits + 0.5 * torch.randn(1, 1, V, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(1, 1, V, dtype=torch.float64), -1)
    mu = torch.log_softmax(mu_logits, -1)
    gen = torch.Generator().manual_seed(0)
    n, draws = 8, 4000
    ids = torch.multinomial(mu[0, 0].exp(), n * draws, replacement=True, generator=gen).view(draws, 1, n)
    logits = student_logits.expand(draws, 1, V).clone().requires_grad_(True)
    student = torch.log_softmax(logits, -1)
    loss = mc_reverse_kl(student.gather(-1, ids), mu.expand(draws, 1, V).gather(-1, ids),
                         teacher.expand(draws, 1, V).gather(-1, ids))
    g, = torch.autograd.grad(loss.sum() / draws, logits)
    mc_grad = g.sum(0)
    ref_logits = student_logits.clone().requires_grad_(True)
    exact, = torch.autograd.grad(exact_reverse_kl(torch.log_softmax(ref_logits, -1), teacher).sum(), ref_logits)
    assert (mc_grad - exact[0]).abs().max() < 0.05 * exact.abs().max() + 0.01


def test_ppo_clip_caps_the_ratio():
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)  # ratios e and 1/e
    t = torch.tensor([[0.5, 0.5]], dtype=torch.float64)  # positive advantage under recompute
    loss = sampled_reverse_kl(s, b, t, "recompute", clip_eps=0.2)
    adv = 0.5
    torch.testing.assert_close(loss, torch.tensor([[-adv * 1.2, -adv * torch.exp(torch.tensor(-1.0)).item()]],
                                                  dtype=torch.float64))


def test_objective_masks_padding_and_rejects_unknown():
    student, teacher = dists()
    top_lp, top_ids = teacher.topk(V, -1)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False
    x = dense_inputs(student, mask, ids, student.gather(-1, ids[..., None])[..., 0],
                     teacher.gather(-1, ids[..., None])[..., 0], top_ids, top_lp)
    out = objective(x, {"fkl_topk": 1.0})
    loss, metrics = out.loss, out.metrics
    ref = exact_forward_kl(student, teacher)[mask].mean()
    torch.testing.assert_close(loss, ref)
    assert metrics["kl/forward_topk"] == pytest.approx(float(ref))
    with pytest.raises(ValueError, match="unknown or no estimators"):
        objective(x, {"nope": 1.0})
    with pytest.raises(ValueError, match="MC samples"):
        objective(x, {"rkl_mc": 1.0})


def test_reverse_kl_on_full_support_is_exact():
    from services.learner.losses import reverse_kl_support

    student, teacher = dists()
    torch.testing.assert_close(reverse_kl_support(student, teacher), exact_reverse_kl(student, teacher))


def test_jsd_endpoints_and_midpoint():
    from services.learner.losses import generalized_jsd, skew_kl

    student, teacher = dists()
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.0), exact_forward_kl(student, teacher))
    torch.testing.assert_close(generalized_jsd(student, teacher, 1.0), exact_reverse_kl(student, teacher))
    m = torch.log(0.5 * student.exp() + 0.5 * teacher.exp())
    ref = 0.5 * exact_reverse_kl(teacher, m) + 0.5 * exact_reverse_kl(student, m)
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.5), ref)
    assert (ref <= torch.log(torch.tensor(2.0, dtype=torch.float64)) + 1e-12).all()  # JSD <= log 2
    mix = torch.log(0.1 * teacher.exp() + 0.9 * student.exp())
    torch.testing.assert_close(skew_kl(teacher, student, 0.1), exact_reverse_kl(teacher, mix))


def test_teacher_sampled_forward_kl_gradient_is_unbiased():
    from services.learner.losses import teacher_sampled_forward_kl

    logits = torch.randn(1, 1, V, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(1, 1, V, dtype=torch.float64), -1)
    # exact expectation over y ~ p: weight each token's loss by p(y)
    x = logits.clone().requires_grad_(True)
    student = torch.log_softmax(x, -1)
    ids = torch.arange(V).view(1, 1, V)
    per_draw = teacher_sampled_forward_kl(student.gather(-1, ids).unsqueeze(-1), teacher.gather(-1, ids).unsqueeze(-1))
    g, = torch.autograd.grad((teacher.exp() * per_draw).sum(), x)
    y = logits.clone().requires_grad_(True)
    exact, = torch.autograd.grad(exact_forward_kl(torch.log_softmax(y, -1), teacher).sum(), y)
    torch.testing.assert_close(g, exact)


def test_every_estimator_runs_and_is_finite_with_full_inputs():
    from services.learner.losses import ESTIMATORS, ObjectiveConfig

    student, teacher = dists()
    logits = student.clone().requires_grad_(True)
    s = torch.log_softmax(logits, -1)
    top_lp, top_ids = teacher.topk(5, -1)
    ids = torch.randint(0, V, (B, T))
    mc = torch.cat([ids[..., None], torch.randint(0, V, (B, T, 3))], -1)
    draws = torch.randint(0, V, (B, T, 2))
    x = dense_inputs(s, torch.ones(B, T, dtype=torch.bool), ids, s.detach().gather(-1, ids[..., None])[..., 0],
                     teacher.gather(-1, ids[..., None])[..., 0], top_ids, top_lp, mc,
                     s.detach().gather(-1, mc), teacher.gather(-1, mc), draws, teacher.gather(-1, draws))
    for name in ESTIMATORS:
        loss = objective(x, ObjectiveConfig(losses={name: 1.0})).loss
        g, = torch.autograd.grad(loss, logits, retain_graph=True)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and g.abs().sum() > 0, name
    with pytest.raises(ValueError, match="unknown"):
        ObjectiveConfig(losses={"nope": 1.0})


def test_sequence_weights_scale_each_trajectorys_terms_and_gradients():
    """Per-teacher loss weights: row b's loss and gradient scale by w_b (0 drops it); the
    per-sequence losses add up to the total."""
    import dataclasses

    student, teacher = dists()
    logits = student.clone().requires_grad_(True)
    s = torch.log_softmax(logits, -1)
    top_lp, top_ids = teacher.topk(5, -1)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    x = dense_inputs(s, mask, ids, s.detach().gather(-1, ids[..., None])[..., 0],
                     teacher.gather(-1, ids[..., None])[..., 0], top_ids, top_lp)
    losses = {"fkl_topk": 1.0, "rkl_recompute": 0.5}
    plain = objective(x, losses, normaliser=10.0)
    w = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    weighted = objective(dataclasses.replace(x, sequence_weights_B=w), losses, normaliser=10.0)
    torch.testing.assert_close(weighted.sequence_losses_B, plain.sequence_losses_B * w)
    torch.testing.assert_close(weighted.loss, (plain.sequence_losses_B * w).sum() / 10.0)
    torch.testing.assert_close(plain.sequence_losses_B.sum() / 10.0, plain.loss.detach())
    g, = torch.autograd.grad(weighted.loss, logits, retain_graph=True)
    assert g[1].abs().max() == 0 and g[0].abs().max() > 0  # weight 0: no gradient from row 1
    per_row = []
    for b in range(B):
        only = torch.zeros(B, dtype=torch.float64)
        only[b] = 1.0
        gb, = torch.autograd.grad(objective(dataclasses.replace(x, sequence_weights_B=only), losses,
                                            normaliser=10.0).loss, logits, retain_graph=True)
        per_row.append(gb)
    torch.testing.assert_close(g, 2.0 * per_row[0] + 1.0 * per_row[2])
