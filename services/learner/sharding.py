"""How a multi-rank learner spreads the student over its ranks, and how the full state comes back.

`wrap` puts the student behind `CompletionLogprobs` (shared/logprobs.py: the trainer's
whole forward, model and chunked output head, as one module, so the engine's hooks see it)
and hands it to PyTorch's engine:

- fsdp (default): FSDP2, `torch.distributed.fsdp.fully_shard`, on each decoder layer (the
  model's `_no_split_modules` classes) and on the root (embeddings, final norm and the tied
  LM head). Parameters, gradients and AdamW state live 1/N on each rank; a unit's
  parameters are all-gathered for its forward and backward, its gradients reduce-scattered.
- ddp: a full replica per rank, gradients all-reduced (also where torch lacks FSDP2).

Both average gradients over ranks; the trainer scales each rank's loss by the world size,
so the update is the one-process update on the whole step (trainer.py).

Full state (collectives: every rank calls them; rank 0 gets the tensors, on CPU):
`full_model_state` and `full_optimizer_state` gather with torch.distributed.checkpoint's
get_model_state_dict / get_optimizer_state_dict (full_state_dict, cpu_offload); the AdamW
state is re-keyed by parameter index, the layout of a single process's
`optimizer.state_dict()`, so a checkpoint does not depend on the world size.
`load_full_state` is the reverse: rank 0's tensors broadcast and re-sharded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from services.learner.distributed import Ranks

log = logging.getLogger("opd.learner")
PREFIX = "student."  # CompletionLogprobs' attribute: parameter names in the engine's state dicts
Parallel = Literal["fsdp", "ddp"]


def wrap(model: torch.nn.Module, ranks: Ranks, parallel: Parallel = "fsdp") -> torch.nn.Module:
    """The forward module the trainer runs on this rank, the student sharded or replicated.
    `model` may be on the CPU: FSDP2 moves each unit's shard to the rank's device as it
    shards it (no whole model on any GPU), DDP moves the replica."""
    import torch

    from shared.logprobs import CompletionLogprobs

    forward = CompletionLogprobs(model)
    if parallel == "fsdp":
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch before FSDP2's public API
            log.warning("this torch has no torch.distributed.fsdp.fully_shard: using DDP")
        else:
            mesh = init_device_mesh(torch.device(ranks.device).type, (ranks.world,))
            layers = set(getattr(model, "_no_split_modules", None) or ())
            for module in model.modules():
                if type(module).__name__ in layers:
                    fully_shard(module, mesh=mesh)
            return fully_shard(forward, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(ranks.device)
    return DistributedDataParallel(forward.to(device), device_ids=None if device.type == "cpu" else [device])


def _options(**kwargs: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(forward: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's full state dict (its own keys) on rank 0; {} on the others."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(forward, options=_options(cpu_offload=True))
    return {k[len(PREFIX):]: v for k, v in state.items()}


def full_optimizer_state(forward: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         names: list[str]) -> dict[str, Any]:
    """The AdamW state_dict as one process would have it (keyed by index into `names`, the
    student's parameter names in optimizer order) on rank 0; {} on the others."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:  # nothing to gather (and the engine would take a zero step to make some)
        return optimizer.state_dict()
    full = get_optimizer_state_dict(forward, optimizer, options=_options(cpu_offload=True))
    return _by_index(full, names) if full else {}


def load_full_state(forward: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str],
                    model_state: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None,
                    leader: bool) -> None:
    """Set every rank's shard from rank 0's full state (the others pass None); with
    `optimizer_state` None on rank 0 (a checkpoint before the first step) AdamW stays fresh."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(broadcast_from_rank0=True)
    model = {PREFIX + k: v for k, v in model_state.items()} if leader and model_state else {}
    set_model_state_dict(forward, model, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(forward, optimizer, _by_name(optimizer_state, names) if leader else {},
                                 options=options)


def _by_index(full: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state_dict keyed by parameter names -> keyed by index, as one process's."""
    index = {PREFIX + n: i for i, n in enumerate(names)}
    return {"state": {index[k]: v for k, v in full["state"].items()},
            "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in full["param_groups"]]}


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The reverse of `_by_index`."""
    return {"state": {PREFIX + names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [PREFIX + names[int(i)] for i in g["params"]]}
                             for g in state["param_groups"]]}
