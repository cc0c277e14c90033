"""Trainer steps on N ranks against one process, in float64: what tests/test_distributed.py runs
under torchrun (2 gloo ranks) to check the sharded step's maths for every objective.

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_step.py OUT.json

Each objective of tests/test_logprobs.py (M2PO's whole-step mask, VCPO's whole-step ESS,
MC samples, teacher draws, drift control) on a batch split into micro-batches per rank, and
a batch of one trajectory (a rank with nothing to train runs zero-weight passes), with
FSDP2 (once with gradient checkpointing), and DDP for two of them: two steps on N ranks and on one process from the same
weights. Rank 0 writes the largest weight difference and both runs' metrics to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch

from services.learner import sharding
from services.learner.distributed import Ranks
from services.learner.trainer import Trainer
from shared.models import enable_activation_checkpointing
from test_logprobs import OBJECTIVES, PAD, scored_batch, tiny_model


def trainer(ranks: Ranks | None, parallel: str, objective, checkpointing: bool = False) -> Trainer:
    model = tiny_model()
    if checkpointing:
        enable_activation_checkpointing(model)
    forward = sharding.wrap(model, ranks, parallel) if ranks else None
    return Trainer(model, lr=1e-2, weight_decay=0.01, grad_clip=1.0, objective=objective, pad_id=PAD,
                   chunk_tokens=5, max_tokens_per_microbatch=24, forward=forward, ranks=ranks)


def compare(ranks: Ranks, parallel: str, objective, batch, checkpointing: bool = False) -> dict[str, object]:
    alone = trainer(None, parallel, objective)
    sharded = trainer(ranks, parallel, objective, checkpointing)
    metrics = [(alone.step(batch), sharded.step(batch)) for _ in range(2)][-1]
    full = sharding.full_model_state(sharded.forward)
    if not ranks.leader:
        return {}
    ref = alone.model.state_dict()
    return {"max_diff": max(float((full[k] - ref[k]).abs().max()) for k in ref),
            "moved": max(float((ref[k] - tiny_model().state_dict()[k]).abs().max()) for k in ref),
            "passes": len(alone.plan(batch)), "alone": metrics[0], "sharded": metrics[1]}


# (engine, objective, trajectories, gradient checkpointing): every objective sharded; the
# whole-step sums (M2PO's mask, VCPO's ESS) with a rank out of work; recomputed layers;
# DDP's own gradient exchange
CASES = [*(("fsdp", name, 9, False) for name in sorted(OBJECTIVES)), ("fsdp", "m2po", 1, False),
         ("fsdp", "vcpo+drift", 1, False), ("fsdp", "fkl", 9, True), ("ddp", "fkl", 9, False),
         ("ddp", "vcpo+drift", 1, False)]


def main(out: str) -> None:
    ranks = Ranks.start("cpu", timeout_s=120)
    results = {f"{parallel}/{name}/{n}" + ("/checkpointing" if ckpt else ""):
               compare(ranks, parallel, OBJECTIVES[name], scored_batch(n=n), ckpt) for parallel, name, n, ckpt in CASES}
    if ranks.leader:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
