"""vLLM rollout backend: batched sampling, behaviour log-probs, exact MC draws, hot weight reload.

Selected with ``opd-rollout --backend vllm`` (needs vLLM installed; ``scripts/vllm-venv.sh``
builds a CPU environment). The design, numbers and limits are in ``docs/vllm.md``.

* Generation: one ``LLM.generate`` call over ``TokensPrompt``s per batch (continuous
  batching), temperature / top_p from the settings. Seeded through the engine seed
  (reproducible for the same sequence of batches). Not per-request seeds: with those,
  vLLM 0.32's CPU runner crashes when a prefill is chunked ("CPU Generator does not use
  offset"), and on GPU they force a slower per-row sampling path.
* Behaviour log-probs: the engine returns the log-prob of each sampled token
  (``logprobs=0``, flat format: no per-token dicts). At temperature 1 and top_p 1 the engine
  runs with ``logprobs_mode="raw_logprobs"``: the raw model log-probs, which are then
  exactly log mu. Otherwise it runs with ``"processed_logprobs"``: the log-probs of the
  tempered, nucleus-renormalised distribution the token was actually drawn from -- the
  same quantity the transformers backend records (see ``Sample``).
* MC draws (``mc_samples`` N >= 2): vLLM has no per-position extra-draw API, so a worker
  extension wraps the V1 model runner's sampler. On every step it copies the batch's logits
  before the sampler (which edits them in place), lets the engine sample, then, for the whole
  batch at once (services/rollout/mc_draws.py), applies the engine's own per-row temperature
  and top-k/top-p tensors with vLLM's own ``apply_top_k_top_p`` (the kernel the engine just
  sampled with), draws N-1 ids per row WITH replacement from mu in one seeded multinomial and
  gathers log mu in one op; the ids and log-probs come back to the host in ONE packed copy
  per step, recorded against position t = tokens generated so far
  (services/rollout/mc_record.py; a discarded chunked-prefill or preempted step is simply
  overwritten later). EXACT: no top-K truncation, no second forward pass; only the [T, N]
  arrays cross the process boundary (``collective_rpc``). Column 0 is the sampled token
  (checked against the engine's output) with the engine's behaviour log-prob.
* Weights: ``load_weights(dir)`` reads ``dir/model.safetensors`` on the worker and loads it
  into the running model through the worker's layer-wise ``reload_weights`` (which redoes
  the platform's weight processing; a tied LM head is re-processed by hand), strictly
  (every parameter covered), then resets the prefix cache. The engine is not restarted.
* dtype: the checkpoint's own (vLLM's "auto" would run a float32 checkpoint in bfloat16).
* Versions: with the synchronous offline API an update only happens between batches, so
  all tokens of a batch share one version; ``token_versions_T`` is left None and the
  rollout worker stamps the version itself.

Requirements the hooks rely on (set here): the V1 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0``), synchronous scheduling, no speculative decoding, and
requests without penalties, logit bias, min_p or token masks (mu is then temperature and
top-k/top-p of the raw logits, which is what the MC hook applies).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.vllm_engine import (checkpoint_dtype, from_wire, merge_replies, require_tested_vllm, shutdown, to_wire,
                                 use_v1_runner)

if TYPE_CHECKING:
    import torch

    from services.rollout.sampler import Sample
    from services.rollout.settings import RolloutSettings

MC_TAG = "opd_mc"  # SamplingParams.extra_args key: [tag, N] marks a request for MC recording
EXTENSION = f"{__name__}.RolloutWorkerExtension"


def untie(tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """safetensors' save_model keeps only `lm_head.weight` of tied embeddings, but vLLM skips
    `lm_head.*` for tied models and loads the embedding: give it back its input name."""
    if tied and "lm_head.weight" in tensors and "model.embed_tokens.weight" not in tensors:
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    return tensors


def refresh_tied_head(model: torch.nn.Module) -> None:
    """A tied LM head receives no weights of its own, so vLLM's layer-wise reload keeps its
    old processed form (on CPU a packed GEMM copy of the old embedding): rebuild it."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class RolloutWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); ``opd_*`` methods run on
    every worker through ``LLM.collective_rpc``. ``self`` is the vLLM worker."""

    def opd_load_weights(self, file: str) -> int:
        """Copy a published version into the running model; returns the tensors read.

        Goes through the worker's ``reload_weights`` (layer-wise reload): platforms repack
        weights after loading (the CPU GEMMs leave empty ``weight`` params behind), so a
        bare ``model.load_weights`` would not fit them. Strict like shared.weights: every
        parameter must be covered, which ``reload_weights`` only logs."""
        from safetensors.torch import load_file

        model = self.model_runner.model
        cfg = self.model_runner.model_config.hf_text_config
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        tensors = untie(load_file(file), tied)
        expected, loaded = {name for name, _ in model.named_parameters()}, set()
        inner = model.load_weights

        def recording(weights: Any) -> Any:
            names = inner(weights)
            loaded.update(names or ())
            return names

        model.load_weights = recording  # instance attribute: shadows the method for this call
        try:
            self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        finally:
            del model.load_weights
        if tied:
            refresh_tied_head(model)
        if expected - loaded:
            missing = sorted(expected - loaded)[:5]
            raise ValueError(f"weights at {file} do not fit the model: missing {missing}")
        return len(tensors)

    def opd_install_mc(self, seed: int) -> None:
        """Wrap the sampler so steps of MC-tagged requests also record N-1 draws from mu."""
        import torch

        from services.rollout.mc_record import McRecorder

        runner = self.model_runner
        sampler = getattr(runner, "sampler", None)
        if sampler is None or not hasattr(runner, "input_batch"):
            raise RuntimeError("MC recording needs vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        if getattr(sampler, "_opd_wrapped", False):
            return
        self._opd_mc = McRecorder(seed)
        inner = sampler.forward

        def forward(logits: torch.Tensor, sampling_metadata: Any, *args: Any, **kwargs: Any) -> Any:
            slots = self._opd_mc.slots_of(runner.input_batch.req_ids[:logits.shape[0]], self._opd_mc_mark)
            if not (slots >= 0).any():
                return inner(logits, sampling_metadata, *args, **kwargs)
            saved = logits.to(torch.float32, copy=True)  # the sampler edits logits in place
            out = inner(logits, sampling_metadata, *args, **kwargs)
            self._opd_mc_step(saved, out.sampled_token_ids[:, 0], slots, sampling_metadata)
            return out

        sampler.forward, sampler._opd_wrapped = forward, True

    def _opd_mc_mark(self, req_id: str | None) -> tuple[str, int, int] | None:
        """(tag, N, max_tokens) of an MC-tagged request, None for any other (first sight only)."""
        state = self.model_runner.requests.get(req_id) if req_id is not None else None
        params = getattr(state, "sampling_params", None)
        mark = (params.extra_args or {}).get(MC_TAG) if params is not None else None
        return None if mark is None else (str(mark[0]), int(mark[1]), int(params.max_tokens or 0))

    def _opd_mc_step(self, logits: torch.Tensor, sampled: torch.Tensor, slots: np.ndarray, meta: Any) -> None:
        """The whole batch at once, with the engine's own per-row temperature / top-k / top-p
        tensors and its own top-k/top-p function (the kernel it just sampled with); the
        division is skipped when the batch's host copy of the temperatures is all 1 (x / 1 is
        x). Position t = tokens generated so far, from the input batch's arrays."""
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

        if not meta.all_random:
            raise RuntimeError("MC draws need every request sampled (temperature > 0)")
        batch, rows = self.model_runner.input_batch, logits.shape[0]
        positions = batch.num_tokens_no_spec[:rows] - batch.num_prompt_tokens[:rows]
        temperature = None if (batch.temperature_cpu[:rows] == 1.0).all() else meta.temperature
        self._opd_mc.step(logits, sampled, slots, positions, temperature=temperature, top_k=meta.top_k,
                          top_p=meta.top_p, mask=apply_top_k_top_p)

    def opd_take_mc(self, tags: list[str]) -> dict[str, list[tuple[str, list[int], bytes]]]:
        """Hand over (and forget) the recorded [max_tokens, N] id / log-prob buffers of `tags`."""
        return {tag: [to_wire(a) for a in arrays] for tag, arrays in self._opd_mc.take(tags).items()}


class VLLMRollout:
    """RolloutBackend on a vLLM engine; see the module docstring."""

    def __init__(self, settings: RolloutSettings, device: str, seed: int,
                 engine_kwargs: dict[str, Any] | None = None) -> None:
        """`device` is informational: the installed vLLM build picks the platform (CUDA or
        CPU). `engine_kwargs` override ``vllm.LLM`` arguments (tests: enforce_eager...)."""
        from vllm import LLM

        from shared.models import load_tokenizer, resolve_model

        if settings.temperature <= 0:
            raise ValueError("the vllm rollout backend samples: temperature must be > 0")
        path = resolve_model(settings.model)
        tok = load_tokenizer(path)
        self.eos_id, self.pad_id = int(tok.eos_token_id), int(tok.pad_token_id)
        self.s, self.seed, self.device = settings, seed, device
        self.raw = settings.temperature == 1.0 and settings.top_p >= 1.0
        require_tested_vllm()
        use_v1_runner()
        kwargs: dict[str, Any] = dict(
            model=path, seed=seed, dtype=checkpoint_dtype(path),
            gpu_memory_utilization=settings.gpu_memory_utilization,
            logprobs_mode="raw_logprobs" if self.raw else "processed_logprobs",
            worker_extension_cls=EXTENSION, async_scheduling=False,  # the MC hook needs sync steps
        )
        self.llm = LLM(**{**kwargs, **(engine_kwargs or {})})
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        if settings.mc_samples > 1:
            self.llm.collective_rpc("opd_install_mc", args=(seed,))
        self._batches = itertools.count()

    def load_weights(self, path: str) -> None:
        """Load `path/model.safetensors` into the running engine, then drop cached prefixes
        (their KV was computed with the old weights)."""
        from shared.weights import WEIGHTS_FILE

        file = Path(path) / WEIGHTS_FILE
        if not file.is_file():
            raise FileNotFoundError(file)  # the rollout worker retries with a newer version
        self.llm.collective_rpc("opd_load_weights", args=(str(file),))
        if not self.llm.reset_prefix_cache():  # refused while requests run: stale KV would be reused
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update")

    def close(self) -> None:
        shutdown(self.llm)

    def generate(self, prompts: Sequence[np.ndarray]) -> list[Sample]:
        from vllm.inputs import TokensPrompt

        batch = next(self._batches)
        tags = [f"{batch}:{i}" for i in range(len(prompts))]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=np.asarray(p).tolist()) for p in prompts],
            [self._params(tag) for tag in tags], use_tqdm=False)
        mc = {}
        if self.s.mc_samples > 1:
            mc = merge_replies(self.llm.collective_rpc("opd_take_mc", args=(tags,)))
        return [self._sample(o.outputs[0], mc.get(tag)) for o, tag in zip(outs, tags)]

    def _params(self, tag: str) -> Any:
        from vllm import SamplingParams

        n = self.s.mc_samples
        return SamplingParams(
            max_tokens=self.s.max_new_tokens, temperature=self.s.temperature, top_p=self.s.top_p,
            logprobs=0, flat_logprobs=True, detokenize=False,
            extra_args={MC_TAG: [tag, n]} if n > 1 else None)

    def _sample(self, out: Any, mc: list[Any] | None) -> Sample:
        from services.rollout.sampler import Sample

        ids = np.asarray(out.token_ids, np.int32)
        lps = np.asarray(out.logprobs.logprobs, np.float32)  # logprobs=0: one entry per position
        if lps.shape != ids.shape:
            raise RuntimeError(f"vLLM returned {lps.shape} log-probs for {ids.shape} tokens")
        mc_ids = mc_lps = None
        if self.s.mc_samples > 1:
            mc_ids, mc_lps = self._mc(ids, lps, mc)
        eos = ids.size > 0 and int(ids[-1]) == self.eos_id
        return Sample(completion_ids_T=ids, behaviour_logprobs_T=lps, mc_ids_TN=mc_ids,
                      mc_logprobs_TN=mc_lps, finish_reason="eos" if eos else "length")

    @staticmethod
    def _mc(ids: np.ndarray, lps: np.ndarray,
            mc: list[Any] | None) -> tuple[np.ndarray, np.ndarray]:
        """Trim the worker's buffers to T and check they line up with the sampled tokens."""
        if mc is None:
            raise RuntimeError("no MC draws recorded for a request (sampler hook not installed?)")
        n = len(ids)
        mc_ids, mc_lps = from_wire(mc[0])[:n], from_wire(mc[1])[:n]
        if mc_ids.shape[0] != n or not (mc_ids[:, 0] == ids).all():
            raise RuntimeError("MC draws do not line up with the sampled tokens")
        mc_lps[:, 0] = lps  # column 0 is y_t: keep exactly the engine's behaviour log-prob
        return mc_ids, mc_lps
