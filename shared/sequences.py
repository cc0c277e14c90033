"""Batching prompt+completion sequences and reading a causal LM's log-probs at completion positions.

Teacher and learner both need, for a batch of (prompt, completion) pairs of different
lengths, the model's next-token distribution at every completion position:
position t of the completion is predicted from the logits at index P + t - 1 of the
concatenated sequence. Sequences are right-padded; positions past a completion's end
are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class PackedBatch:
    input_ids_BL: torch.Tensor  # right-padded prompt+completion
    attention_mask_BL: torch.Tensor
    gather_BT: torch.Tensor  # index into L of the logits predicting completion token t
    completion_ids_BT: torch.Tensor  # padded with 0
    mask_BT: torch.Tensor  # bool, True on real completion positions

    def to(self, device: str) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def pack(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray], pad_id: int) -> PackedBatch:
    """Concatenate and right-pad; build the gather index of completion-predicting logits."""
    import torch

    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    b, seq_len = len(lengths), max(lengths)
    t_max = max(len(c) for c in completions)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    attn = torch.zeros((b, seq_len), dtype=torch.long)
    gather = torch.zeros((b, t_max), dtype=torch.long)
    comp = torch.zeros((b, t_max), dtype=torch.long)
    mask = torch.zeros((b, t_max), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n_c = len(p), len(c)
        input_ids[i, : n_p + n_c] = torch.from_numpy(np.concatenate([p, c]).astype(np.int64))
        attn[i, : n_p + n_c] = 1
        gather[i, :n_c] = torch.arange(n_p - 1, n_p + n_c - 1)
        comp[i, :n_c] = torch.from_numpy(c.astype(np.int64))
        mask[i, :n_c] = True
    return PackedBatch(input_ids, attn, gather, comp, mask)


def completion_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states [N, D] predicting each real completion token, N = mask_BT.sum(),
    row-major over (B, T): what the LM head turns into logits (shared/logprobs.py)."""
    out = model.base_model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL,
                           use_cache=False)
    rows, cols = batch.mask_BT.nonzero(as_tuple=True)
    return out.last_hidden_state[rows, batch.gather_BT[rows, cols]]


def completion_logits(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Logits [B, T, V] predicting each completion token (float32, or float64 for float64
    models; padded positions junk).
    Dense: the full [B, L, V] logits exist; the chunked path is shared/logprobs.py."""
    import torch

    out = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL,
                use_cache=False)
    logits = out.logits
    idx = batch.gather_BT.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx).to(torch.promote_types(logits.dtype, torch.float32))


def pad_rows(rows: Sequence[np.ndarray], t_max: int, fill: float | int = 0) -> np.ndarray:
    """Stack per-trajectory arrays [T_i, ...] into [B, t_max, ...], padding with `fill`."""
    first = rows[0]
    out = np.full((len(rows), t_max, *first.shape[1:]), fill, dtype=first.dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
