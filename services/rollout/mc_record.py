"""The MC draws of one engine's tagged requests, recorded step by step and handed over per batch.

Host-side bookkeeping of the rollout's vLLM worker hook (services/rollout/vllm_backend.py),
kept free of vLLM so it runs (and is tested, and benchmarked) on its own:

    rec = McRecorder(seed)
    slots = rec.slots_of(req_ids, lookup)   # per engine row: its request's slot, -1 if not MC
    rec.step(logits, sampled, slots, positions, temperature=..., top_p=..., mask=...)  # each step
    rec.take(tags)                          # tag -> ([max_tokens, N] ids, log mu); then forgets all

Per step: one `mc_step` over the whole batch (services/rollout/mc_draws.py), one packed
device -> host copy, one list append. Mapping engine rows to requests is one dict lookup per
row, and none while the batch's rows stay the same (the usual decode step). The per-request
[max_tokens, N] buffers are filled at `take`, once per batch, one vectorised write per step:
a position written twice (a discarded chunked-prefill step, a step redone after preemption)
keeps the later write; positions never written hold id -1.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from services.rollout.mc_draws import Nucleus, mc_step, nucleus
from shared.packed_columns import pack, unpack

if TYPE_CHECKING:
    import torch

# lookup(request id) -> (tag, N, max_tokens) of an MC-tagged request, or None
Lookup = Callable[[Hashable], "tuple[str, int, int] | None"]
Step = tuple[np.ndarray, np.ndarray, np.ndarray]  # (slots, positions, packed [rows, 2 W] int32)


def scatter(steps: list[Step], num_slots: int, max_tokens: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """([slots, max_tokens, width] int32 ids (-1: never written), same-shape float32 log mu)
    from the recorded steps, in order (a later step overwrites an earlier one's position)."""
    ids = np.full((num_slots, max_tokens, width), -1, np.int32)
    lps = np.zeros((num_slots, max_tokens, width), np.float32)
    for slots, positions, packed in steps:
        keep = positions < max_tokens
        n = packed.shape[1] // 2  # this step's width (ids then log mu): a wider N may join later
        step_ids, step_lps = unpack(packed[keep], n)
        ids[slots[keep], positions[keep], :n] = step_ids
        lps[slots[keep], positions[keep], :n] = step_lps
    return ids, lps


class McRecorder:
    """See the module docstring. `seed` seeds the draws' generator (once, on first use)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.generator = seed, None
        self.clear()

    def clear(self) -> None:
        self.meta: list[tuple[str, int, int]] = []  # slot -> (tag, N, max_tokens)
        self.slot_by_tag: dict[str, int] = {}
        self.slot_by_request: dict[Hashable, int] = {}
        self.steps: list[Step] = []
        self.width = 0  # the largest N registered: every step draws width - 1 per row
        self._last: tuple[tuple, np.ndarray] | None = None

    def slots_of(self, request_ids: Sequence[Hashable], lookup: Lookup) -> np.ndarray:
        """int64 [rows]: each row's slot, -1 for rows of untagged requests."""
        key = tuple(request_ids)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        known = self.slot_by_request
        slots = np.fromiter((known[r] if r in known else self._register(r, lookup(r)) for r in key),
                            np.int64, len(key))
        self._last = (key, slots)
        return slots

    def _register(self, request: Hashable, mark: tuple[str, int, int] | None) -> int:
        slot = -1
        if mark is not None:
            tag, n, max_tokens = mark
            slot = self.slot_by_tag.setdefault(tag, len(self.meta))
            if slot == len(self.meta):
                self.meta.append((tag, int(n), int(max_tokens)))
                self.width = max(self.width, int(n))
        self.slot_by_request[request] = slot
        return slot

    def step(self, logits: torch.Tensor, sampled: torch.Tensor, slots: np.ndarray, positions: np.ndarray,
             temperature: torch.Tensor | None = None, top_k: torch.Tensor | None = None,
             top_p: torch.Tensor | None = None, mask: Nucleus = nucleus) -> None:
        """Record one step. `logits` [R, V] float32: a copy of the sampler's input (modified
        here); `sampled` [R]: the engine's tokens; `positions` [R]: tokens generated so far;
        temperature / top_k / top_p: the engine's [R] tensors (or None)."""
        import torch

        rows = np.flatnonzero(slots >= 0)
        if rows.size == 0:
            return
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        ids, lps = mc_step(logits, sampled, self.width - 1, self.generator, temperature, top_k, top_p, mask)
        packed = pack([ids], [lps])
        if rows.size < slots.size:
            packed = packed.index_select(0, torch.from_numpy(rows).to(packed.device))
        self.steps.append((slots[rows], np.asarray(positions)[rows].astype(np.int64), packed.cpu().numpy()))

    def take(self, tags: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """tag -> (ids [max_tokens, N] int32, log mu [max_tokens, N] float32) for the tags that
        were recorded; then forgets everything (leftovers of aborted requests too)."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.steps:
            ids, lps = scatter(self.steps, len(self.meta), max(m[2] for m in self.meta), self.width)
            for tag in tags:
                slot = self.slot_by_tag.get(tag)
                if slot is not None:
                    _, n, size = self.meta[slot]
                    out[tag] = (ids[slot, :size, :n], lps[slot, :size, :n])
        self.clear()
        return out
