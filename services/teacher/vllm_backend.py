"""vLLM teacher backend: the finite teacher-score cache from one batched prefill per batch.

Selected with ``opd-teacher --backend vllm`` (needs vLLM; ``scripts/vllm-venv.sh`` builds a
CPU environment). Design, numbers and limits: ``docs/vllm.md``.

Each trajectory becomes one request: prompt + completion as a ``TokensPrompt`` with
``max_tokens=1`` and ``prompt_logprobs=0`` (which makes the engine keep and score the
hidden states of every prompt position). The public API can return top-k prompt log-probs
but not log p of arbitrary per-position ids (the MC ids; 0.32's
``prompt_logprob_token_ids`` needs the V2 model runner, unavailable on CPU), so a worker
extension wraps the V1 model runner's prompt-logprob step: for the rows that predict
completion tokens it applies the LM head to the same hidden states, takes ONE float32
log_softmax and from it gathers, exactly like services/teacher/scorer.py (a whole engine
step at once, services/teacher/step_scores.py: one copy of the row indices, targets and MC
ids to the device, one logits computation, one packed copy of the results back):

* top-k ids + log-probs (descending), tail mass 1 - sum_topk p,
* log p of the sampled tokens (the actual next prompt tokens),
* log p of the trajectory's ``mc_ids_TN``,
* ``draws`` ids drawn from p with a seeded generator, and their log p.

Only these numpy arrays (as raw bytes) come back through ``collective_rpc``; no per-token
Python objects are built for them. What remains per token: the engine's own prompt
log-prob of the actual token (one float per prompt position, flat format), the single
generated token, and the LM head applied twice on completion rows (once by the engine).
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from services.teacher.step_scores import new_job, score_rows, split_rows, step_inputs, widths
from shared.vllm_engine import (checkpoint_dtype, from_wire, merge_replies, require_tested_vllm, shutdown, to_wire,
                                 use_v1_runner)

if TYPE_CHECKING:
    import torch

    from services.teacher.settings import TeacherSettings
    from shared.wire import TeacherScores, Trajectory

SCORE_TAG = "opd_score"  # SamplingParams.extra_args key naming a staged scoring job
EXTENSION = f"{__name__}.TeacherWorkerExtension"
FIELDS = ("topk_ids", "topk_logprobs", "tail_mass", "sampled", "mc", "draw_ids", "draw_logprobs")


class TeacherWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); ``opd_*`` methods run on
    every worker through ``LLM.collective_rpc``. ``self`` is the vLLM worker."""

    def opd_install_scoring(self, seed: int) -> None:
        """Wrap the runner's prompt-logprob step so staged jobs get their rows scored."""
        runner = self.model_runner
        inner = getattr(runner, "_get_prompt_logprobs_dict", None)
        if inner is None or not hasattr(runner, "num_prompt_logprobs"):
            raise RuntimeError("teacher scoring needs vLLM's V1 model runner "
                               "(VLLM_USE_V2_MODEL_RUNNER=0)")
        if getattr(runner, "_opd_wrapped", False):
            return
        self._opd_jobs: dict[str, dict[str, Any]] = {}
        self._opd_seed, self._opd_gen = seed, None

        def wrapped(hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]) -> Any:
            if self._opd_jobs:
                self._opd_score_step(hidden_states, num_scheduled_tokens)
            return inner(hidden_states, num_scheduled_tokens)

        runner._get_prompt_logprobs_dict, runner._opd_wrapped = wrapped, True

    def opd_stage(self, jobs: dict[str, tuple[int, int, int, int, Any]]) -> None:
        """Register jobs: tag -> (prompt_len, num_tokens, top_k, draws, wired mc_ids or None)."""
        for tag, (p, t, k, d, mc) in jobs.items():
            self._opd_jobs[tag] = new_job(p, t, k, d, None if mc is None else from_wire(mc))

    def _opd_score_step(self, hidden_states: torch.Tensor,
                        num_scheduled_tokens: dict[str, int]) -> None:
        """Same bookkeeping as the runner: this step computed positions [start, start + n)
        of each request; row r predicts token r + 1, completion token t is row P - 1 + t.
        The whole step is scored at once (services/teacher/step_scores.py): one copy of the
        row indices, targets and MC ids to the device, one logits computation over every
        staged row, top-k, gathers and draws on the device, one packed copy back."""
        import torch

        segments, rows, targets = self._opd_rows(num_scheduled_tokens)
        if not segments:
            return
        inputs = torch.from_numpy(step_inputs(segments, rows, targets)).to(hidden_states.device)
        logits = self.model_runner.model.compute_logits(hidden_states[inputs[:, 0]])
        if logits is None:  # a tensor-parallel rank that does not hold the gathered logits
            return
        k, d = widths(segments)
        if d and (self._opd_gen is None or self._opd_gen.device != logits.device):
            self._opd_gen = torch.Generator(device=logits.device).manual_seed(self._opd_seed)
        split_rows(segments, score_rows(logits, inputs, k, d, self._opd_gen).cpu().numpy(), k, d)

    def _opd_rows(self, num_scheduled_tokens: dict[str, int]) -> tuple[list, list[np.ndarray], list[np.ndarray]]:
        """(job, first completion row, rows) per staged request in this step, the hidden-state
        rows to score and their target tokens."""
        runner = self.model_runner
        segments, rows, targets = [], [], []
        for req_id in list(runner.num_prompt_logprobs):
            state, n = runner.requests.get(req_id), num_scheduled_tokens.get(req_id)
            params = getattr(state, "sampling_params", None)
            tag = (params.extra_args or {}).get(SCORE_TAG) if params is not None else None
            job = self._opd_jobs.get(tag) if tag is not None else None
            if job is None or n is None:
                continue
            start, first = state.num_computed_tokens, job["prompt_len"] - 1
            lo, hi = max(start, first), min(start + n, state.num_prompt_tokens - 1)
            if lo >= hi:
                continue
            base = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]]) - start
            segments.append((job, lo - first, hi - lo))
            rows.append(np.arange(base + lo, base + hi))
            targets.append(np.asarray(state.prompt_token_ids[lo + 1: hi + 1], np.int64))
        return segments, rows, targets

    def opd_take(self, tags: list[str]) -> dict[str, dict[str, Any]]:
        """Hand over (and forget) finished jobs; a job with only some rows scored is an error
        (none scored: this rank held no logits)."""
        out, jobs = {}, self._opd_jobs
        for tag in tags:
            job = jobs.pop(tag, None)
            if job is None or job["filled"] == 0:
                continue
            if job["filled"] != job["sampled"].shape[0]:
                total = job["sampled"].shape[0]
                raise RuntimeError(f"job {tag}: only {job['filled']} of {total} rows scored")
            out[tag] = {f: None if job[f] is None else to_wire(job[f]) for f in FIELDS}
        jobs.clear()  # leftovers of aborted requests
        return out


class VLLMTeacher:
    """TeacherBackend on a vLLM engine; see the module docstring."""

    def __init__(self, settings: TeacherSettings, device: str,
                 engine_kwargs: dict[str, Any] | None = None) -> None:
        """`device` is informational (the vLLM build picks CUDA or CPU); `engine_kwargs`
        override ``vllm.LLM`` arguments (tests: enforce_eager, max_model_len...)."""
        from vllm import LLM

        from shared.models import resolve_model

        path = resolve_model(settings.model)
        self.s, self.device = settings, device
        require_tested_vllm()
        use_v1_runner()
        kwargs: dict[str, Any] = dict(
            model=path, seed=settings.seed, dtype=checkpoint_dtype(path),
            gpu_memory_utilization=settings.gpu_memory_utilization, worker_extension_cls=EXTENSION,
            enable_prefix_caching=False,  # prompt-logprob requests never read the cache
        )
        self.llm = LLM(**{**kwargs, **(engine_kwargs or {})})
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.llm.collective_rpc("opd_install_scoring", args=(settings.seed,))
        self._batches = itertools.count()

    def score(self, trajectories: list[Trajectory]) -> list[TeacherScores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not trajectories:
            return []
        batch, k = next(self._batches), min(self.s.top_k, self.vocab_size)
        tags = [f"{batch}:{i}" for i in range(len(trajectories))]
        self.llm.collective_rpc("opd_stage", args=({
            tag: (len(t.prompt.prompt_ids_P), t.num_tokens, k, self.s.draws,
                  None if t.mc_ids_TN is None else to_wire(np.asarray(t.mc_ids_TN, np.int32)))
            for tag, t in zip(tags, trajectories)},))
        prompts = [TokensPrompt(prompt_token_ids=np.concatenate(
            [t.prompt.prompt_ids_P, t.completion_ids_T]).astype(np.int64).tolist())
            for t in trajectories]
        params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True,
                                 detokenize=False, extra_args={SCORE_TAG: tag}) for tag in tags]
        self.llm.generate(prompts, params, use_tqdm=False)
        done = merge_replies(self.llm.collective_rpc("opd_take", args=(tags,)))
        if len(done) != len(tags):
            raise RuntimeError(f"{len(tags) - len(done)} of {len(tags)} trajectories were not scored")
        now = time.time()
        return [self._scores(done[tag], now) for tag in tags]

    def close(self) -> None:
        shutdown(self.llm)

    def _scores(self, job: dict[str, Any], now: float) -> TeacherScores:
        from shared.wire import TeacherScores

        a = {f: None if job[f] is None else from_wire(job[f]) for f in FIELDS}
        return TeacherScores(
            topk_ids_TK=a["topk_ids"], topk_logprobs_TK=a["topk_logprobs"], tail_mass_T=a["tail_mass"],
            sampled_logprobs_T=a["sampled"], mc_logprobs_TN=a["mc"], draw_ids_TN=a["draw_ids"],
            draw_logprobs_TN=a["draw_logprobs"], teacher=self.s.model, replica=self.s.replica,
            scored_at=now)
