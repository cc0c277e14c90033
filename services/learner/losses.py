"""OPD loss estimators: pure torch functions on per-position tensors.

Notation (docs/losses.md): mu = behaviour student that sampled the prefix, pi = current
student at the learner, p = teacher, y_t = sampled token. Every estimator returns a
per-position loss [B, T] from log-probs at a few ids per position (never a [B, T, V]
tensor); `objective` weights, down-weights (drift control, per-teacher weights) and sums
them over response tokens, divided by the step's token count. No I/O here: tests/test_losses.py checks each against dense
float64 references.

    python -c "import services.learner.losses as L; print(sorted(L.ESTIMATORS))"
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.learner.drift import DriftConfig, drift_weights, topk_overlap
from services.learner.stabilisers import StabiliserConfig, policy_gradient, sequence_log_weights

TAIL_EPS = 1e-6


def forward_kl_topk(student_topk_BTK: torch.Tensor, topk_logprobs_BTK: torch.Tensor,
                    variant: str = "plain") -> torch.Tensor:
    """Teacher-weighted forward KL on the teacher's top-k: sum_i p(i) [log p(i) - log pi(i)],
    from log pi at the teacher's top-k ids (student_topk_BTK).

    "plain": as written (exact KL when k = V); "renorm": both renormalised over the top-k;
    "tail": plain plus a tail bucket p_tail log(p_tail / pi_tail), only pi_tail clamped.
    The weights p do not depend on mu, which is why this is robust to stale rollouts.
    """
    s_BTK, t_BTK = student_topk_BTK, topk_logprobs_BTK
    if variant == "renorm":
        t_BTK = t_BTK - torch.logsumexp(t_BTK, -1, keepdim=True)
        s_BTK = s_BTK - torch.logsumexp(s_BTK, -1, keepdim=True)
    loss_BT = (t_BTK.exp() * (t_BTK - s_BTK)).sum(-1)
    if variant == "tail":
        p_tail = (1.0 - t_BTK.exp().sum(-1)).clamp(min=0.0)
        pi_tail = (1.0 - s_BTK.exp().sum(-1)).clamp(min=TAIL_EPS)
        loss_BT = loss_BT + torch.xlogy(p_tail, p_tail) - p_tail * pi_tail.log()
    elif variant not in ("plain", "renorm"):
        raise ValueError(f"unknown forward-KL variant {variant!r}")
    return loss_BT


def reverse_kl_support(student_logprobs_BTS: torch.Tensor, teacher_logprobs_BTS: torch.Tensor) -> torch.Tensor:
    """Reverse KL on a cached support S: sum_{i in S} pi(i) [log pi(i) - log p(i)].
    Biased (and unstable) when pi's mass leaves S; exact when S is the whole vocabulary."""
    return (student_logprobs_BTS.exp() * (student_logprobs_BTS - teacher_logprobs_BTS)).sum(-1)


def advantage(student_BT: torch.Tensor, behaviour_BT: torch.Tensor, teacher_BT: torch.Tensor,
              kind: str) -> torch.Tensor:
    """Per-token reward log p - log(policy): "stale" uses mu, "recompute" the current pi."""
    if kind == "stale":
        return teacher_BT - behaviour_BT
    if kind == "recompute":
        return (teacher_BT - student_BT).detach()
    raise ValueError(f"unknown advantage {kind!r}")


def sampled_reverse_kl(student_logprob_BT: torch.Tensor, behaviour_logprob_BT: torch.Tensor,
                       teacher_logprob_BT: torch.Tensor, advantage_kind: str = "recompute",
                       clip_eps: float | None = None, *, stabiliser: StabiliserConfig | None = None,
                       mask_BT: torch.Tensor | None = None, keep_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Policy-gradient reverse KL on the sampled token: -A pi(y)/mu(y), optionally PPO-clipped
    (clip_eps) or stabilised (`stabiliser`, see stabilisers.py; mask_BT for the ones that
    look across tokens, keep_BT an M2PO mask fixed over a larger batch)."""
    adv = advantage(student_logprob_BT, behaviour_logprob_BT, teacher_logprob_BT, advantage_kind)
    if stabiliser is None:
        stabiliser = StabiliserConfig("none" if clip_eps is None else "ppo_clip",
                                      clip_eps=0.2 if clip_eps is None else clip_eps)
    mask = torch.ones_like(adv, dtype=torch.bool) if mask_BT is None else mask_BT
    return policy_gradient(adv, student_logprob_BT, behaviour_logprob_BT, mask, stabiliser, keep_BT=keep_BT)


def mc_reverse_kl(student_logprobs_BTN: torch.Tensor, behaviour_logprobs_BTN: torch.Tensor,
                  teacher_logprobs_BTN: torch.Tensor) -> torch.Tensor:
    """Multi-sample MC reverse KL: the recompute estimator averaged over N draws from mu.
    Unbiased for grad KL(pi || p) under the current student whatever mu was; variance ~ 1/N."""
    return sampled_reverse_kl(student_logprobs_BTN, behaviour_logprobs_BTN, teacher_logprobs_BTN).mean(-1)


def teacher_sampled_forward_kl(student_logprobs_BTN: torch.Tensor, teacher_logprobs_BTN: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_j [log p(y_j) - log pi(y_j)], y_j ~ p: unbiased forward KL (and gradient)."""
    return (teacher_logprobs_BTN - student_logprobs_BTN).mean(-1)


def generalized_jsd(student_BTS: torch.Tensor, teacher_BTS: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD_beta = beta KL(p||m) + (1-beta) KL(pi||m), m = beta p + (1-beta) pi, over a support
    where both are normalised; beta = 0 is forward KL(p||pi), beta = 1 reverse KL(pi||p)."""
    if beta <= 0.0:
        return reverse_kl_support(teacher_BTS, student_BTS)
    if beta >= 1.0:
        return reverse_kl_support(student_BTS, teacher_BTS)
    log_m = torch.logsumexp(torch.stack([teacher_BTS + math.log(beta),
                                         student_BTS + math.log(1 - beta)]), 0)
    return beta * reverse_kl_support(teacher_BTS, log_m) + (1 - beta) * reverse_kl_support(student_BTS, log_m)


def skew_kl(a_BTS: torch.Tensor, b_BTS: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew KL(a || alpha a + (1-alpha) b) over a normalised support (DistiLLM)."""
    mix = torch.logsumexp(torch.stack([a_BTS + math.log(alpha), b_BTS + math.log(1 - alpha)]), 0)
    return reverse_kl_support(a_BTS, mix)


@dataclass
class LossInputs:
    """Everything the estimators may use for one (micro-)batch, padded to [B, T(, K|N)].

    The student enters only through log pi at the id sets the estimators look at (with
    grad), computed by the chunked kernel (shared/logprobs.py) without a [B, T, V] tensor.
    """

    mask_BT: torch.Tensor  # bool, response tokens
    student_sampled_BT: torch.Tensor  # log pi(y_t), with grad
    behaviour_logprobs_BT: torch.Tensor  # log mu(y_t)
    teacher_sampled_logprobs_BT: torch.Tensor  # log p(y_t)
    topk_ids_BTK: torch.Tensor  # the teacher's top-k ids
    topk_logprobs_BTK: torch.Tensor  # log p at them
    student_topk_BTK: torch.Tensor  # log pi at them, with grad
    student_mc_BTN: torch.Tensor | None = None  # log pi at the MC ids (column 0 = y_t)
    mc_behaviour_logprobs_BTN: torch.Tensor | None = None
    mc_teacher_logprobs_BTN: torch.Tensor | None = None
    student_draws_BTN: torch.Tensor | None = None  # log pi at y_j ~ p
    teacher_draw_logprobs_BTN: torch.Tensor | None = None
    student_top_ids_BTk: torch.Tensor | None = None  # the student's own top-k ids (drift control)
    m2po_keep_BT: torch.Tensor | None = None  # M2PO's keep-mask when fixed over a whole step
    sequence_weights_B: torch.Tensor | None = None  # per-trajectory loss weight (per-teacher weights)

    def on_topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) log-probs renormalised over the teacher's top-k support."""
        s, t = self.student_topk_BTK, self.topk_logprobs_BTK
        return s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which estimators (name -> weight) and how the sampled ones are stabilised."""

    losses: dict[str, float] = field(default_factory=lambda: {"fkl_topk": 1.0})
    stabiliser: StabiliserConfig = StabiliserConfig()
    vcpo: bool = False  # scale the step's learning rate by sqrt(min(1, ESS/B))
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    drift: DriftConfig = DriftConfig()

    def __post_init__(self) -> None:
        unknown = set(self.losses) - set(ESTIMATORS)
        if unknown or not self.losses:
            raise ValueError(f"unknown or no estimators {sorted(unknown)}; known: {sorted(ESTIMATORS)}")


Estimator = Callable[[LossInputs, ObjectiveConfig], torch.Tensor]


def _sampled(kind: str) -> Estimator:
    def estimator(x: LossInputs, cfg: ObjectiveConfig) -> torch.Tensor:
        return sampled_reverse_kl(x.student_sampled_BT, x.behaviour_logprobs_BT,
                                  x.teacher_sampled_logprobs_BT, kind, stabiliser=cfg.stabiliser,
                                  mask_BT=x.mask_BT, keep_BT=x.m2po_keep_BT)
    return estimator


def _need(value: torch.Tensor | None, what: str) -> torch.Tensor:
    if value is None:
        raise ValueError(what)
    return value


def _mc(x: LossInputs, cfg: ObjectiveConfig) -> torch.Tensor:
    student = _need(x.student_mc_BTN, "rkl_mc needs MC samples: set the rollout's mc_samples >= 2")
    return mc_reverse_kl(student, _need(x.mc_behaviour_logprobs_BTN, "MC behaviour log-probs"),
                         _need(x.mc_teacher_logprobs_BTN, "MC teacher log-probs"))


def _teacher_sampled(x: LossInputs, cfg: ObjectiveConfig) -> torch.Tensor:
    student = _need(x.student_draws_BTN, "fkl_teacher_sampled needs teacher draws: set the teacher's draws >= 1")
    return teacher_sampled_forward_kl(student, _need(x.teacher_draw_logprobs_BTN, "teacher draw log-probs"))


ESTIMATORS: dict[str, Estimator] = {
    "fkl_topk": lambda x, c: forward_kl_topk(x.student_topk_BTK, x.topk_logprobs_BTK),
    "fkl_topk_renorm": lambda x, c: forward_kl_topk(x.student_topk_BTK, x.topk_logprobs_BTK, "renorm"),
    "fkl_topk_tail": lambda x, c: forward_kl_topk(x.student_topk_BTK, x.topk_logprobs_BTK, "tail"),
    "rkl_support": lambda x, c: reverse_kl_support(x.student_topk_BTK, x.topk_logprobs_BTK),
    "rkl_stale": _sampled("stale"),
    "rkl_recompute": _sampled("recompute"),
    "rkl_mc": _mc,
    "fkl_teacher_sampled": _teacher_sampled,
    "jsd": lambda x, c: generalized_jsd(*x.on_topk(), c.jsd_beta),
    "skew_fkl": lambda x, c: skew_kl(*reversed(x.on_topk()), c.skew_alpha),
    "skew_rkl": lambda x, c: skew_kl(*x.on_topk(), c.skew_alpha),
}


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    m = mask_BT.to(x_BT.dtype)
    return (x_BT * m).sum() / m.sum().clamp(min=1.0)


@dataclass
class ObjectiveOutput:
    """A (micro-)batch's loss and metrics, both divided by the step's token count (so they add
    up over micro-batches; keys ending in "/max" combine by max), and the per-sequence log
    importance weights VCPO needs once the whole step is seen."""

    loss: torch.Tensor
    metrics: dict[str, float]
    sequence_log_weights_B: torch.Tensor
    sequence_losses_B: torch.Tensor  # each trajectory's weighted loss summed over its tokens (detached)


def objective(x: LossInputs, cfg: ObjectiveConfig | dict[str, float],
              normaliser: float | None = None) -> ObjectiveOutput:
    """Weighted sum of estimators summed over response tokens / normaliser (default: this
    batch's response tokens; the trainer passes the whole step's), plus diagnostics."""
    if isinstance(cfg, dict):
        cfg = ObjectiveConfig(losses=cfg)
    denom = float(normaliser) if normaliser is not None else max(1.0, float(x.mask_BT.sum()))
    weights_BT = x.mask_BT.to(x.student_sampled_BT.dtype)
    metrics: dict[str, float] = {}
    if cfg.drift.enabled:
        top = _need(x.student_top_ids_BTk, "drift control needs the student's own top-k ids")
        overlap = topk_overlap(top, x.topk_ids_BTK, cfg.drift.k)
        weights_BT = drift_weights(overlap, x.mask_BT, cfg.drift)
        metrics.update({"drift/overlap": float((overlap.double() * x.mask_BT).sum()) / denom,
                        "drift/weight": float(weights_BT.double().sum()) / denom})
    if x.sequence_weights_B is not None:
        weights_BT = weights_BT * x.sequence_weights_B.to(weights_BT.dtype)[:, None]
    total = x.student_sampled_BT.new_zeros(())
    per_sequence_B = x.student_sampled_BT.new_zeros(x.mask_BT.shape[0])
    for name, w in cfg.losses.items():
        term_BT = ESTIMATORS[name](x, cfg) * weights_BT
        term = term_BT.sum() / denom
        metrics[f"loss/{name}"] = float(term.detach())
        total = total + w * term
        per_sequence_B = per_sequence_B + w * term_BT.detach().sum(-1)
    metrics.update(_diagnostics(x, denom))
    metrics["loss/total"] = float(total.detach())
    return ObjectiveOutput(total, metrics, sequence_log_weights(x.student_sampled_BT,
                                                                x.behaviour_logprobs_BT, x.mask_BT), per_sequence_B)


def _diagnostics(x: LossInputs, denom: float) -> dict[str, float]:
    with torch.no_grad():
        pi_y, mask = x.student_sampled_BT, x.mask_BT
        ratio = (pi_y - x.behaviour_logprobs_BT).exp()
        total = lambda v: float((v.double() * mask).sum()) / denom  # noqa: E731
        return {
            "kl/reverse_sampled": total(pi_y - x.teacher_sampled_logprobs_BT),
            "kl/forward_topk": total(forward_kl_topk(x.student_topk_BTK, x.topk_logprobs_BTK)),
            "ratio/mean": total(ratio),
            "ratio/max": float(ratio[mask].max()) if mask.any() else 1.0,
        }
