"""One learner optimizer step on a batch of scored trajectories, in token-budget micro-batches.

The step's B trajectories are split into micro-batches whose padded token count stays
under `max_tokens_per_microbatch` (shared/microbatch.py; one that is longer on its own is
trained alone). Each micro-batch packs its prompt+completion sequences, runs the student
with gradients, takes log pi at the ids the estimators need through the chunked kernel
(shared/logprobs.py: no [B, T, V] tensor, in the forward or the backward), evaluates the
configured estimators (losses.py) normalised by the whole step's token count and
backpropagates. Gradients accumulate, so the update equals the one-batch update; M2PO's
mask and VCPO's learning-rate factor, which look across the batch, are computed over the
whole step too. Then clip and AdamW. Per-teacher loss weights scale every loss term of
a trajectory by its prompt's teacher id's weight; the step reports each teacher's loss per
response token (`teacher_loss/<id>`).

Over N ranks (a torchrun learner: services/learner/student.py) every rank gets the whole
step and trains its shard (shared/microbatch.py `shards`: about equal tokens per rank)
through the sharded forward module (sharding.py). Losses stay normalised by the whole
step's token count and each rank's loss is scaled by N, which the engine's gradient
average undoes: the update is the one-process update. Every rank runs as many passes as
the busiest one (the engine's collectives run in every pass; a rank out of work runs a
zero-weight pass), and M2PO's mask, VCPO's ESS and the metrics are summed over ranks.

dtype "bfloat16" runs the forward and backward under autocast (bf16 matmuls) while the
parameters and AdamW state stay float32; log-prob and loss maths are float32 either way.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from services.learner.distributed import Ranks
from services.learner.losses import LossInputs, ObjectiveConfig, objective
from services.learner.stabilisers import m2po_mask, vcpo_lr_scale
from shared.logprobs import CompletionLogprobs
from shared.microbatch import microbatches, shards
from shared.sequences import pack, pad_rows
from shared.wire import ScoredTrajectory


@dataclass(frozen=True)
class LrSchedule:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to `min_ratio` x lr
    at `total_steps` (a schedule without a known end stays constant)."""

    warmup_steps: int = 0
    kind: str = "constant"
    total_steps: int = 0
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine"):
            raise ValueError(f"lr schedule must be constant or cosine, got {self.kind!r}")

    def factor(self, step: int) -> float:
        """The learning-rate multiplier of optimizer step `step` (1-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant" or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float,
                 grad_clip: float, objective: ObjectiveConfig, pad_id: int, warmup_steps: int = 0,
                 chunk_tokens: int = 1024, max_tokens_per_microbatch: int = 0,
                 dtype: str = "float32", schedule: LrSchedule | None = None,
                 forward: torch.nn.Module | None = None, ranks: Ranks | None = None,
                 teacher_weights: dict[str, float] | None = None) -> None:
        """`forward`: the module that runs the student's log-probs (over N ranks: the sharded
        one from sharding.wrap; default CompletionLogprobs(model)); `ranks`: this rank's place;
        `teacher_weights`: loss weight per prompt teacher id (others 1)."""
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"learner dtype must be float32 or bfloat16, got {dtype!r}")
        self.model, self.grad_clip, self.objective, self.pad_id = model, grad_clip, objective, pad_id
        self.forward = forward if forward is not None else CompletionLogprobs(model)
        self.ranks = ranks or Ranks()
        self.lr, self.steps = lr, 0
        self.teacher_weights = dict(teacher_weights or {})
        self.schedule = schedule or LrSchedule(warmup_steps=warmup_steps)
        self.chunk_tokens, self.max_tokens, self.dtype = chunk_tokens, max_tokens_per_microbatch, dtype
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self, batch: list[ScoredTrajectory]) -> dict[str, float]:
        """Accumulate gradients over micro-batches, clip, AdamW step; returns scalar metrics."""
        self.forward.train()
        groups = self.passes(batch)
        denom = float(max(1, sum(b.trajectory.num_tokens for b in batch)))
        keep = self._m2po_keep(batch, groups) if self._global_m2po(groups) else None
        self.optimizer.zero_grad(set_to_none=True)
        metrics, log_w_B = self._accumulate(batch, groups, denom, keep)
        lr_scale = vcpo_lr_scale(log_w_B) if self.objective.vcpo else 1.0
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            metrics["grad_norm"] = float(getattr(norm, "full_tensor", lambda: norm)())  # sharded: a DTensor
        self.steps += 1
        lr = self.lr * self.schedule.factor(self.steps) * lr_scale  # VCPO scales this step only
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        metrics.update(lr=lr, lr_scale=lr_scale)
        per_teacher_loss(metrics, batch)
        self.optimizer.step()
        self.forward.eval()
        return metrics

    def _accumulate(self, batch: list[ScoredTrajectory], groups: list[list[int] | None], denom: float,
                    keep: torch.Tensor | None) -> tuple[dict[str, float], torch.Tensor | None]:
        """Forward and backward every pass; the step's metrics (all ranks') and, for VCPO,
        the sequence log-weights of the whole step in batch order (rank order alone)."""
        metrics: dict[str, float] = {}
        log_w, rows = [], []
        for g in groups:
            if g is None:  # out of work: a pass that adds nothing, for the engine's collectives
                (self.inputs(batch[:1]).student_sampled_BT.sum() * 0.0).backward()
                continue
            x = self.inputs([batch[i] for i in g], None if keep is None else keep[g])
            out = objective(x, self.objective, normaliser=denom)
            (out.loss * self.ranks.world if self.ranks.distributed else out.loss).backward()
            log_w.append(out.sequence_log_weights_B)
            rows += g
            merge_metrics(metrics, out.metrics)
            for i, loss in zip(g, out.sequence_losses_B.tolist()):
                key = f"teacher_loss_sum/{batch[i].trajectory.prompt.teacher_id}/sum"  # not */max: summed
                metrics[key] = metrics.get(key, 0.0) + loss
        metrics["microbatches"] = sum(g is not None for g in groups)
        merged: dict[str, float] = {}
        for part in self.ranks.all_gather(metrics):
            merge_metrics(merged, part)
        return merged, self._whole_step(log_w, rows, len(batch)) if self.objective.vcpo else None

    def _whole_step(self, log_w: list[torch.Tensor], rows: list[int], n: int) -> torch.Tensor:
        """Per-sequence values of this rank's passes -> the whole step's (summed over ranks)."""
        mine = torch.cat(log_w) if log_w else torch.zeros(0, device=self.device)
        if not self.ranks.distributed:
            return mine
        full = torch.zeros(n, dtype=torch.float64, device=self.device)  # one dtype on every rank
        full[rows] = mine.double()
        return self.ranks.all_sum(full)

    @torch.no_grad()
    def probe(self, batch: list[ScoredTrajectory]) -> list[float]:
        """The loss of these trajectories without training (finding messages that fail alone)."""
        loss = float(objective(self.inputs(batch), self.objective).loss)
        return [loss] * len(batch)

    def plan(self, batch: list[ScoredTrajectory]) -> list[list[int]]:
        """Micro-batches (indices into batch) under the token budget, by packed sequence length."""
        return microbatches(_lengths(batch), self.max_tokens)

    def passes(self, batch: list[ScoredTrajectory]) -> list[list[int] | None]:
        """This rank's micro-batches: alone, `plan`; over N ranks, those of its shard, padded
        with None (a zero-weight pass) to as many as the busiest rank has."""
        if not self.ranks.distributed:
            return self.plan(batch)
        lengths = _lengths(batch)
        plans = [[[part[i] for i in g] for g in microbatches([lengths[i] for i in part], self.max_tokens)]
                 for part in shards(lengths, self.ranks.world)]
        mine = plans[self.ranks.rank]
        return mine + [None] * (max(map(len, plans)) - len(mine))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _global_m2po(self, groups: list[list[int] | None]) -> bool:
        uses = any(n in ("rkl_stale", "rkl_recompute") for n in self.objective.losses)
        return uses and self.objective.stabiliser.kind == "m2po" and (len(groups) > 1 or self.ranks.distributed)

    @torch.no_grad()
    def _m2po_keep(self, batch: list[ScoredTrajectory], groups: list[list[int] | None]) -> torch.Tensor:
        """M2PO's keep-mask [B, T] over the whole step, from a no-grad pass per micro-batch."""
        t_max = max(b.trajectory.num_tokens for b in batch)
        log_ratio = torch.zeros(len(batch), t_max, dtype=torch.float64, device=self.device)
        mask = torch.zeros(len(batch), t_max, dtype=torch.bool, device=self.device)
        for g in groups:
            if g is None:  # the engine's collectives
                self.inputs(batch[:1])
                continue
            x = self.inputs([batch[i] for i in g])
            t = x.mask_BT.shape[1]
            log_ratio[g, :t] = (x.student_sampled_BT - x.behaviour_logprobs_BT).double()
            mask[g, :t] = x.mask_BT
        if self.ranks.distributed:  # each rank filled its own rows
            log_ratio, mask = self.ranks.all_sum(log_ratio), self.ranks.all_sum(mask.double()) > 0
        return m2po_mask(log_ratio, mask, self.objective.stabiliser.m2po_tau)

    def inputs(self, batch: list[ScoredTrajectory], m2po_keep_BT: torch.Tensor | None = None) -> LossInputs:
        """Pack one micro-batch, run the student and gather log pi at every id set the
        configured estimators read (one chunked pass over the vocabulary)."""
        packed = pack([b.trajectory.prompt.prompt_ids_P for b in batch],
                      [b.trajectory.completion_ids_T for b in batch], self.pad_id).to(str(self.device))
        t_max = packed.mask_BT.shape[1]

        def stack(rows: list[np.ndarray], fill: float | int = 0) -> torch.Tensor:
            return torch.from_numpy(pad_rows(rows, t_max, fill)).to(self.device)

        trajs, scores = [b.trajectory for b in batch], [b.scores for b in batch]
        losses = self.objective.losses
        mc = "rkl_mc" in losses and all(t.mc_ids_TN is not None for t in trajs)
        draws = "fkl_teacher_sampled" in losses and all(s.draw_ids_TN is not None for s in scores)
        topk_ids = stack([s.topk_ids_TK for s in scores]).long()
        id_sets = [packed.completion_ids_BT[..., None], topk_ids,
                   *([stack([t.mc_ids_TN for t in trajs]).long()] if mc else []),
                   *([stack([s.draw_ids_TN for s in scores]).long()] if draws else [])]
        drift = self.objective.drift
        top_k = min(drift.k, topk_ids.shape[-1], self._vocab()) if drift.enabled else 0
        with self._autocast():
            logp_BTM, _, top_ids = self.forward(packed, torch.cat(id_sets, -1), self.chunk_tokens, top_k)
        parts = iter(logp_BTM.split([ids.shape[-1] for ids in id_sets], -1))
        sampled, student_topk = next(parts)[..., 0], next(parts)
        return LossInputs(
            mask_BT=packed.mask_BT,
            student_sampled_BT=sampled,
            behaviour_logprobs_BT=stack([t.behaviour_logprobs_T for t in trajs]).to(sampled.dtype),
            teacher_sampled_logprobs_BT=stack([s.sampled_logprobs_T for s in scores]).to(sampled.dtype),
            topk_ids_BTK=topk_ids,
            topk_logprobs_BTK=stack([s.topk_logprobs_TK for s in scores]).to(sampled.dtype),
            student_topk_BTK=student_topk,
            student_mc_BTN=next(parts) if mc else None,
            mc_behaviour_logprobs_BTN=stack([t.mc_logprobs_TN for t in trajs]).to(sampled.dtype) if mc else None,
            mc_teacher_logprobs_BTN=stack([s.mc_logprobs_TN for s in scores]).to(sampled.dtype) if mc else None,
            student_draws_BTN=next(parts) if draws else None,
            teacher_draw_logprobs_BTN=stack([s.draw_logprobs_TN for s in scores]).to(sampled.dtype) if draws else None,
            student_top_ids_BTk=top_ids if drift.enabled else None,
            m2po_keep_BT=None if m2po_keep_BT is None else m2po_keep_BT[:, :t_max],
            sequence_weights_B=torch.tensor([self.teacher_weights.get(t.prompt.teacher_id, 1.0) for t in trajs],
                                            device=self.device) if self.teacher_weights else None,
        )

    def _vocab(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


def merge_metrics(into: dict[str, float], new: dict[str, float]) -> None:
    """Add one pass's (or one rank's) metrics: sums, except `*/max` keys, which take the max."""
    for key, value in new.items():
        into[key] = max(into.get(key, value), value) if key.endswith("/max") else into.get(key, 0.0) + value


def per_teacher_loss(metrics: dict[str, float], batch: list[ScoredTrajectory]) -> None:
    """Turn the step's per-teacher loss sums into `teacher_loss/<teacher id>`: that teacher's
    (weighted) loss per response token, comparable to loss/total."""
    tokens: dict[str, int] = {}
    for b in batch:
        tid = b.trajectory.prompt.teacher_id
        tokens[tid] = tokens.get(tid, 0) + b.trajectory.num_tokens
    for tid, n in tokens.items():
        metrics[f"teacher_loss/{tid}"] = metrics.pop(f"teacher_loss_sum/{tid}/sum", 0.0) / max(1, n)


def _lengths(batch: list[ScoredTrajectory]) -> list[int]:
    """Packed prompt+completion length of each trajectory."""
    return [b.trajectory.prompt.prompt_ids_P.size + b.trajectory.num_tokens for b in batch]
