"""Transformers sampling backend for the rollout service (the embedded CPU default; CUDA too).

Batched autoregressive sampling with a KV cache over left-padded prompts. At every step it
records, per sequence, the sampled token y_t, its behaviour log-prob log mu(y_t | h_t) under
the distribution actually sampled from (temperature / top-p applied; at the default
temperature 1, top-p 1 these are the model's raw log-probs), and optionally N-1 extra ids
drawn with replacement from the same distribution with their log mu (multi-sample MC;
column 0 is y_t). Sequences stop at EOS (kept) or after max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Sample:
    completion_ids_T: np.ndarray
    behaviour_logprobs_T: np.ndarray
    mc_ids_TN: np.ndarray | None
    mc_logprobs_TN: np.ndarray | None
    finish_reason: str
    token_versions_T: np.ndarray | None = None  # set by backends that swap weights mid-sequence


def sampling_logprobs(logits_BV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution sampled from (temperature, then nucleus top-p)."""
    logprobs = torch.log_softmax(logits_BV.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    drop = sorted_lp.exp().cumsum(-1) - sorted_lp.exp() >= top_p
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    kept = torch.full_like(logprobs, float("-inf")).scatter(-1, order, sorted_lp)
    return torch.log_softmax(kept, dim=-1)


def _left_pad(prompts: Sequence[np.ndarray], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.from_numpy(p.astype(np.int64))
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: Sequence[np.ndarray],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    mc_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[Sample]:
    """Sample one completion per prompt; see the module docstring for what is recorded."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id, str(device))
    b = ids.shape[0]
    tokens, lps, mc_ids, mc_lps = [], [], [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    past, step_ids = None, ids
    cache_arg = cache_argument(model)
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{cache_arg: past})
        past = getattr(out, cache_arg)
        logprobs_BV = sampling_logprobs(out.logits[:, -1], temperature, top_p)
        draws = torch.multinomial(logprobs_BV.exp(), mc_samples, replacement=True,
                                  generator=generator)  # column 0 is the sampled token
        y = torch.where(done, torch.full_like(draws[:, 0], pad_id), draws[:, 0])
        tokens.append(y)
        lps.append(logprobs_BV.gather(-1, draws[:, :1])[:, 0])
        mc_ids.append(draws)
        mc_lps.append(logprobs_BV.gather(-1, draws))
        done = done | (y == eos_id)
        mask = torch.cat([mask, (~done | (y == eos_id)).long().unsqueeze(-1)], dim=-1)
        step_ids = y.unsqueeze(-1)
        if bool(done.all()):
            break
    return _collect(tokens, lps, mc_ids, mc_lps, eos_id, mc_samples)


def cache_argument(model: torch.nn.Module) -> str:
    """The KV-cache keyword of the model's forward and field of its output: `cache` in the
    transformers releases that deprecate `past_key_values` (removed in 5.40), else
    `past_key_values`; so no deprecated call is made in any supported release."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _collect(tokens: list, lps: list, mc_ids: list, mc_lps: list, eos_id: int, n: int) -> list[Sample]:
    tok_BT = torch.stack(tokens, 1).cpu().numpy().astype(np.int32)
    lp_BT = torch.stack(lps, 1).cpu().numpy().astype(np.float32)
    mc_BTN = torch.stack(mc_ids, 1).cpu().numpy().astype(np.int32)
    mclp_BTN = torch.stack(mc_lps, 1).cpu().numpy().astype(np.float32)
    samples = []
    for i in range(tok_BT.shape[0]):
        eos = np.flatnonzero(tok_BT[i] == eos_id)
        length = int(eos[0]) + 1 if eos.size else tok_BT.shape[1]
        samples.append(Sample(
            completion_ids_T=tok_BT[i, :length].copy(),
            behaviour_logprobs_T=lp_BT[i, :length].copy(),
            mc_ids_TN=mc_BTN[i, :length].copy() if n > 1 else None,
            mc_logprobs_TN=mclp_BTN[i, :length].copy() if n > 1 else None,
            finish_reason="eos" if eos.size else "length",
        ))
    return samples
