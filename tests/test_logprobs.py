"""Chunked log-prob kernels and micro-batched training against the dense path, in float64.

The dense path (chunk_tokens = 0, one batch) is the learner's previous implementation:
full logits, log_softmax over [B, T, V], gathers. Every estimator's loss and gradient
and a whole Trainer step must match it to 1e-9 for chunk sizes that do not divide T.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from services.learner.losses import ESTIMATORS, ObjectiveConfig, objective
from services.learner.drift import DriftConfig
from services.learner.stabilisers import StabiliserConfig
from services.learner.trainer import Trainer
from services.teacher.scorer import score
from shared.logprobs import OutputHead, gather_logprobs
from shared.microbatch import microbatches, padded_tokens
from shared.models import enable_activation_checkpointing
from shared.sequences import completion_logits, pack
from shared.wire import Prompt, ScoredTrajectory, Trajectory

V, PAD, EOS = 37, 0, 2
CHUNKS = [1, 3, 7, 1000]  # 3 and 7 divide neither N nor T; 1000 > N: one chunk
TIGHT = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("bias", [False, True])
def test_gather_kernel_values_and_gradients_equal_dense(chunk, bias):
    g = torch.Generator().manual_seed(chunk)
    n, d, m = 11, 6, 5
    h = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    ids = torch.randint(0, V, (n, m), generator=g)
    ids[:, 1] = ids[:, 0]  # repeated ids must accumulate their gradients
    upstream = torch.randn(n, m, dtype=torch.float64, generator=g)

    logp, lse, top = gather_logprobs(h, OutputHead(w, b), ids, chunk_tokens=chunk, top_k=4)
    grads = torch.autograd.grad((logp * upstream).sum(), [h, w] + ([b] if bias else []))
    logits = h @ w.t() + (b if bias else 0)
    dense = torch.log_softmax(logits, -1)
    want = torch.autograd.grad((dense.gather(-1, ids) * upstream).sum(), [h, w] + ([b] if bias else []))
    torch.testing.assert_close(logp, dense.gather(-1, ids).detach(), **TIGHT)
    torch.testing.assert_close(lse, logits.logsumexp(-1).detach(), **TIGHT)
    assert torch.equal(top, dense.topk(4, -1).indices)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, **TIGHT)


def test_gather_kernel_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 9, (5, 2), generator=g)
    fn = lambda h, w: gather_logprobs(h, OutputHead(w), ids, chunk_tokens=2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w))


def test_kernel_refuses_transformed_heads_and_bad_chunks():
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        OutputHead.of(model)
    with pytest.raises(ValueError, match="chunk_tokens"):
        gather_logprobs(torch.zeros(1, 2), OutputHead(torch.zeros(3, 2)), torch.zeros(1, 1), chunk_tokens=0)


def test_microbatches_respect_the_budget_and_never_drop():
    lengths = [5, 30, 3, 9, 2, 12, 12, 40]
    groups = microbatches(lengths, max_tokens=24)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) * longest <= 24 or len(g) == 1  # over-budget sequences train alone
    assert [7] in groups and [1] in groups
    assert padded_tokens(lengths, groups) < len(lengths) * max(lengths)  # binning beats one batch
    assert microbatches(lengths, 0) == [list(range(len(lengths)))]
    assert microbatches([], 10) == []


def tiny_model(dtype=torch.float64, tie=True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def scored_batch(n: int = 7, mc: int = 3, draws: int = 2, top_k: int = 6, seed: int = 0) -> list[ScoredTrajectory]:
    """Trajectories of varied lengths scored by a (different) teacher, with MC samples and draws."""
    rng = np.random.default_rng(seed)
    teacher = tiny_model(torch.float32, tie=False)
    trajs = []
    for i in range(n):
        p_len, t_len = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        comp = rng.integers(3, V, t_len).astype(np.int32)
        mc_ids = np.concatenate([comp[:, None], rng.integers(0, V, (t_len, mc - 1))], 1).astype(np.int32)
        trajs.append(Trajectory(
            f"t{i}", Prompt(f"p{i}", rng.integers(3, V, p_len).astype(np.int32), "", 0), comp,
            (-rng.random(t_len) * 3).astype(np.float32), np.zeros(t_len, np.int32),
            mc_ids, (-rng.random((t_len, mc)) * 3).astype(np.float32)))
    scores = score(teacher, trajs, top_k=top_k, pad_id=PAD, draws=draws,
                   generator=torch.Generator().manual_seed(seed), chunk_tokens=0)
    return [ScoredTrajectory(t, s) for t, s in zip(trajs, scores)]


OBJECTIVES = {
    "fkl": ObjectiveConfig(),
    "m2po": ObjectiveConfig({"rkl_recompute": 1.0, "fkl_topk_tail": 0.5}, StabiliserConfig("m2po", m2po_tau=0.3)),
    "vcpo+drift": ObjectiveConfig({"rkl_stale": 1.0, "jsd": 1.0}, StabiliserConfig("minpro"), vcpo=True,
                                  drift=DriftConfig(True, k=3, low=0.0, high=0.7)),
    "mc+draws": ObjectiveConfig({"rkl_mc": 1.0, "fkl_teacher_sampled": 1.0, "skew_rkl": 0.3}),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("chunk", [3, 7])
def test_every_estimator_loss_and_gradient_equal_dense(name, chunk):
    batch = scored_batch()
    losses = {}
    for path in (0, chunk):
        model = tiny_model()
        trainer = Trainer(model, lr=1e-3, weight_decay=0.0, grad_clip=0.0, pad_id=PAD, chunk_tokens=path,
                          objective=ObjectiveConfig({name: 1.0}, drift=DriftConfig(True, k=4, low=0.0)))
        out = objective(trainer.inputs(batch), trainer.objective)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        losses[path] = (out.loss.detach(), grads, out.metrics)
    (loss_d, grads_d, metrics_d), (loss_c, grads_c, metrics_c) = losses[0], losses[chunk]
    torch.testing.assert_close(loss_c, loss_d, **TIGHT)
    assert loss_d.abs() > 0
    for a, b in zip(grads_c, grads_d):
        torch.testing.assert_close(a, b, **TIGHT)
    assert metrics_c == pytest.approx(metrics_d, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("objective_name", sorted(OBJECTIVES))
def test_microbatched_chunked_step_equals_one_dense_batch(objective_name):
    batch = scored_batch(n=9)
    cfg = OBJECTIVES[objective_name]
    dense_model, chunked_model = tiny_model(), tiny_model()
    dense = Trainer(dense_model, lr=1e-2, weight_decay=0.01, grad_clip=1.0, objective=cfg, pad_id=PAD,
                    chunk_tokens=0, max_tokens_per_microbatch=0)
    chunked = Trainer(chunked_model, lr=1e-2, weight_decay=0.01, grad_clip=1.0, objective=cfg, pad_id=PAD,
                      chunk_tokens=5, max_tokens_per_microbatch=24)
    assert len(chunked.plan(batch)) >= 3  # several micro-batches, one trajectory over budget
    before = copy.deepcopy(dense_model.state_dict())
    m_dense, m_chunked = dense.step(batch), chunked.step(batch)
    for (name, a), b in zip(dense_model.state_dict().items(), chunked_model.state_dict().values()):
        torch.testing.assert_close(b, a, **TIGHT, msg=name)
    assert any(not torch.equal(before[k], v) for k, v in dense_model.state_dict().items())
    m_chunked.pop("microbatches"), m_dense.pop("microbatches")
    assert m_chunked == pytest.approx(m_dense, rel=1e-9, abs=1e-12)


def test_bfloat16_learner_keeps_float32_master_weights():
    batch = scored_batch()
    ref, bf = tiny_model(torch.float32), tiny_model(torch.float32)
    m_ref = Trainer(ref, lr=1e-3, weight_decay=0.0, grad_clip=1.0, objective=ObjectiveConfig(),
                    pad_id=PAD).step(batch)
    m_bf = Trainer(bf, lr=1e-3, weight_decay=0.0, grad_clip=1.0, objective=ObjectiveConfig(),
                   pad_id=PAD, dtype="bfloat16").step(batch)
    assert all(p.dtype == torch.float32 for p in bf.parameters())
    assert m_bf["loss/total"] == pytest.approx(m_ref["loss/total"], rel=2e-2)
    with pytest.raises(ValueError, match="dtype"):
        Trainer(bf, lr=1e-3, weight_decay=0.0, grad_clip=1.0, objective=ObjectiveConfig(), pad_id=PAD,
                dtype="float16")


@pytest.mark.parametrize("chunk,budget", [(3, 0), (7, 20), (1000, 1)])
def test_teacher_scores_equal_dense_for_chunks_and_microbatches(chunk, budget):
    batch = scored_batch()
    trajs = [b.trajectory for b in batch]
    teacher = tiny_model(torch.float64, tie=False)
    dense = score(teacher, trajs, top_k=6, pad_id=PAD, chunk_tokens=0)
    got = score(teacher, trajs, top_k=6, pad_id=PAD, chunk_tokens=chunk, max_tokens_per_microbatch=budget)
    for d, c in zip(dense, got):
        np.testing.assert_array_equal(c.topk_ids_TK, d.topk_ids_TK)
        for field in ("topk_logprobs_TK", "tail_mass_T", "sampled_logprobs_T", "mc_logprobs_TN"):
            np.testing.assert_allclose(getattr(c, field), getattr(d, field), rtol=1e-6, atol=1e-7)
    drawn = score(teacher, trajs, top_k=6, pad_id=PAD, draws=4, generator=torch.Generator().manual_seed(1),
                  chunk_tokens=chunk, max_tokens_per_microbatch=budget)
    full = torch.log_softmax(completion_logits(teacher, pack([t.prompt.prompt_ids_P for t in trajs],
                                                             [t.completion_ids_T for t in trajs], PAD)), -1)
    for i, (t, s) in enumerate(zip(trajs, drawn)):
        want = full[i, :t.num_tokens].gather(-1, torch.from_numpy(s.draw_ids_TN).long())
        np.testing.assert_allclose(s.draw_logprobs_TN, want.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_bfloat16_teacher_scores_close_to_float32():
    trajs = [b.trajectory for b in scored_batch()]
    ref = score(tiny_model(torch.float32, tie=False), trajs, top_k=6, pad_id=PAD)
    bf = score(tiny_model(torch.bfloat16, tie=False), trajs, top_k=6, pad_id=PAD)
    for r, b in zip(ref, bf):
        assert b.topk_logprobs_TK.dtype == np.float32
        np.testing.assert_allclose(b.sampled_logprobs_T, r.sampled_logprobs_T, atol=0.05)


def test_gradient_checkpointing_gives_the_same_step():
    batch = scored_batch()
    plain, ckpt = tiny_model(), tiny_model()
    enable_activation_checkpointing(ckpt)
    calls = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        calls[name] = 0
        model.model.layers[0].self_attn.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
        trainer = Trainer(model, lr=1e-2, weight_decay=0.0, grad_clip=1.0, objective=ObjectiveConfig(), pad_id=PAD,
                          chunk_tokens=4, max_tokens_per_microbatch=30)
        microbatches = trainer.step(batch)["microbatches"]
    assert calls == {"plain": microbatches, "ckpt": 2 * microbatches}  # recomputed in the backward
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, **TIGHT, msg=name)
