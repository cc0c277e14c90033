"""Async-RL stabilisers for the sampled reverse-KL policy gradient (pure torch).

The sampled reverse KL is a policy gradient with per-token advantage A_t and importance
ratio r_t = pi(y_t)/mu(y_t). Off-policy (stale) data makes r_t heavy-tailed; these are the
standard remedies the AsyncOPD paper compares against learner-time recompute:

- "none":          -A r                                     (unbiased token-level IS)
- "ppo_clip":      -min(A r, A clip(r, 1-eps, 1+eps))
- "decoupled_ppo": ratio pi/pi_prox clipped, times w = pi_prox/mu; tokens with w > cap dropped
- "m2po":          -A r on the tokens left after masking the largest (log r)^2 until their
                   mean second moment is <= tau
- "tis":           -A sg(min(r, C)) log pi                  (truncated IS)
- "mis":           -A sg(r [r <= C]) log pi                 (masked IS)
- "minpro":        -A sg(min_{s<t} r_s) r_t                 (prefix product -> prefix minimum)

plus VCPO, which scales the step's learning rate by sqrt(min(1, ESS/B)) with
ESS = (sum w)^2 / sum w^2 over sequence weights w = prod_t r_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STABILISERS = ("none", "ppo_clip", "decoupled_ppo", "m2po", "tis", "mis", "minpro")


@dataclass(frozen=True)
class StabiliserConfig:
    kind: str = "none"
    clip_eps: float = 0.2  # PPO / decoupled PPO
    is_cap: float = 2.0  # C for truncated / masked IS
    decoupled_cap: float = 5.0  # drop tokens whose pi_prox/mu exceeds this
    m2po_tau: float = 0.04  # second-moment bound of log-ratios

    def __post_init__(self) -> None:
        if self.kind not in STABILISERS:
            raise ValueError(f"unknown stabiliser {self.kind!r}; known: {STABILISERS}")


def m2po_mask(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor, tau: float) -> torch.Tensor:
    """Keep-mask after dropping the tokens with the largest (log r)^2, fewest first, until the
    mean (log r)^2 of the kept tokens is <= tau."""
    m2 = (log_ratio_BT.detach() ** 2).masked_fill(~mask_BT, float("-inf")).flatten()
    n = int(mask_BT.sum())
    order = m2.argsort(descending=True)[:n]  # valid tokens, largest second moment first
    values = m2[order]
    # mean of values[j:] for each j: drop the j largest
    suffix_sums = values.flip(0).cumsum(0).flip(0)
    suffix_means = suffix_sums / torch.arange(n, 0, -1, device=values.device)
    ok = (suffix_means <= tau).nonzero()
    drop = int(ok[0]) if len(ok) else n
    keep = mask_BT.flatten().clone()
    keep[order[:drop]] = False
    return keep.view_as(mask_BT)


def prefix_min_ratio(ratio_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """min_{s<t} r_s over each sequence's preceding valid tokens (1 at t = 0)."""
    r = ratio_BT.detach().masked_fill(~mask_BT, float("inf"))
    shifted = torch.cat([torch.full_like(r[:, :1], float("inf")), r[:, :-1]], dim=1)
    prefix_min = torch.cummin(shifted, dim=1).values
    return torch.where(torch.isinf(prefix_min), torch.ones_like(prefix_min), prefix_min)


def policy_gradient(
    adv_BT: torch.Tensor,
    logp_BT: torch.Tensor,
    behaviour_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: StabiliserConfig,
    proximal_BT: torch.Tensor | None = None,
    keep_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token loss whose gradient is the stabilised off-policy policy gradient for A.
    keep_BT: M2PO's keep-mask when it was computed over a larger batch (micro-batching)."""
    adv = adv_BT.detach()
    log_ratio = logp_BT - behaviour_BT
    ratio = log_ratio.exp()
    kind = cfg.kind
    if kind == "none":
        return -adv * ratio
    if kind == "ppo_clip":
        return -torch.minimum(adv * ratio, adv * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))
    if kind == "decoupled_ppo":
        prox = logp_BT.detach() if proximal_BT is None else proximal_BT.detach()
        weight = (prox - behaviour_BT).exp()
        r = (logp_BT - prox).exp()
        clipped = torch.minimum(adv * r, adv * r.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))
        return -(weight * clipped) * (weight <= cfg.decoupled_cap)
    if kind == "m2po":
        keep = m2po_mask(log_ratio, mask_BT, cfg.m2po_tau) if keep_BT is None else keep_BT
        return -adv * ratio * keep
    if kind == "tis":
        return -adv * ratio.detach().clamp(max=cfg.is_cap) * logp_BT
    if kind == "mis":
        r = ratio.detach()
        return -adv * (r * (r <= cfg.is_cap)) * logp_BT
    return -adv * prefix_min_ratio(ratio, mask_BT) * ratio  # minpro


def sequence_log_weights(logp_BT: torch.Tensor, behaviour_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """log prod_t r_t per sequence [B] (no gradient): VCPO's sequence-level importance weights."""
    return ((logp_BT.detach() - behaviour_BT) * mask_BT).sum(dim=1)


def vcpo_lr_scale(log_w_B: torch.Tensor) -> float:
    """sqrt(min(1, ESS / B)) from sequence log importance weights (computed in log space)."""
    log_w = log_w_B - log_w_B.max()
    w = log_w.exp()
    ess = float(w.sum() ** 2 / (w ** 2).sum())
    return min(1.0, ess / len(w)) ** 0.5
