"""OPD loss estimators: pure torch functions on per-position tensors (see docs/losses in README).

Notation (../shared/reference/opd-methods.md): mu = behaviour student that sampled the
prefix, pi = current student at the learner, p = teacher, y_t = sampled token. Every
estimator returns a per-position loss [B, T]; `objective` averages over response tokens.
All tensors are log-probs; no I/O here, so each function is tested against dense float64
references in tests/test_losses.py.

    python -c "import services.learner.losses as L; print(sorted(L.ESTIMATORS))"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

TAIL_EPS = 1e-6


def forward_kl_topk(
    student_logprobs_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    variant: str = "plain",
) -> torch.Tensor:
    """Teacher-weighted forward KL on the teacher's top-k: sum_i p(i) [log p(i) - log pi(i)].

    variant "plain": as written (exact KL when k = V); "renorm": both distributions
    renormalised over the top-k; "tail": plain plus a tail bucket p_tail log(p_tail/pi_tail).
    The weights p do not depend on mu, which is why this is robust to stale rollouts.
    """
    s_BTK = torch.gather(student_logprobs_BTV, -1, topk_ids_BTK.long())
    t_BTK = topk_logprobs_BTK
    if variant == "renorm":
        t_BTK = t_BTK - torch.logsumexp(t_BTK, -1, keepdim=True)
        s_BTK = s_BTK - torch.logsumexp(s_BTK, -1, keepdim=True)
    loss_BT = (t_BTK.exp() * (t_BTK - s_BTK)).sum(-1)
    if variant == "tail":
        p_tail = (1.0 - t_BTK.exp().sum(-1)).clamp(min=0.0)
        pi_tail = (1.0 - s_BTK.exp().sum(-1)).clamp(min=TAIL_EPS)  # clamp only the student
        loss_BT = loss_BT + torch.xlogy(p_tail, p_tail) - p_tail * pi_tail.log()
    elif variant not in ("plain", "renorm"):
        raise ValueError(f"unknown forward-KL variant {variant!r}")
    return loss_BT


def sampled_reverse_kl(
    student_logprob_BT: torch.Tensor,
    behaviour_logprob_BT: torch.Tensor,
    teacher_logprob_BT: torch.Tensor,
    advantage: str = "recompute",
    clip_eps: float | None = None,
) -> torch.Tensor:
    """Policy-gradient reverse KL on the sampled token: loss = -A * pi(y)/mu(y).

    advantage "stale": A = log p(y) - log mu(y) (what the rollout saw; breaks under staleness);
    "recompute": A = sg(log p(y) - log pi(y)) under the current student (the AsyncOPD fix).
    clip_eps applies PPO clipping of the ratio (None: unclipped, an unbiased IS estimate).
    """
    ratio_BT = torch.exp(student_logprob_BT - behaviour_logprob_BT)
    if advantage == "stale":
        adv_BT = teacher_logprob_BT - behaviour_logprob_BT
    elif advantage == "recompute":
        adv_BT = (teacher_logprob_BT - student_logprob_BT).detach()
    else:
        raise ValueError(f"unknown advantage {advantage!r}")
    surrogate_BT = adv_BT * ratio_BT
    if clip_eps is not None:
        clipped_BT = adv_BT * ratio_BT.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        surrogate_BT = torch.minimum(surrogate_BT, clipped_BT)
    return -surrogate_BT


def mc_reverse_kl(
    student_logprobs_BTN: torch.Tensor,
    behaviour_logprobs_BTN: torch.Tensor,
    teacher_logprobs_BTN: torch.Tensor,
) -> torch.Tensor:
    """Multi-sample MC reverse KL: the recompute estimator averaged over N samples from mu.

    Unbiased for grad KL(pi || p) at each position under the current student, whatever mu
    was (importance weights pi/mu); variance falls like 1/N.
    """
    return sampled_reverse_kl(
        student_logprobs_BTN, behaviour_logprobs_BTN, teacher_logprobs_BTN, "recompute"
    ).mean(-1)


@dataclass
class LossInputs:
    """Everything the estimators may use for one batch, padded to [B, T(, K|N)]."""

    student_logprobs_BTV: torch.Tensor  # log pi, with grad
    mask_BT: torch.Tensor  # bool, response tokens
    sampled_ids_BT: torch.Tensor
    behaviour_logprobs_BT: torch.Tensor  # log mu(y_t)
    teacher_sampled_logprobs_BT: torch.Tensor  # log p(y_t)
    topk_ids_BTK: torch.Tensor
    topk_logprobs_BTK: torch.Tensor
    mc_ids_BTN: torch.Tensor | None = None  # column 0 = y_t
    mc_behaviour_logprobs_BTN: torch.Tensor | None = None
    mc_teacher_logprobs_BTN: torch.Tensor | None = None

    def student_at(self, ids: torch.Tensor) -> torch.Tensor:
        """log pi of given ids: [B, T] or [B, T, N]."""
        if ids.dim() == 2:
            return torch.gather(self.student_logprobs_BTV, -1, ids.long().unsqueeze(-1))[..., 0]
        return torch.gather(self.student_logprobs_BTV, -1, ids.long())


def _rkl(advantage: str) -> Callable[[LossInputs], torch.Tensor]:
    def est(x: LossInputs) -> torch.Tensor:
        return sampled_reverse_kl(x.student_at(x.sampled_ids_BT), x.behaviour_logprobs_BT,
                                  x.teacher_sampled_logprobs_BT, advantage)
    return est


def _mc(x: LossInputs) -> torch.Tensor:
    if x.mc_ids_BTN is None or x.mc_teacher_logprobs_BTN is None:
        raise ValueError("rkl_mc needs MC samples: set the rollout's mc_samples >= 2")
    return mc_reverse_kl(x.student_at(x.mc_ids_BTN), x.mc_behaviour_logprobs_BTN,
                         x.mc_teacher_logprobs_BTN)


ESTIMATORS: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "fkl_topk": lambda x: forward_kl_topk(x.student_logprobs_BTV, x.topk_ids_BTK,
                                          x.topk_logprobs_BTK, "plain"),
    "fkl_topk_renorm": lambda x: forward_kl_topk(x.student_logprobs_BTV, x.topk_ids_BTK,
                                                 x.topk_logprobs_BTK, "renorm"),
    "rkl_stale": _rkl("stale"),
    "rkl_recompute": _rkl("recompute"),
    "rkl_mc": _mc,
}


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    m = mask_BT.to(x_BT.dtype)
    return (x_BT * m).sum() / m.sum().clamp(min=1.0)


def objective(x: LossInputs, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of estimators, each averaged over response tokens; plus diagnostics."""
    unknown = set(weights) - set(ESTIMATORS)
    if unknown:
        raise ValueError(f"unknown estimators {sorted(unknown)}; known: {sorted(ESTIMATORS)}")
    total = x.student_logprobs_BTV.new_zeros(())
    metrics: dict[str, float] = {}
    for name, w in weights.items():
        term = masked_mean(ESTIMATORS[name](x), x.mask_BT)
        metrics[f"loss/{name}"] = float(term.detach())
        total = total + w * term
    with torch.no_grad():
        pi_y = x.student_at(x.sampled_ids_BT)
        metrics["kl/reverse_sampled"] = float(masked_mean(pi_y - x.teacher_sampled_logprobs_BT, x.mask_BT))
        metrics["kl/forward_topk"] = float(masked_mean(forward_kl_topk(
            x.student_logprobs_BTV, x.topk_ids_BTK, x.topk_logprobs_BTK), x.mask_BT))
        metrics["ratio/mean"] = float(masked_mean((pi_y - x.behaviour_logprobs_BT).exp(), x.mask_BT))
    metrics["loss/total"] = float(total.detach())
    return total, metrics
