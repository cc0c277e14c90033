"""A step's int and float32 columns packed into one int32 tensor, so one device -> host copy carries all.

The vLLM worker hooks (services/rollout/vllm_backend.py, services/teacher/vllm_backend.py)
compute ids and log-probs on the device on every engine step. Copying each tensor to the
host is one synchronisation per tensor; packing the float32 columns bit for bit (a view
as int32, no rounding) beside the int32 ids makes it a single copy:

    packed = pack([ids], [logprobs])           # torch, on the device: [rows, n_int + n_float]
    ints, floats = unpack(packed.cpu().numpy(), n_int=ids.shape[1])   # numpy, exact

Ids must fit in int32 (vocabulary ids do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def pack(ints: list[torch.Tensor], floats: list[torch.Tensor]) -> torch.Tensor:
    """[rows, sum of int columns + sum of float columns] int32: the int tensors (cast to
    int32), then the float32 tensors' bits. All 2-D with the same number of rows."""
    import torch

    rows = (ints or floats)[0].shape[0]
    device = (ints or floats)[0].device
    parts = [t.to(torch.int32) for t in ints]
    if floats:
        parts.append(torch.cat([t.to(torch.float32) for t in floats], 1).contiguous().view(torch.int32))
    return torch.cat(parts, 1) if parts else torch.zeros((rows, 0), dtype=torch.int32, device=device)


def unpack(packed: np.ndarray, n_int: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [rows, n_int] (a view), float32 [rows, rest] (the same bits)) from a packed host array."""
    if packed.dtype != np.int32 or packed.ndim != 2:
        raise ValueError(f"packed columns are 2-D int32, got {packed.dtype} {packed.shape}")
    return packed[:, :n_int], np.ascontiguousarray(packed[:, n_int:]).view(np.float32)
