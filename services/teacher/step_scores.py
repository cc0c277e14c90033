"""One teacher engine step scored in one pass: the rows of every staged job, one copy each way.

The math and host bookkeeping of the teacher's vLLM worker hook
(services/teacher/vllm_backend.py), free of vLLM so that they run, are tested and are
benchmarked on their own. Per engine step:

    job = new_job(prompt_len, num_tokens, top_k, draws, mc_ids)  # once per trajectory
    segments = [(job, t0, n), ...]        # this step scores rows t0..t0+n-1 of each job
    inputs = step_inputs(segments, rows, targets)   # int64 [rows, 2 + W]: ONE host -> device copy
    logits = model.compute_logits(hidden[inputs[:, 0]])              # ONE logits computation
    packed = score_rows(logits, inputs, k, draws, generator)         # top-k, gathers, draws on the device
    split_rows(segments, packed.cpu().numpy(), k, draws)             # ONE device -> host copy

From ONE float32 log_softmax, as services/teacher/scorer.py: top-k ids + log-probs
(descending) and the tail mass, log p of the target (next) tokens, log p of the jobs' MC
ids, and `draws` ids drawn from p (seeded generator) with their log p. Python loops run
over jobs (segments), never over rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from shared.packed_columns import pack, unpack
from shared.wire import tail_mass

if TYPE_CHECKING:
    import torch

Segment = tuple[dict[str, Any], int, int]  # (job, first job row t0, rows n)


def new_job(prompt_len: int, num_tokens: int, top_k: int, draws: int,
            mc_ids: np.ndarray | None) -> dict[str, Any]:
    """Output buffers for one trajectory (filled row by row, possibly over several steps)."""
    t = num_tokens
    return {
        "prompt_len": prompt_len, "filled": 0, "mc_ids": mc_ids,
        "topk_ids": np.zeros((t, top_k), np.int32), "topk_logprobs": np.zeros((t, top_k), np.float32),
        "tail_mass": np.zeros(t, np.float32), "sampled": np.zeros(t, np.float32),
        "mc": None if mc_ids is None else np.zeros(mc_ids.shape, np.float32),
        "draw_ids": np.zeros((t, draws), np.int32) if draws else None,
        "draw_logprobs": np.zeros((t, draws), np.float32) if draws else None,
    }


def widths(segments: list[Segment]) -> tuple[int, int]:
    """(k, draws) of the step: the largest over its jobs (each job keeps its own columns)."""
    k = max(job["topk_ids"].shape[1] for job, _, _ in segments)
    d = max(0 if job["draw_ids"] is None else job["draw_ids"].shape[1] for job, _, _ in segments)
    return k, d


def step_inputs(segments: list[Segment], rows: list[np.ndarray], targets: list[np.ndarray]) -> np.ndarray:
    """int64 [rows, 2 + W]: hidden-state row, target token, the job's MC ids (W: the widest
    job's N; jobs without MC, or narrower, read id 0 there)."""
    width = max((job["mc_ids"].shape[1] for job, _, _ in segments if job["mc_ids"] is not None), default=0)
    out = np.zeros((sum(n for _, _, n in segments), 2 + width), np.int64)
    out[:, 0], out[:, 1] = np.concatenate(rows), np.concatenate(targets)
    row = 0
    for job, t0, n in segments:
        if job["mc_ids"] is not None:
            out[row:row + n, 2:2 + job["mc_ids"].shape[1]] = job["mc_ids"][t0:t0 + n]
        row += n
    return out


def score_rows(logits: torch.Tensor, inputs: torch.Tensor, k: int, draws: int,
               generator: torch.Generator | None) -> torch.Tensor:
    """Packed int32 [rows, k + draws | k + 1 + W + draws]: ints top-k ids, draw ids; floats
    top-k log-probs, target log p, MC log p, draw log p. `inputs`: step_inputs on the device."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = lp.topk(k, dim=-1)
    ints, floats = [top_ids], [top_lp, lp.gather(-1, inputs[:, 1:2]), lp.gather(-1, inputs[:, 2:])]
    if draws:
        drawn = torch.multinomial(lp.exp(), draws, replacement=True, generator=generator)
        ints.append(drawn)
        floats.append(lp.gather(-1, drawn))
    return pack(ints, floats)


def split_rows(segments: list[Segment], packed: np.ndarray, k: int, draws: int) -> None:
    """Write a step's packed results into each job's rows (as scorer.py fills them)."""
    ints, floats = unpack(packed, k + draws)
    width = floats.shape[1] - k - 1 - draws  # float columns: top-k, target, MC, draws
    row = 0
    for job, t0, n in segments:
        f, i, t1 = floats[row:row + n], ints[row:row + n], t0 + n
        kj = job["topk_ids"].shape[1]
        job["topk_logprobs"][t0:t1], job["topk_ids"][t0:t1] = f[:, :kj], i[:, :kj]
        job["tail_mass"][t0:t1] = tail_mass(f[:, :kj])
        job["sampled"][t0:t1] = f[:, k]
        if job["mc"] is not None:
            job["mc"][t0:t1] = f[:, k + 1:k + 1 + job["mc"].shape[1]]
        if job["draw_ids"] is not None:
            dj = job["draw_ids"].shape[1]
            job["draw_logprobs"][t0:t1] = f[:, k + 1 + width:k + 1 + width + dj]
            job["draw_ids"][t0:t1] = i[:, k:k + dj]
        job["filled"] += n
        row += n
