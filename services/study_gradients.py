"""Bias and variance of each estimator's gradient against the exact reverse-KL gradient.

The paper's analysis of finite teacher-score caches, on the built-in task: a fixed set of
prefixes is sampled once from the behaviour student mu (the student after
`grad_start_step` steps of fkl_topk training); the current student pi is the same run's
snapshot s optimizer steps later (training snapshots, not perturbations), so at staleness s
the prefixes are exactly s steps old. On every minibatch of prefixes the exact gradient of
the per-position reverse KL sum_v pi(v|h_t) [log pi(v|h_t) - log p(v|h_t)] (full vocabulary,
teacher's full log-probs) is compared with each estimator's gradient through the learner's
own code path (Trainer.inputs + objective): cosine mean and std over minibatches, the
relative variance E||e - E e||^2 / E||g*||^2 and squared bias ||E e||^2 / E||g*||^2 of the
error e = g - g*, and the cosine of the minibatch-averaged gradients. The top-k cache size k
(fkl_topk@k, rkl_support@k) and the MC sample count N (rkl_mc@N) are varied.

    opd study staleness --gradients --seeds 0 --out reports/staleness   # analysis only
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

if TYPE_CHECKING:
    from services.study import Models, StudySettings


class GradientSettings(BaseModel):
    gradients: bool = False
    """Also run the gradient bias-variance analysis (gradients.json, table.md)."""
    grad_prefixes: int = 256
    """Fixed prefixes (sampled once from the behaviour student)."""
    grad_minibatch: int = 32
    """Prefixes per minibatch: statistics are over grad_prefixes / grad_minibatch minibatches."""
    grad_topk: list[int] = [1, 2, 4, 8, 15]
    """Cache sizes k for fkl_topk@k and rkl_support@k (15 = the built-in vocabulary)."""
    grad_mc: list[int] = [1, 4, 16]
    """MC sample counts N for rkl_mc@N (N = 1 is rkl_recompute)."""
    grad_start_step: int = 50
    """fkl_topk steps before the behaviour snapshot (staleness s: pi is s steps later)."""


def exact_reverse_kl_loss(model: torch.nn.Module, packed, teacher_BTV: torch.Tensor) -> torch.Tensor:
    """sum over response positions of KL(pi(.|h_t) || p(.|h_t)) / response tokens, full vocabulary."""
    from shared.sequences import completion_logits

    student_BTV = torch.log_softmax(completion_logits(model, packed).to(teacher_BTV.dtype), -1)
    kl_BT = (student_BTV.exp() * (student_BTV - teacher_BTV)).sum(-1)
    mask = packed.mask_BT.to(kl_BT.dtype)
    return (kl_BT * mask).sum() / mask.sum().clamp(min=1.0)


def teacher_full(batch, vocab: int, t_max: int) -> torch.Tensor:
    """The teacher's full log-probs [B, T, V] from scores cached with top_k = vocab."""
    from shared.sequences import pad_rows

    ids = torch.from_numpy(pad_rows([b.scores.topk_ids_TK for b in batch], t_max, 0)).long()
    lps = torch.from_numpy(pad_rows([b.scores.topk_logprobs_TK for b in batch], t_max, 0.0)).double()
    if ids.shape[-1] != vocab:
        raise ValueError(f"exact gradients need the teacher's full distribution (top_k = {vocab})")
    return torch.zeros(*ids.shape[:2], vocab, dtype=torch.float64).scatter(-1, ids, lps)


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]).double()


def exact_gradient(model: torch.nn.Module, batch, pad_id: int) -> torch.Tensor:
    """Flattened gradient of exact_reverse_kl_loss on one minibatch of scored trajectories."""
    from shared.sequences import pack

    packed = pack([b.trajectory.prompt.prompt_ids_P for b in batch],
                  [b.trajectory.completion_ids_T for b in batch], pad_id)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    teacher = teacher_full(batch, vocab, packed.mask_BT.shape[1])
    params = [p for p in model.parameters() if p.requires_grad]
    return flat_grad(exact_reverse_kl_loss(model, packed, teacher), params)


def truncate(batch, k: int | None = None, n: int | None = None):
    """The batch with the teacher cache cut to its top k ids and / or the MC samples to N."""
    out = []
    for b in batch:
        t, sc = b.trajectory, b.scores
        if k is not None:
            sc = dataclasses.replace(sc, topk_ids_TK=sc.topk_ids_TK[:, :k], topk_logprobs_TK=sc.topk_logprobs_TK[:, :k])
        if n is not None and t.mc_ids_TN is not None:
            t = dataclasses.replace(t, mc_ids_TN=t.mc_ids_TN[:, :n], mc_logprobs_TN=t.mc_logprobs_TN[:, :n])
            sc = dataclasses.replace(sc, mc_logprobs_TN=sc.mc_logprobs_TN[:, :n])
        out.append(dataclasses.replace(b, trajectory=t, scores=sc))
    return out


def estimator_gradient(model: torch.nn.Module, batch, objective_cfg, pad_id: int) -> torch.Tensor:
    """Flattened gradient of the learner's objective for one estimator config on one minibatch."""
    from services.learner.losses import objective
    from services.learner.trainer import Trainer

    trainer = Trainer(model, lr=0.0, weight_decay=0.0, grad_clip=0.0, objective=objective_cfg,
                      pad_id=pad_id, chunk_tokens=0)
    x = trainer.inputs(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return flat_grad(objective(x, objective_cfg).loss, params)


def rows(estimators: list[str], top_ks: list[int], mcs: list[int],
         mc_samples: int = 4) -> dict[str, tuple[str, int | None, int]]:
    """Row name -> (variant, k, N): the study's variants as trained (VCPO only rescales the
    rate: left out; rkl_mc with the study's mc_samples, the others on the sampled token),
    then the top-k and MC-count sweeps."""
    out = {e: (e, None, mc_samples if e == "rkl_mc" else 1) for e in estimators if not e.endswith("+vcpo")}
    out.update({f"fkl_topk@{k}": ("fkl_topk", k, 1) for k in top_ks})
    out.update({f"rkl_support@{k}": ("rkl_support", k, 1) for k in top_ks})
    out.update({f"rkl_mc@{n}": ("rkl_mc", None, n) for n in mcs})
    return out


def statistics(est: list[torch.Tensor], exact: list[torch.Tensor]) -> dict[str, float]:
    """Cosine mean / std over minibatches, relative variance and squared bias (unbiased:
    ||mean e||^2 minus the variance of the mean) of e = g - g*, cosine of the means."""
    g, gs = torch.stack(est), torch.stack(exact)
    cos = torch.nn.functional.cosine_similarity(g, gs, dim=1)
    err = g - gs
    scale = (gs ** 2).sum(1).mean()
    m = len(est)
    # ||mean e||^2 overstates the squared bias by the variance of the mean; subtract its unbiased estimate
    var_of_mean = ((err - err.mean(0)) ** 2).sum() / (m * (m - 1)) if m > 1 else 0.0
    return {"cos_mean": float(cos.mean()), "cos_std": float(cos.std(unbiased=False)),
            "rel_var": float(((err - err.mean(0)) ** 2).sum(1).mean() / scale),
            "rel_bias2": float(((err.mean(0) ** 2).sum() - var_of_mean) / scale),
            "cos_of_mean": float(torch.nn.functional.cosine_similarity(g.mean(0), gs.mean(0), dim=0))}


def snapshots(s: StudySettings, models: Models, lr: float) -> dict[int, dict[str, torch.Tensor]]:
    """fkl_topk training from the initial student: weights at grad_start_step + k, k in {0, staleness}."""
    from services.learner.losses import ObjectiveConfig
    from services.learner.trainer import Trainer
    from services.study import scored_batch
    from shared.models import load_model
    from shared.task import make_problems

    torch.manual_seed(0)
    student = load_model(models.student_path)
    trainer = Trainer(student, lr=lr, weight_decay=0.0, grad_clip=1.0, objective=ObjectiveConfig(),
                      pad_id=models.tokenizer.pad_token_id, warmup_steps=s.warmup_steps)
    last = s.grad_start_step + max(s.staleness)
    train = make_problems(last * s.batch_size, seed=999, split="train")
    keep = {s.grad_start_step + k: k for k in {0, *s.staleness}}
    out = {0: copy.deepcopy(student.state_dict())} if s.grad_start_step == 0 else {}
    for step in range(last):
        batch, _, _ = scored_batch(models, student, train[step * s.batch_size:(step + 1) * s.batch_size],
                                   step, 1, s.top_k)
        trainer.step(batch)
        if step + 1 in keep:
            out[keep[step + 1]] = copy.deepcopy(student.state_dict())
    return out


def run_gradients(s: StudySettings, models: Models, lrs: dict[str, float]) -> dict[str, Any]:
    """The analysis for every staleness in s.staleness; JSON-ready results."""
    from services.study import parse_variant, scored_batch
    from shared.models import load_model
    from shared.task import make_problems

    weights = snapshots(s, models, lrs.get("fkl_topk", 3e-3))
    model = load_model(models.student_path)
    model.load_state_dict(weights[0])  # the behaviour mu that samples the fixed prefixes
    vocab = int(model.get_output_embeddings().weight.shape[0])
    problems = make_problems(s.grad_prefixes, seed=777, split="train")
    torch.manual_seed(1)
    prefixes, _, _ = scored_batch(models, model, problems, 0, max(*s.grad_mc, s.mc_samples), vocab)
    mbs = [prefixes[i:i + s.grad_minibatch] for i in range(0, len(prefixes), s.grad_minibatch)]
    table = rows(s.estimators, [k for k in s.grad_topk if k <= vocab], s.grad_mc, s.mc_samples)
    pad = models.tokenizer.pad_token_id
    result: dict[str, Any] = {"staleness": s.staleness, "minibatches": len(mbs), "rows": {n: {} for n in table}}
    for k in s.staleness:
        model.load_state_dict(weights[k])
        exact = [exact_gradient(model, mb, pad) for mb in mbs]
        for name, (spec, top, n) in table.items():
            cfg = parse_variant(spec)[1]
            est = [estimator_gradient(model, truncate(mb, top, n), cfg, pad) for mb in mbs]
            result["rows"][name][str(k)] = statistics(est, exact)
        print(f"gradients: staleness {k} done ({len(table)} rows x {len(mbs)} minibatches)", flush=True)
    return result
