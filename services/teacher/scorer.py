"""Transformers teacher scorer: trajectories -> the finite teacher-score cache, in bounded memory.

For each completion position t it keeps the teacher's top-k ids and log-probs (descending),
the tail mass 1 - sum_topk p, log p(y_t) of the sampled token, log p of the trajectory's
MC sample ids and optional draws y_j ~ p. Trajectories are scored in token-budget
micro-batches (shared/microbatch.py) and every micro-batch's positions `chunk_tokens` at
a time through the output head (shared/logprobs.py), so no [B, T, V] tensor exists; the
log-prob maths run in float32 whatever the teacher's weight dtype.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from shared.logprobs import score_positions
from shared.microbatch import microbatches
from shared.sequences import pack, pad_rows
from shared.wire import TeacherScores, Trajectory, tail_mass


@torch.no_grad()
def score(
    model: torch.nn.Module, trajectories: list[Trajectory], *, top_k: int, pad_id: int,
    draws: int = 0, generator: torch.Generator | None = None, name: str = "", replica: str = "",
    chunk_tokens: int = 1024, max_tokens_per_microbatch: int = 0,
) -> list[TeacherScores]:
    """Score a batch of trajectories; returns one TeacherScores per trajectory, in order."""
    out: list[TeacherScores | None] = [None] * len(trajectories)
    lengths = [t.prompt.prompt_ids_P.size + t.num_tokens for t in trajectories]
    for group in microbatches(lengths, max_tokens_per_microbatch):
        sub = [trajectories[i] for i in group]
        scored = _score_packed(model, sub, top_k=top_k, pad_id=pad_id, draws=draws,
                               generator=generator, chunk_tokens=chunk_tokens)
        for i, s in zip(group, scored):
            out[i] = TeacherScores(**s, teacher=name, replica=replica, scored_at=time.time())
    return out  # type: ignore[return-value]


def _score_packed(model: torch.nn.Module, trajs: list[Trajectory], *, top_k: int, pad_id: int,
                  draws: int, generator: torch.Generator | None, chunk_tokens: int) -> list[dict]:
    """One micro-batch: one forward pass, chunked scoring, split back per trajectory."""
    device = next(model.parameters()).device
    batch = pack([t.prompt.prompt_ids_P for t in trajs], [t.completion_ids_T for t in trajs],
                 pad_id).to(str(device))
    t_max = batch.mask_BT.shape[1]
    mc_width = max((t.mc_ids_TN.shape[1] for t in trajs if t.mc_ids_TN is not None), default=0)
    mc_rows = [t.mc_ids_TN if t.mc_ids_TN is not None else np.zeros((t.num_tokens, mc_width), np.int32)
               for t in trajs]
    ids_BTM = batch.completion_ids_BT[..., None]
    if mc_width:  # a trajectory without MC samples gathers id 0 there, and it is not kept
        ids_BTM = torch.cat([ids_BTM, torch.from_numpy(pad_rows(mc_rows, t_max)).to(device).long()], -1)
    p = score_positions(model, batch, ids_BTM, top_k=top_k, chunk_tokens=chunk_tokens,
                        draws=draws, generator=generator)
    numpy = lambda x: x.float().cpu().numpy()  # noqa: E731
    top_lp, top_ids, ids_lp = numpy(p.topk_logprobs_NK), p.topk_ids_NK.cpu().numpy().astype(np.int32), numpy(p.ids_logprobs_NM)
    tail = tail_mass(top_lp)
    draw_ids = None if p.draw_ids_Nd is None else p.draw_ids_Nd.cpu().numpy().astype(np.int32)
    draw_lp = None if p.draw_logprobs_Nd is None else numpy(p.draw_logprobs_Nd)
    out, start = [], 0
    for t in trajs:
        rows = slice(start, start + t.num_tokens)
        start += t.num_tokens
        out.append(dict(
            topk_ids_TK=top_ids[rows], topk_logprobs_TK=top_lp[rows], tail_mass_T=tail[rows],
            sampled_logprobs_T=ids_lp[rows, 0],
            mc_logprobs_TN=None if t.mc_ids_TN is None else ids_lp[rows, 1:1 + t.mc_ids_TN.shape[1]],
            draw_ids_TN=None if draw_ids is None else draw_ids[rows],
            draw_logprobs_TN=None if draw_lp is None else draw_lp[rows]))
    return out
