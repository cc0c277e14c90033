"""Transformers teacher scorer: one forward pass per batch -> the finite teacher-score cache.

For each completion position t it keeps the teacher's top-k ids and log-probs (descending),
the tail mass 1 - sum_topk p, log p(y_t) of the sampled token and log p of the trajectory's
MC sample ids. Everything is computed in float32 from one log_softmax.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from shared.sequences import completion_logits, pack
from shared.wire import TeacherScores, Trajectory


@torch.no_grad()
def score(
    model: torch.nn.Module, trajectories: list[Trajectory], *, top_k: int, pad_id: int,
    draws: int = 0, generator: torch.Generator | None = None, name: str = "", replica: str = "",
) -> list[TeacherScores]:
    """Score a batch of trajectories; returns one TeacherScores per trajectory, in order."""
    device = next(model.parameters()).device
    batch = pack([t.prompt.prompt_ids_P for t in trajectories],
                 [t.completion_ids_T for t in trajectories], pad_id).to(str(device))
    logprobs_BTV = torch.log_softmax(completion_logits(model, batch), dim=-1)
    k = min(top_k, logprobs_BTV.shape[-1])
    topk_lp_BTK, topk_ids_BTK = logprobs_BTV.topk(k, dim=-1)
    tail_BT = (1.0 - topk_lp_BTK.exp().sum(-1)).clamp(0.0, 1.0)
    sampled_BT = logprobs_BTV.gather(-1, batch.completion_ids_BT.unsqueeze(-1))[..., 0]
    draw_ids_BTN = draw_lp_BTN = None
    if draws > 0:  # y_j ~ p per position, for the teacher-sampled forward KL
        b, t, v = logprobs_BTV.shape
        draw_ids_BTN = torch.multinomial(logprobs_BTV.exp().view(b * t, v), draws, replacement=True,
                                         generator=generator).view(b, t, draws)
        draw_lp_BTN = logprobs_BTV.gather(-1, draw_ids_BTN)
    now = time.time()
    out = []
    for i, traj in enumerate(trajectories):
        n = traj.num_tokens
        mc = None
        if traj.mc_ids_TN is not None:
            ids = torch.from_numpy(traj.mc_ids_TN.astype(np.int64)).to(device)
            mc = logprobs_BTV[i, :n].gather(-1, ids).cpu().numpy()
        out.append(TeacherScores(
            topk_ids_TK=topk_ids_BTK[i, :n].cpu().numpy().astype(np.int32),
            topk_logprobs_TK=topk_lp_BTK[i, :n].cpu().numpy(),
            tail_mass_T=tail_BT[i, :n].cpu().numpy(),
            sampled_logprobs_T=sampled_BT[i, :n].cpu().numpy(),
            mc_logprobs_TN=mc, teacher=name, replica=replica, scored_at=now,
            draw_ids_TN=None if draw_ids_BTN is None else draw_ids_BTN[i, :n].cpu().numpy().astype(np.int32),
            draw_logprobs_TN=None if draw_lp_BTN is None else draw_lp_BTN[i, :n].cpu().numpy(),
        ))
    return out
