"""One learner optimizer step on a batch of scored trajectories.

Packs prompt+completion sequences, runs the current student (pi) with gradients, builds
`LossInputs` from the teacher-score cache and the behaviour log-probs, evaluates the
configured estimators (services/learner/losses.py) and steps AdamW.
"""

from __future__ import annotations

import numpy as np
import torch

from services.learner.losses import LossInputs, ObjectiveConfig, objective
from shared.sequences import PackedBatch, completion_logits, pack, pad_rows
from shared.wire import ScoredTrajectory


class Trainer:
    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float,
                 grad_clip: float, objective: ObjectiveConfig, pad_id: int, warmup_steps: int = 0) -> None:
        self.model, self.grad_clip, self.objective, self.pad_id = model, grad_clip, objective, pad_id
        self.lr, self.warmup_steps, self.steps = lr, warmup_steps, 0
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self, batch: list[ScoredTrajectory]) -> dict[str, float]:
        """Forward, loss, backward, clip, AdamW step; returns scalar metrics."""
        self.model.train()
        packed = pack([b.trajectory.prompt.prompt_ids_P for b in batch],
                      [b.trajectory.completion_ids_T for b in batch], self.pad_id)
        packed = packed.to(str(self.device))
        logprobs_BTV = torch.log_softmax(completion_logits(self.model, packed), dim=-1)
        loss, metrics = objective(self.inputs(batch, packed, logprobs_BTV), self.objective)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            metrics["grad_norm"] = float(norm)
        self.steps += 1
        warmup = min(1.0, self.steps / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        for group in self.optimizer.param_groups:  # linear warm-up; VCPO scales this step only
            group["lr"] = self.lr * warmup * metrics["lr_scale"]
        metrics["lr"] = self.lr * warmup * metrics["lr_scale"]
        self.optimizer.step()
        self.model.eval()
        return metrics

    def inputs(self, batch: list[ScoredTrajectory], packed: PackedBatch,
               logprobs_BTV: torch.Tensor) -> LossInputs:
        """Pad the per-trajectory arrays to [B, T(, K|N)] tensors on the model's device."""
        t_max = packed.mask_BT.shape[1]

        def stack(rows: list[np.ndarray], fill: float | int = 0) -> torch.Tensor:
            return torch.from_numpy(pad_rows(rows, t_max, fill)).to(self.device)

        trajs = [b.trajectory for b in batch]
        scores = [b.scores for b in batch]
        has_mc = all(t.mc_ids_TN is not None for t in trajs)
        has_draws = all(s.draw_ids_TN is not None for s in scores)
        return LossInputs(
            student_logprobs_BTV=logprobs_BTV,
            mask_BT=packed.mask_BT,
            sampled_ids_BT=packed.completion_ids_BT,
            behaviour_logprobs_BT=stack([t.behaviour_logprobs_T for t in trajs]),
            teacher_sampled_logprobs_BT=stack([s.sampled_logprobs_T for s in scores]),
            topk_ids_BTK=stack([s.topk_ids_TK for s in scores]).long(),
            topk_logprobs_BTK=stack([s.topk_logprobs_TK for s in scores]),
            mc_ids_BTN=stack([t.mc_ids_TN for t in trajs]).long() if has_mc else None,
            mc_behaviour_logprobs_BTN=stack([t.mc_logprobs_TN for t in trajs]) if has_mc else None,
            mc_teacher_logprobs_BTN=stack([s.mc_logprobs_TN for s in scores]) if has_mc else None,
            teacher_draw_ids_BTN=stack([s.draw_ids_TN for s in scores]).long() if has_draws else None,
            teacher_draw_logprobs_BTN=stack([s.draw_logprobs_TN for s in scores]) if has_draws else None,
        )
