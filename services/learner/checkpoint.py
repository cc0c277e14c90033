"""Learner checkpoints: weights, AdamW state, version and the trajectory ids consumed so far.

Layout `<dir>/step-000123/` (`step-000123.e1` when a restored learner's epoch 1 checkpoints
version 123 again: a checkpoint is never overwritten, so a crash while saving one always
leaves the previous one whole): `model.safetensors`, `optimizer.safetensors` (every tensor of
the optimizer state, keyed `<param index>.<name>`), `state.json` (version, consumed
trajectory ids, counters, optimizer hyper-parameters). Written to `.tmp` and renamed, so a
crash never leaves a half checkpoint; no pickle anywhere. The learner acks scored
trajectories only once a checkpoint covering them exists, so a restart resumes exactly:
what the checkpoint consumed is skipped, what it did not is reclaimed and trained.

A torchrun learner's rank 0 writes the same files from the gathered full state (the AdamW
state keyed by parameter index, as one process has it: services/learner/sharding.py), so
a checkpoint resumes on any number of ranks, or on one process.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

PREFIX = "step-"


def save(root: str | Path, version: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | dict[str, Any],
         state: dict[str, Any], keep: int = 2, epoch: int = 0) -> Path:
    """Write a checkpoint atomically and prune all but the newest `keep`; `optimizer` is the
    optimizer or its state_dict()."""
    from safetensors.torch import save_file, save_model

    from shared.weights import atomic_dir

    final = Path(root) / (f"{PREFIX}{version:06d}" + (f".e{epoch}" if epoch else ""))
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, scalars = _flatten(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "version": version, "optimizer": scalars}))
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


_NAME = re.compile(rf"^{PREFIX}(\d+)(?:\.e(\d+))?$")


def _complete(root: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first by (version, epoch) (`.tmp` ones are not finished)."""
    done = [(m, p) for p in Path(root).glob(f"{PREFIX}[0-9]*") if (m := _NAME.match(p.name))]
    return [p for m, p in sorted(done, key=lambda mp: (int(mp[0].group(1)), int(mp[0].group(2) or 0)))]


def latest(root: str | Path) -> Path | None:
    done = _complete(root)
    return done[-1] if done else None


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; returns the saved state (version, consumed...)."""
    from shared.weights import load_version

    load_version(model, path)
    optimizer_state, state = read(path)
    optimizer.load_state_dict(optimizer_state)
    return state


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the optimizer's state_dict, the saved state) of a checkpoint; the weights are a
    published version's files (shared/weights.py load_version)."""
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    return _unflatten(tensors, state.pop("optimizer")), state


def _flatten(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "other": other}


def _unflatten(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in scalars["other"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": scalars["param_groups"]}
