"""Opt-in tests of the vLLM backends against transformers on tiny models built from config.

Skipped when vLLM is not importable (the default environment). To run them:

    scripts/vllm-venv.sh
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm.py

One engine per backend for the whole module (engine start-up dominates: ~40 s each on CPU).
Both engines get a 16-token step budget so prefills are chunked and requests interleave,
which exercises the chunk bookkeeping of the worker hooks. `-s` prints measured agreement.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (build .venv-vllm with scripts/vllm-venv.sh)")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402  (after the skip: the vLLM venv provides it)

from services.rollout.settings import RolloutSettings  # noqa: E402
from services.teacher.settings import TeacherSettings  # noqa: E402
from shared.sequences import completion_logits, pack  # noqa: E402
from shared.wire import Prompt, ScoredTrajectory, Trajectory, decode, encode  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is far larger
ENGINE = {"enforce_eager": True, "max_model_len": 128, "max_num_batched_tokens": 16}
MC, MAX_NEW, TOL = 4, 12, 1e-4
TEXTS = ([f"{a}+{b}={a + b}" for a in range(30) for b in range(30)]
         + ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen jugs"] * 20)
PROMPTS_TEXT = ["12+7=", "3+4=", "25+19=", "the quick", "pack my box with", "9+", "1",
                "fox jumps over the"]


def _tiny(seed: int, tok) -> torch.nn.Module:
    """2 layers, 2 heads of 32 (vLLM's CPU attention needs head_dim >= 32), tied embeddings;
    a large init range so distributions are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True, initializer_range=0.15)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Checkpoints a (student) and b (teacher / reload target), plus published versions."""
    from shared.tokenizer import train_tokenizer
    from shared.weights import save_version

    root = tmp_path_factory.mktemp("vllm")
    tok = train_tokenizer(TEXTS, vocab_size=64)
    out: dict = {"tok": tok, "prompts": [np.array(tok(t)["input_ids"], np.int32) for t in PROMPTS_TEXT]}
    for name, seed in (("a", 0), ("b", 1)):
        model = _tiny(seed, tok)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name], out[f"dir_{name}"] = model, str(root / name)
        out[f"v_{name}"] = str(save_version(model, root / "versions", {"a": 0, "b": 1}[name]))
    return out


@pytest.fixture(scope="module")
def rollout(assets: dict):
    from services.rollout.vllm_backend import VLLMRollout

    settings = RolloutSettings(model=assets["dir_a"], max_new_tokens=MAX_NEW, mc_samples=MC)
    backend = VLLMRollout(settings, "cpu", seed=0, engine_kwargs=ENGINE)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def teacher(assets: dict):
    from services.teacher.vllm_backend import VLLMTeacher

    settings = TeacherSettings(model=assets["dir_b"], top_k=5, draws=3, seed=0)
    backend = VLLMTeacher(settings, "cpu", engine_kwargs=ENGINE)
    yield backend
    backend.close()


def dense(model: torch.nn.Module, prompts: list, completions: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(completion_logits(model, pack(prompts, completions, 0)), -1)


def max_mc_error(model: torch.nn.Module, prompts: list, samples: list) -> float:
    """Largest |log p| difference over behaviour and MC log-probs vs a full forward."""
    ref, worst = dense(model, prompts, [s.completion_ids_T for s in samples]), 0.0
    for i, s in enumerate(samples):
        ids = torch.from_numpy(s.mc_ids_TN).long()
        want = ref[i, : len(s.completion_ids_T)].gather(-1, ids).numpy()
        worst = max(worst, float(np.abs(s.mc_logprobs_TN - want).max()),
                    float(np.abs(s.behaviour_logprobs_T - want[:, 0]).max()))
    return worst


def test_rollout_matches_a_transformers_forward(rollout, assets: dict) -> None:
    prompts = assets["prompts"] * 2
    samples = rollout.generate(prompts)
    eos = assets["tok"].eos_token_id
    for s in samples:
        n = len(s.completion_ids_T)
        assert s.completion_ids_T.dtype == np.int32 and s.behaviour_logprobs_T.dtype == np.float32
        assert s.mc_ids_TN.shape == (n, MC) and s.mc_logprobs_TN.shape == (n, MC)
        assert (s.mc_ids_TN[:, 0] == s.completion_ids_T).all() and s.token_versions_T is None
        if s.finish_reason == "eos":
            assert s.completion_ids_T[-1] == eos and eos not in s.completion_ids_T[:-1]
        else:
            assert s.finish_reason == "length" and n == MAX_NEW and eos not in s.completion_ids_T
    err = max_mc_error(assets["a"], prompts, samples)
    print(f"\nrollout max |dlogp| vs transformers: {err:.2e}")
    assert err < TOL


def test_mc_draws_follow_the_behaviour_distribution(rollout, assets: dict) -> None:
    """Sampled tokens and MC columns at position 0 of one prompt, against mu itself."""
    one = rollout.s.model_copy(update={"max_new_tokens": 1})
    full, rollout.s = rollout.s, one
    try:
        samples = rollout.generate([assets["prompts"][0]] * 500)
    finally:
        rollout.s = full
    probs = dense(assets["a"], [assets["prompts"][0]], [np.array([0], np.int32)])[0, 0].exp().numpy()
    sampled = np.array([s.mc_ids_TN[0, 0] for s in samples])
    extra = np.concatenate([s.mc_ids_TN[0, 1:] for s in samples])
    rng = np.random.default_rng(0)
    for ids in (sampled, extra):
        n = len(ids)
        tv = 0.5 * np.abs(np.bincount(ids, minlength=len(probs)) / n - probs).sum()
        null = [0.5 * np.abs(rng.multinomial(n, probs) / n - probs).sum() for _ in range(1000)]
        assert tv < np.quantile(null, 0.999), (tv, np.median(null))  # total variation vs chance


def test_mc_draws_at_temperature_and_top_p_come_from_the_tempered_nucleus(rollout, assets: dict) -> None:
    """Requests at temperature 0.7 / top_p 0.9 (the engine's per-row tensors and its own
    top-k/top-p function in the MC hook): every MC id lies in the nucleus of a transformers
    forward, and the draws carry its tempered, renormalised log-probs."""
    from services.rollout.mc_draws import log_mu

    full, rollout.s = rollout.s, rollout.s.model_copy(update={"temperature": 0.7, "top_p": 0.9})
    try:
        samples = rollout.generate(assets["prompts"])
    finally:
        rollout.s = full
    with torch.no_grad():
        logits = completion_logits(assets["a"], pack(assets["prompts"], [s.completion_ids_T for s in samples], 0))
    worst, masked = 0.0, 0
    for i, s in enumerate(samples):
        n = len(s.completion_ids_T)
        mu = log_mu(logits[i, :n].float().clone(), torch.full((n,), 0.7), top_p=torch.full((n,), 0.9))
        want = mu.gather(-1, torch.from_numpy(s.mc_ids_TN).long()).numpy()
        assert np.isfinite(want).all()  # no id outside the nucleus
        worst, masked = max(worst, float(np.abs(s.mc_logprobs_TN[:, 1:] - want[:, 1:]).max())), masked + int(
            torch.isinf(mu).any(-1).sum())
    print(f"\ntempered MC max |dlogp| vs transformers: {worst:.2e} ({masked} positions truncated by top-p)")
    assert worst < TOL and masked > 0


def test_weight_reload_changes_generation(rollout, assets: dict) -> None:
    prompts = assets["prompts"]
    rollout.load_weights(assets["v_b"])
    samples = rollout.generate(prompts)
    err_b = max_mc_error(assets["b"], prompts, samples)
    print(f"\nafter reload: max |dlogp| vs new weights {err_b:.2e}, vs old "
          f"{max_mc_error(assets['a'], prompts, samples):.2e}")
    assert err_b < TOL and max_mc_error(assets["a"], prompts, samples) > 0.1
    rollout.load_weights(assets["v_a"])  # and back: the module's other tests expect model a
    assert max_mc_error(assets["a"], prompts, rollout.generate(prompts)) < TOL
    with pytest.raises(FileNotFoundError):
        rollout.load_weights(str(Path(assets["v_a"]).parent / "v999999"))


def test_mc_nucleus_is_vllms_top_k_top_p() -> None:
    """The pure-torch mask the MC math is tested with (services/rollout/mc_draws.py) is vLLM's
    own: same masked entries and values, per-row k and p mixed, on random and tied logits."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    from services.rollout.mc_draws import nucleus

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 300, generator=gen) * 3
    logits[1] = torch.round(logits[1])  # ties
    p = torch.tensor([0.9, 0.5, 1.0, 0.99, 0.1, 0.75, 1.0, 0.3])
    k = torch.tensor([300, 20, 5, 300, 300, 1, 64, 300], dtype=torch.int32)
    for kk, pp in ((None, p), (k, None), (k, p)):
        want = apply_top_k_top_p(logits.clone(), kk, pp)
        got = nucleus(logits.clone(), kk, pp)
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got, want)
        assert torch.isinf(got).any()


def trajectories(assets: dict, with_mc: bool = True) -> list[Trajectory]:
    """Synthetic trajectories of different lengths, MC ids drawn uniformly."""
    rng, out = np.random.default_rng(0), []
    for i, p in enumerate(assets["prompts"]):
        c = rng.integers(3, len(assets["tok"]), size=1 + (5 * i) % 13).astype(np.int32)
        mc = np.concatenate([c[:, None], rng.integers(0, len(assets["tok"]), (len(c), 3))], 1)
        out.append(Trajectory(f"t{i}", Prompt(f"p{i}", p, "", 0), c, np.zeros(len(c), np.float32),
                              np.zeros(len(c), np.int32), mc.astype(np.int32) if with_mc else None,
                              np.zeros(mc.shape, np.float32) if with_mc else None))
    return out


def test_teacher_matches_the_transformers_scorer(teacher, assets: dict) -> None:
    from services.teacher.scorer import score

    trajs = trajectories(assets)
    got, ref = teacher.score(trajs), score(assets["b"], trajs, top_k=5, pad_id=0)
    dense_b = dense(assets["b"], [t.prompt.prompt_ids_P for t in trajs],
                    [t.completion_ids_T for t in trajs])
    worst = 0.0
    for i, (t, g, r) in enumerate(zip(trajs, got, ref)):
        np.testing.assert_array_equal(g.topk_ids_TK, r.topk_ids_TK)
        assert g.draw_ids_TN.shape == (t.num_tokens, 3) and g.draw_ids_TN.dtype == np.int32
        draws = torch.from_numpy(g.draw_ids_TN).long()
        want_draw = dense_b[i, : t.num_tokens].gather(-1, draws).numpy()
        pairs = [(g.topk_logprobs_TK, r.topk_logprobs_TK), (g.tail_mass_T, r.tail_mass_T),
                 (g.sampled_logprobs_T, r.sampled_logprobs_T), (g.mc_logprobs_TN, r.mc_logprobs_TN),
                 (g.draw_logprobs_TN, want_draw)]
        worst = max([worst] + [float(np.abs(a - b).max()) for a, b in pairs])
    print(f"\nteacher max |d| vs scorer.score: {worst:.2e}")
    assert worst < TOL
    assert teacher.vocab_size == len(assets["tok"])


def test_teacher_caps_top_k_and_handles_no_mc(teacher, assets: dict) -> None:
    full, teacher.s = teacher.s, teacher.s.model_copy(update={"top_k": 1000, "draws": 0})
    try:
        got = teacher.score(trajectories(assets, with_mc=False)[:2])
    finally:
        teacher.s = full
    assert got[0].topk_ids_TK.shape[1] == teacher.vocab_size
    assert got[0].mc_logprobs_TN is None and got[0].draw_ids_TN is None
    np.testing.assert_allclose(got[0].tail_mass_T, 0.0, atol=1e-5)
    assert teacher.score([]) == []


def test_messages_round_trip_the_wire(rollout, teacher, assets: dict) -> None:
    from services.rollout.sampler import sample

    prompts = assets["prompts"][:3]
    samples = rollout.generate(prompts)
    hf = sample(assets["a"], prompts, eos_id=assets["tok"].eos_token_id, pad_id=0,
                max_new_tokens=MAX_NEW, mc_samples=MC)
    trajs = [Trajectory(f"t{i}", Prompt(f"p{i}", p, "", 3), s.completion_ids_T, s.behaviour_logprobs_T,
                        np.full(len(s.completion_ids_T), 3, np.int32), s.mc_ids_TN, s.mc_logprobs_TN,
                        s.finish_reason) for i, (p, s) in enumerate(zip(prompts, samples))]
    for t, h in zip(trajs, hf):  # same layout as the transformers backend's samples
        for name in ("completion_ids_T", "behaviour_logprobs_T", "mc_ids_TN", "mc_logprobs_TN"):
            a, b = getattr(samples[0], name), getattr(h, name)
            assert a.dtype == b.dtype and a.ndim == b.ndim and a.shape[1:] == b.shape[1:]
        back = decode(encode(t), Trajectory)
        np.testing.assert_array_equal(back.mc_ids_TN, t.mc_ids_TN)
        np.testing.assert_array_equal(back.behaviour_logprobs_T, t.behaviour_logprobs_T)
    for t, s in zip(trajs, teacher.score(trajs)):
        back = decode(encode(ScoredTrajectory(t, s)), ScoredTrajectory)
        np.testing.assert_array_equal(back.scores.topk_ids_TK, s.topk_ids_TK)
        np.testing.assert_array_equal(back.scores.mc_logprobs_TN, s.mc_logprobs_TN)
        np.testing.assert_array_equal(back.scores.draw_logprobs_TN, s.draw_logprobs_TN)


def test_demo_runs_on_the_built_in_models_with_the_vllm_engines(tmp_path):
    """The shipped student and teacher (32-dim heads) under vLLM: the real entry point, a few steps."""
    import json
    import subprocess
    import sys

    from shared.redis_server import free_port

    out = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--backend", "vllm", "--steps", "8",
                          "--eval-every", "4", "--rollouts", "1", "--run-dir", str(tmp_path),
                          "--http-base-port", str(free_port())],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["dead_letters"] == 0
    assert [p["step"] for p in summary["eval_curve"]] == [0, 4, 8]
    logs = (tmp_path / "logs" / "rollout-0.log").read_text()
    assert "loaded weight version 8" in logs or "loaded weight version 7" in logs
