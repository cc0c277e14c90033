"""Transformers backends: rollout sampler and teacher scorer against a full forward pass;
weight versions written, announced and loaded exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.rollout.sampler import sample, sampling_logprobs
from services.teacher.scorer import score
from shared.sequences import completion_logits, pack
from shared.wire import Prompt, Trajectory

EOS, PAD, V = 2, 0, 23


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [np.array([1, 5, 6, 7, 8], np.int32), np.array([1, 9], np.int32), np.array([1, 3, 4], np.int32)]


def full_logprobs(model, prompts, completions):
    with torch.no_grad():
        return torch.log_softmax(completion_logits(model, pack(prompts, completions, PAD)), -1)


def test_sampler_logprobs_match_a_full_forward(model):
    gen = torch.Generator().manual_seed(0)
    samples = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=12, mc_samples=4,
                     generator=gen)
    ref = full_logprobs(model, PROMPTS, [s.completion_ids_T for s in samples])
    for i, s in enumerate(samples):
        n = len(s.completion_ids_T)
        assert s.mc_ids_TN.shape == (n, 4) and (s.mc_ids_TN[:, 0] == s.completion_ids_T).all()
        want = ref[i, :n].gather(-1, torch.from_numpy(s.mc_ids_TN).long()).numpy()
        np.testing.assert_allclose(s.mc_logprobs_TN, want, atol=1e-5)
        np.testing.assert_allclose(s.behaviour_logprobs_T, want[:, 0], atol=1e-5)
        if s.finish_reason == "eos":
            assert s.completion_ids_T[-1] == EOS and EOS not in s.completion_ids_T[:-1]
        else:
            assert n == 12 and EOS not in s.completion_ids_T


def test_sampler_frequencies_follow_the_recorded_distribution(model):
    gen = torch.Generator().manual_seed(1)
    samples = sample(model, [PROMPTS[1]] * 2000, eos_id=EOS, pad_id=PAD, max_new_tokens=1,
                     generator=gen)
    first = np.array([s.completion_ids_T[0] for s in samples])
    probs = np.exp(samples[0].behaviour_logprobs_T[0])
    token = samples[0].completion_ids_T[0]
    assert abs((first == token).mean() - probs) < 0.05


def test_top_p_keeps_the_nucleus_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    lp = sampling_logprobs(logits, 1.0, top_p=0.75)
    torch.testing.assert_close(lp.exp(), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_teacher_scores_match_dense_log_probs(model):
    completions = [np.array([4, 5, EOS], np.int32), np.array([7], np.int32), np.array([3, 3, 3, 3], np.int32)]
    trajs = []
    for p, c in zip(PROMPTS, completions):
        mc = np.stack([c, (c + 1) % V], 1).astype(np.int32)
        trajs.append(Trajectory("t", Prompt("p", p, "", 0), c, np.zeros(len(c), np.float32),
                                np.zeros(len(c), np.int32), mc, np.zeros(mc.shape, np.float32)))
    out = score(model, trajs, top_k=5, pad_id=PAD)
    ref = full_logprobs(model, PROMPTS, completions)
    for i, (t, s) in enumerate(zip(trajs, out)):
        n = t.num_tokens
        dense = ref[i, :n]
        want_lp, want_ids = dense.topk(5, -1)
        np.testing.assert_array_equal(s.topk_ids_TK, want_ids.numpy())
        np.testing.assert_allclose(s.topk_logprobs_TK, want_lp.numpy(), atol=1e-5)
        np.testing.assert_allclose(s.tail_mass_T, 1 - want_lp.exp().sum(-1).numpy(), atol=1e-5)
        np.testing.assert_allclose(s.sampled_logprobs_T, dense.gather(-1, torch.from_numpy(
            t.completion_ids_T).long()[:, None])[:, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(s.mc_logprobs_TN[:, 1], dense.gather(-1, torch.from_numpy(
            t.mc_ids_TN[:, 1:]).long())[:, 0].numpy(), atol=1e-5)
    assert score(model, trajs, top_k=1000, pad_id=PAD)[0].topk_ids_TK.shape[1] == V  # k capped


@pytest.mark.redis
def test_weight_versions_publish_and_load(model, tmp_path, client, keys):
    from transformers import LlamaForCausalLM

    from shared.weights import announce, latest, load_version, prune_versions, save_version

    assert latest(client, keys) is None
    for v in range(4):
        with torch.no_grad():
            model.model.norm.weight.fill_(float(v))
        announce(client, keys, v, save_version(model, tmp_path, v))
        prune_versions(tmp_path, keep=2, newest=v)
    ann = latest(client, keys)
    assert ann.weight_version == 3 and int(client.get(keys.version)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000002", "v000003"]
    other = LlamaForCausalLM(model.config)
    load_version(other, ann.path)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError):
        load_version(other, tmp_path / "v000000")


def test_untested_vllm_releases_are_refused_unless_allowed(monkeypatch):
    from shared.vllm_engine import TESTED_VLLM, require_tested_vllm

    assert require_tested_vllm(TESTED_VLLM) == TESTED_VLLM
    assert require_tested_vllm(f"{TESTED_VLLM}+cpu") == f"{TESTED_VLLM}+cpu"  # the CPU build's tag
    with pytest.raises(RuntimeError, match=f"tested with {TESTED_VLLM} only.*OPD_ALLOW_UNTESTED_VLLM"):
        require_tested_vllm("0.33.1")
    monkeypatch.setenv("OPD_ALLOW_UNTESTED_VLLM", "1")
    assert require_tested_vllm("0.33.1") == "0.33.1"


@pytest.mark.redis
def test_rollouts_spread_over_their_visible_gpus(client, keys, monkeypatch):
    """Replicas of one run take the visible GPUs in start order; one GPU or CPU: unchanged."""
    from types import SimpleNamespace

    from services.rollout.worker import spread_device

    ctx = SimpleNamespace(client=client, keys=keys)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # this machine has no GPU to count
    assert [spread_device(ctx, "cuda") for _ in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert spread_device(ctx, "cuda:1") == "cuda:1" and spread_device(ctx, "cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert spread_device(ctx, "cuda") == "cuda"
