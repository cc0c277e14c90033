"""Prune-OPD style drift control: student/teacher top-k overlap per position.

When the student's prefix drifts away from anything the teacher would say, the teacher's
targets at later positions say little. Per position, overlap = |topk(pi) ∩ topk(p)| / k.
Weights are a monotone non-increasing function of position: w_t = min_{s<=t} g(overlap_s)
with g ramping from 0 (overlap <= low) to 1 (overlap >= high), so long windows keep full
weight while the overlap stays high and everything after a severe drift is down-weighted.
Optionally the trajectory is truncated (weight 0) from the first position whose overlap
falls below `truncate_below`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DriftConfig:
    enabled: bool = False
    k: int = 8  # top-k size compared (capped at the teacher cache's k)
    low: float = 0.25  # overlap at or below which g = 0
    high: float = 0.75  # overlap at or above which g = 1
    truncate_below: float = 0.0  # 0: no truncation

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high <= 1:
            raise ValueError("drift control needs 0 <= low < high <= 1")


def topk_overlap(student_top_ids_BTk: torch.Tensor, teacher_topk_ids_BTK: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the student's top-k ids that are also in the teacher's top-k, [B, T].
    student_top_ids_BTk: the student's own top ids, descending (at least k, or all of V)."""
    k = min(k, teacher_topk_ids_BTK.shape[-1], student_top_ids_BTk.shape[-1])
    student_top = student_top_ids_BTk[..., :k].long()
    teacher_top = teacher_topk_ids_BTK[..., :k].long()
    hits = (student_top.unsqueeze(-1) == teacher_top.unsqueeze(-2)).any(-1)
    return hits.float().mean(-1)


def drift_weights(overlap_BT: torch.Tensor, mask_BT: torch.Tensor, cfg: DriftConfig) -> torch.Tensor:
    """Monotone per-position weights in [0, 1] (0 on padding)."""
    g = ((overlap_BT - cfg.low) / (cfg.high - cfg.low)).clamp(0.0, 1.0)
    g = g.masked_fill(~mask_BT, 1.0)  # padding must not lower later weights
    weights = torch.cummin(g, dim=1).values
    if cfg.truncate_below > 0:
        severe = (overlap_BT < cfg.truncate_below) & mask_BT
        truncated = torch.cummax(severe.int(), dim=1).values.bool()
        weights = weights.masked_fill(truncated, 0.0)
    return weights * mask_BT
