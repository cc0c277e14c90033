"""Pure torch: one engine step's MC draws from the behaviour distribution mu, for the whole batch.

mu, per row, is the distribution vLLM's sampler draws that row's token from: the logits
divided by the row's temperature, then top-k / top-p (`nucleus`), then softmax. One step:

    ids, lps = mc_step(logits, sampled, draws=N - 1, generator=g, temperature=t, top_p=p)

Column 0 of `ids` is the engine's sampled token, columns 1..N-1 are drawn WITH replacement
from mu for every row in one `torch.multinomial` (seeded generator: the same steps give the
same draws), and `lps` is log mu of each id, gathered in one op. Per-row temperature and
top-p are [R] tensors applied as batched ops; nothing loops over rows.

`nucleus` implements vLLM 0.32's PyTorch top-k / top-p semantics (what its CPU build runs).
The worker hook (services/rollout/vllm_backend.py) passes vLLM's own `apply_top_k_top_p`
instead, so that on a GPU the draws use the very kernel the engine sampled with. Tests:
tests/test_mc_draws.py (against a dense float64 per-row reference) and tests/test_vllm.py
(`nucleus` against vLLM's function).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Nucleus = Callable[["torch.Tensor", "torch.Tensor | None", "torch.Tensor | None"], "torch.Tensor"]


def nucleus(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Top-k, then top-p, masking with -inf (vLLM 0.32's `apply_top_k_top_p_pytorch`): sort
    each row ascending; top-k keeps the values >= the row's k-th largest; top-p masks the
    sorted entries whose cumulative probability (from the smallest up) is <= 1 - p, always
    keeping the largest. `logits` [R, V] float32 is modified in place and returned."""
    import torch

    if k is None and p is None:
        return logits
    ordered, order = logits.sort(dim=-1, descending=False)
    if k is not None:
        kth = ordered.gather(1, (ordered.size(1) - k.to(torch.long)).unsqueeze(1))
        ordered.masked_fill_(ordered < kth, -float("inf"))
    if p is not None:
        cumulative = torch.cumsum(ordered.softmax(dim=-1), dim=-1)
        outside = cumulative <= 1 - p.unsqueeze(1)
        outside[:, -1] = False
        ordered.masked_fill_(outside, -float("inf"))
    return logits.scatter_(dim=-1, index=order, src=ordered)


def log_mu(logits: torch.Tensor, temperature: torch.Tensor | None = None, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None, mask: Nucleus = nucleus) -> torch.Tensor:
    """log mu [R, V] float32 from float32 logits [R, V] (modified in place): divide each row
    by its temperature (as vLLM does: in place, float32), mask, log-softmax. None: not applied."""
    import torch

    if temperature is not None:
        logits = logits.div_(temperature.to(logits.dtype).unsqueeze(1))
    return torch.log_softmax(mask(logits, top_k, top_p), dim=-1)


def mc_step(logits: torch.Tensor, sampled: torch.Tensor, draws: int, generator: torch.Generator,
            temperature: torch.Tensor | None = None, top_k: torch.Tensor | None = None,
            top_p: torch.Tensor | None = None, mask: Nucleus = nucleus) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [R, 1 + draws] int64, log mu of them [R, 1 + draws] float32), all on the device.

    `logits` [R, V] float32: the sampler's input rows (a copy: modified in place); `sampled`
    [R]: the tokens the engine drew from them; temperature / top_k / top_p: [R] tensors or
    None, exactly as the engine's sampling metadata holds them."""
    import torch

    lp = log_mu(logits, temperature, top_k, top_p, mask)
    ids = sampled.to(torch.long).unsqueeze(1)
    if draws > 0:
        extra = torch.multinomial(lp.exp(), draws, replacement=True, generator=generator)
        ids = torch.cat([ids, extra], dim=1)
    return ids, lp.gather(1, ids)
