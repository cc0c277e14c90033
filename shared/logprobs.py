"""Chunked log-prob kernels: what the estimators need from a causal LM's output head, never [N, V].

Teacher and learner both need, per completion position, the log-probabilities of a few
ids (the sampled token, the teacher's top-k, MC samples, teacher draws), sometimes the
model's own top-k ids, and the logsumexp over the vocabulary. A dense `log_softmax` over
[B, T, V] costs 4 bytes x V per token (600 KB at Qwen's 151,936) several times over in
the forward and the backward. Here the output projection is applied to the final hidden
states `chunk` positions at a time:

- forward: per chunk, logits [chunk, V] in float32 (float64 for float64 models), the
  gathers and the top-k, then the logsumexp computed in the same buffer (in place); only
  the [N, M] outputs and the logsumexp [N] are kept;
- backward (`gather_logprobs` only): per chunk, the logits are recomputed, turned into
  the softmax in place and into d loss / d logits = onehot-scatter(g) - softmax * sum(g),
  then multiplied into the hidden-state and projection-weight gradients.

So memory holds one [chunk, V] block at a time in both directions. `chunk_tokens = 0`
selects the dense path (the model's full logits, then `log_softmax`): the reference the
tests compare against and the old memory profile the memory bench measures.

No estimator needs a full-vocabulary quantity beyond what this computes (the logsumexp
and the student's own top-k for drift control); one that does belongs here, chunked.

    from shared.logprobs import completion_logprobs
    logp_BTM, lse_BT, top_ids_BTk = completion_logprobs(model, packed, ids_BTM, chunk_tokens=512)
    CompletionLogprobs(model)(packed, ids_BTM, 512)   # the same, as a module (the learner's forward)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shared.sequences import PackedBatch


@dataclass(frozen=True)
class OutputHead:
    """The output projection logits = hidden @ weight.T (+ bias) of a causal LM."""

    weight_VD: torch.Tensor
    bias_V: torch.Tensor | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> OutputHead:
        """The model's LM head; models that transform logits further are refused, not mis-scored."""
        config = getattr(model, "config", None)
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise NotImplementedError(
                    f"{type(model).__name__} sets {attr}: the chunked log-prob kernel supports plain "
                    "linear LM heads only; use chunk_tokens=0 (dense) for this model")
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise NotImplementedError(f"LM head of type {type(head).__name__} is not a plain Linear")
        return cls(head.weight, head.bias)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-prob maths run in float32, or float64 for float64 models (the reference tests)."""
    return torch.promote_types(dtype, torch.float32)


def _logits(h_cD: torch.Tensor, w_VD: torch.Tensor, bias_V: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits in the loss dtype; the matmul runs in the hidden states' dtype."""
    z = (h_cD @ w_VD.t()).to(loss_dtype(h_cD.dtype))
    return z if bias_V is None else z.add_(bias_V)


def _exp_shifted_(z_cV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place z <- exp(z - max z), the unnormalised probabilities, so a chunk needs one
    [chunk, V] buffer; returns (logsumexp of the original z, its row max), both [chunk]."""
    m = z_cV.amax(-1, keepdim=True)
    total = z_cV.sub_(m).exp_().sum(-1)
    m = m.squeeze(-1)
    return m + total.log(), m


def _chunks(n: int, chunk: int) -> range:
    """Chunk starts; one (empty) chunk when there are no positions, so outputs keep their shapes."""
    return range(0, max(n, 1), chunk if chunk > 0 else max(n, 1))


class _GatherLogProbs(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], bias [V] | None, ids [N, M]) -> log p at ids [N, M],
    logsumexp [N] and the top `top_k` ids [N, top_k] (the last two without gradients)."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, ids_NM, chunk: int, top_k: int):  # type: ignore[override]
        n, dtype = hidden_ND.shape[0], loss_dtype(hidden_ND.dtype)
        out_NM = hidden_ND.new_empty(ids_NM.shape, dtype=dtype)
        lse_N = hidden_ND.new_empty((n,), dtype=dtype)
        top_Nk = ids_NM.new_empty((n, top_k))
        with torch.autocast(hidden_ND.device.type, enabled=False):
            w = weight_VD.to(hidden_ND.dtype)
            for s in _chunks(n, chunk):
                z = _logits(hidden_ND[s:s + chunk], w, bias_V)
                picked = z.gather(-1, ids_NM[s:s + chunk])
                if top_k:
                    top_Nk[s:s + chunk] = z.topk(top_k, -1, sorted=True).indices
                lse_N[s:s + chunk] = _exp_shifted_(z)[0]
                out_NM[s:s + chunk] = picked - lse_N[s:s + chunk, None]
                del z  # before the next chunk's logits exist: one [chunk, V] buffer at a time
        ctx.save_for_backward(hidden_ND, weight_VD, bias_V, ids_NM, lse_N)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(lse_N, top_Nk)
        return out_NM, lse_N, top_Nk

    @staticmethod
    def backward(ctx, g_NM, _g_lse, _g_top):  # type: ignore[override]
        hidden_ND, weight_VD, bias_V, ids_NM, lse_N = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk, n = ctx.chunk, hidden_ND.shape[0]
        acc = loss_dtype(weight_VD.dtype)
        grad_h = torch.zeros_like(hidden_ND) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device) if need_w else None
        grad_b = torch.zeros(weight_VD.shape[0], dtype=acc, device=weight_VD.device) if need_b else None
        with torch.autocast(hidden_ND.device.type, enabled=False):
            w = weight_VD.to(hidden_ND.dtype)
            for s in _chunks(n, chunk):
                h, g = hidden_ND[s:s + chunk], g_NM[s:s + chunk].to(lse_N.dtype)
                # d/dz of sum_m g_m (z[id_m] - lse(z)) = scatter(g) - softmax(z) * sum_m g_m
                gz = _logits(h, w, bias_V).sub_(lse_N[s:s + chunk, None]).exp_()
                gz.mul_(-g.sum(-1, keepdim=True)).scatter_add_(1, ids_NM[s:s + chunk], g)
                gz_c = gz.to(h.dtype)
                if grad_h is not None:
                    grad_h[s:s + chunk] = gz_c @ w
                if grad_w is not None:
                    grad_w.add_(gz_c.t() @ h)
                if grad_b is not None:
                    grad_b.add_(gz.sum(0))
                del gz, gz_c
        as_w = (lambda t: None if t is None else t.to(weight_VD.dtype))
        return grad_h, as_w(grad_w), as_w(grad_b), None, None, None


def gather_logprobs(hidden_ND: torch.Tensor, head: OutputHead, ids_NM: torch.Tensor, *,
                    chunk_tokens: int, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ W.T) at ids [N, M] (differentiable in hidden and W), the logsumexp
    [N] and the top_k ids [N, top_k]; chunk_tokens positions per [chunk, V] block."""
    if chunk_tokens <= 0:
        raise ValueError("gather_logprobs is the chunked kernel: chunk_tokens must be >= 1")
    return _GatherLogProbs.apply(hidden_ND, head.weight_VD, head.bias_V, ids_NM.long(),
                                 chunk_tokens, top_k)


def completion_logprobs(model: torch.nn.Module, batch: PackedBatch, ids_BTM: torch.Tensor, *,
                        chunk_tokens: int, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's log-probs at ids_BTM [B, T, M] for every completion position, the
    logsumexp [B, T] and its top_k ids [B, T, top_k]; padded positions hold 0.
    chunk_tokens = 0: the dense path (full logits, log_softmax over [B, T, V])."""
    from shared.sequences import completion_hidden, completion_logits

    mask = batch.mask_BT
    if chunk_tokens <= 0:
        logits_BTV = completion_logits(model, batch)
        lse_BT = logits_BTV.detach().logsumexp(-1)
        logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
        top = logp_BTV.detach().topk(top_k, -1).indices if top_k else ids_BTM.new_empty((*mask.shape, 0))
        out = torch.gather(logp_BTV, -1, ids_BTM.long())
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        return torch.where(mask[..., None], out, zero), lse_BT * mask, top * mask[..., None]
    hidden_ND = completion_hidden(model, batch)
    logp_NM, lse_N, top_Nk = gather_logprobs(hidden_ND, OutputHead.of(model), ids_BTM[mask],
                                             chunk_tokens=chunk_tokens, top_k=top_k)
    return scatter_positions(logp_NM, mask), scatter_positions(lse_N, mask), scatter_positions(top_Nk, mask)


class CompletionLogprobs(torch.nn.Module):
    """`completion_logprobs` of `student` as one module: a multi-rank learner hands this to
    FSDP2 or DDP (services/learner/sharding.py), whose hooks run around its forward, the
    student's layers and its output head together."""

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, batch: PackedBatch, ids_BTM: torch.Tensor, chunk_tokens: int,
                top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return completion_logprobs(self.student, batch, ids_BTM, chunk_tokens=chunk_tokens, top_k=top_k)


def scatter_positions(x_N: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """[N, ...] values of the real positions -> [B, T, ...] with zeros on padding (differentiable)."""
    out = x_N.new_zeros((*mask_BT.shape, *x_N.shape[1:]))
    return out.index_put((mask_BT,), x_N)


@dataclass
class PositionScores:
    """What the teacher keeps per position: top-k (descending), log p at given ids, draws."""

    topk_logprobs_NK: torch.Tensor
    topk_ids_NK: torch.Tensor
    ids_logprobs_NM: torch.Tensor
    draw_ids_Nd: torch.Tensor | None = None
    draw_logprobs_Nd: torch.Tensor | None = None


def _select(logp_cV: torch.Tensor, ids_cM: torch.Tensor, top_k: int, draws: int,
            generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """Teacher selections from normalised log-probs (the dense path)."""
    top_lp, top_ids = logp_cV.topk(top_k, -1, sorted=True)
    parts = [top_lp, top_ids, logp_cV.gather(-1, ids_cM)]
    if draws > 0:  # y_j ~ p per position, for the teacher-sampled forward KL
        d = torch.multinomial(logp_cV.exp(), draws, replacement=True, generator=generator)
        parts += [d, logp_cV.gather(-1, d)]
    return tuple(parts)


def _select_chunk(z_cV: torch.Tensor, ids_cM: torch.Tensor, top_k: int, draws: int,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """The same selections from one chunk's raw logits, in its single buffer (consumed)."""
    top_z, top_ids = z_cV.topk(top_k, -1, sorted=True)
    picked = z_cV.gather(-1, ids_cM)
    lse, m = _exp_shifted_(z_cV)  # z_cV now holds exp(z - m): multinomial takes unnormalised weights
    parts = [top_z - lse[:, None], top_ids, picked - lse[:, None]]
    if draws > 0:
        d = torch.multinomial(z_cV, draws, replacement=True, generator=generator)
        parts += [d, z_cV.gather(-1, d).log() + (m - lse)[:, None]]
    return tuple(parts)


@torch.no_grad()
def score_positions(model: torch.nn.Module, batch: PackedBatch, ids_BTM: torch.Tensor, *, top_k: int,
                    chunk_tokens: int, draws: int = 0, generator: torch.Generator | None = None) -> PositionScores:
    """Teacher scores of every real completion position (row-major over the batch's mask):
    top-k, log p at ids_BTM, and `draws` samples from p; chunked over positions like
    `completion_logprobs` (chunk_tokens = 0: dense)."""
    from shared.sequences import completion_hidden, completion_logits

    mask = batch.mask_BT
    ids_NM = ids_BTM[mask].long()
    if chunk_tokens <= 0:  # the previous teacher: log_softmax over [B, T, V], selections on every row
        logp_BTV = torch.log_softmax(completion_logits(model, batch), dim=-1)
        b, t, v = logp_BTV.shape
        rows = _select(logp_BTV.view(b * t, v), ids_BTM.reshape(b * t, -1).long(), min(top_k, v), draws, generator)
        return PositionScores(*(r[mask.reshape(-1)] for r in rows))
    hidden_ND, head = completion_hidden(model, batch), OutputHead.of(model)
    w, blocks = head.weight_VD.to(hidden_ND.dtype), []
    k = min(top_k, w.shape[0])
    for s in _chunks(hidden_ND.shape[0], chunk_tokens):  # the logits die in _select_chunk
        blocks.append(_select_chunk(_logits(hidden_ND[s:s + chunk_tokens], w, head.bias_V),
                                    ids_NM[s:s + chunk_tokens], k, draws, generator))
    return PositionScores(*(torch.cat(parts) for parts in zip(*blocks)))
