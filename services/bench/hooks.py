"""`opd bench hooks`: per-step time of the vLLM worker hooks' own work, before vs after batching.

What a worker hook adds to an engine step is torch and Python of its own, so it is timed
here without vLLM, on stand-ins of the engine's state (request states, logits, hidden
states), at several batch sizes and vocabularies, before and after in the same run:

* `mc` (rollout, mc_samples N): before = the per-row hook (services/bench/hook_references.py),
  after = services/rollout/mc_record.py as the hook calls it (rows mapped to requests from a
  cache, the engine's [R] temperature / top-p tensors, one `mc_step`, one packed copy; the
  buffers filled at hand-over, whose cost is shared over the steps). Rows = requests in the
  decode step. The time covers `steps` decode steps plus the hand-over, per step.
* `teacher`: before = per-request scoring (one LM head, top-k and five copies per request),
  after = services/teacher/step_scores.py (one copy in, one LM head, one packed copy out).
  Rows = requests in the step, each with `teacher_rows` positions (a chunk of its prefill).

Both sides get identical inputs and must give identical outputs (checked on every run), so
the difference is the hooks' overhead. The LM head is a [V, hidden] matmul on random data.
Printed per step (medians): wall time and the process's CPU time, which a busy shared
machine does not inflate. On CPU a `.cpu()` copy is free, so the device -> host copies and
synchronisations the batching removes only show in a CUDA run.

    opd bench hooks                                 # rows 8, 64, 256; vocab 64 and 151,936
    opd bench hooks --device cuda --json-out benchmarks/results-hooks-gpu.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from services.bench.main import machine


class HooksSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_BENCH_", use_attribute_docstrings=True, cli_kebab_case=True,
                                      cli_implicit_flags=True, cli_prog_name="opd bench hooks")

    rows: list[int] = Field(default_factory=lambda: [8, 64, 256])
    """Requests per engine step."""
    vocabs: list[int] = Field(default_factory=lambda: [64, 151936])
    """Vocabulary sizes (the test models' and Qwen2's)."""
    hooks: list[str] = Field(default_factory=lambda: ["mc", "teacher"])
    """Which hooks to time."""
    mc_samples: int = 4
    """MC hook: N (the sampled token plus N - 1 draws); also the teacher's MC width."""
    temperature: float = 1.0
    """MC hook: every request's temperature."""
    top_p: float = 1.0
    """MC hook: every request's top-p (1: no nucleus, the engine then passes none)."""
    steps: int = 8
    """MC hook: decode steps per timed sequence (then one hand-over)."""
    teacher_rows: int = 4
    """Teacher hook: positions per request in the step."""
    top_k: int = 64
    """Teacher hook: top-k (capped at the vocabulary)."""
    draws: int = 0
    """Teacher hook: draws per position."""
    hidden: int = 64
    """Teacher hook: hidden size of the LM head."""
    repeats: int = 7
    """Timed runs per side and measurement (after one warm-up); the median is reported."""
    threads: int = 1
    """torch intra-op threads (1: the steadiest timings on a shared machine)."""
    device: str = "auto"
    """cpu, cuda or auto."""
    json_out: str = "benchmarks/results-hooks.json"
    """Where the JSON results go."""


class Clock:
    """Wall and process CPU seconds summed over the `with` sections (CUDA work finished at
    both ends). The CPU time is what the section itself computed: on a shared machine it
    does not grow while the process waits for a core, unlike the wall time."""

    def __init__(self, device: str) -> None:
        self.cuda, self.wall, self.cpu = device.startswith("cuda"), 0.0, 0.0

    def _sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def __enter__(self) -> Clock:
        self._sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu

    def per(self, n: int) -> tuple[float, float]:
        return self.wall / n, self.cpu / n


def mc_inputs(s: HooksSettings, rows: int, vocab: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return {"logits": torch.randn(rows, vocab, generator=gen).mul_(3).to(s.device),
            "sampled": torch.randint(0, vocab, (rows,), generator=gen, dtype=torch.int32).to(s.device),
            "req_ids": [f"req-{i}" for i in range(rows)],
            "marks": {f"req-{i}": (f"b:{i}", s.mc_samples, s.steps) for i in range(rows)}}


def mc_before(s: HooksSettings, x: dict[str, Any]) -> tuple[float, Any]:
    from services.bench.hook_references import PerRowMcHook
    from services.rollout.vllm_backend import MC_TAG

    requests = {rid: SimpleNamespace(output_token_ids=[], sampling_params=SimpleNamespace(
        temperature=s.temperature, top_p=s.top_p, max_tokens=n_tok, extra_args={MC_TAG: [tag, n]}))
        for rid, (tag, n, n_tok) in x["marks"].items()}
    hook, clock = PerRowMcHook(requests, seed=0), Clock(s.device)
    for _ in range(s.steps):
        with clock:
            hook.after_sampler(*hook.before_sampler(x["req_ids"], x["logits"]), x["sampled"])
        for state in requests.values():  # the engine's bookkeeping, not the hook's
            state.output_token_ids.append(0)
    with clock:
        out = hook.take([m[0] for m in x["marks"].values()])
    return clock.per(s.steps), out


def mc_after(s: HooksSettings, x: dict[str, Any]) -> tuple[float, Any]:
    import torch

    from services.rollout.mc_record import McRecorder

    rows, rec, clock = len(x["req_ids"]), McRecorder(seed=0), Clock(s.device)
    # as the hook: no division when the engine's host copy of the temperatures is all 1
    temperature = None if s.temperature == 1.0 else torch.full((rows,), s.temperature, device=s.device)
    top_p = None if s.top_p >= 1.0 else torch.full((rows,), s.top_p, device=s.device)
    prompt = np.full(rows, 16, np.int64)
    tokens = prompt.copy()
    for _ in range(s.steps):
        with clock:
            slots = rec.slots_of(x["req_ids"], x["marks"].get)
            rec.step(x["logits"].to(torch.float32, copy=True), x["sampled"], slots, tokens - prompt,
                     temperature=temperature, top_p=top_p)
        tokens += 1  # the engine's bookkeeping
    with clock:
        out = rec.take([m[0] for m in x["marks"].values()])
    return clock.per(s.steps), out


def same_mc(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[t][0], b[t][0]) and np.array_equal(a[t][1], b[t][1])
                                        for t in a)


def teacher_inputs(s: HooksSettings, rows: int, vocab: int) -> dict[str, Any]:
    import torch

    gen, rng, m = torch.Generator().manual_seed(0), np.random.default_rng(0), s.teacher_rows
    return {"hidden": torch.randn(rows * m, s.hidden, generator=gen).to(s.device),
            "head": torch.randn(vocab, s.hidden, generator=gen).mul_(0.3).to(s.device),
            "targets": rng.integers(0, vocab, (rows, m)),
            "mc": rng.integers(0, vocab, (rows, m, s.mc_samples)).astype(np.int32),
            "k": min(s.top_k, vocab)}


def _jobs(s: HooksSettings, x: dict[str, Any]) -> list[dict[str, Any]]:
    from services.teacher.step_scores import new_job

    return [new_job(1, s.teacher_rows, x["k"], s.draws, mc) for mc in x["mc"]]


def teacher_before(s: HooksSettings, x: dict[str, Any]) -> tuple[float, Any]:
    from services.bench.hook_references import PerRequestTeacherHook

    m, jobs = s.teacher_rows, _jobs(s, x)
    requests = [(job, 0, np.arange(i * m, (i + 1) * m), x["targets"][i].tolist()) for i, job in enumerate(jobs)]
    hook, clock = PerRequestTeacherHook(seed=0), Clock(s.device)
    with clock:
        hook.step(requests, x["hidden"], x["head"])
    return clock.per(1), jobs


def teacher_after(s: HooksSettings, x: dict[str, Any]) -> tuple[float, Any]:
    import torch

    from services.teacher.step_scores import score_rows, split_rows, step_inputs, widths

    m, jobs = s.teacher_rows, _jobs(s, x)
    gen = torch.Generator(device=x["hidden"].device).manual_seed(0)
    segments = [(job, 0, m) for job in jobs]
    rows = [np.arange(i * m, (i + 1) * m) for i in range(len(jobs))]
    with Clock(s.device) as clock:
        inputs = torch.from_numpy(step_inputs(segments, rows, list(x["targets"]))).to(x["hidden"].device)
        logits = torch.nn.functional.linear(x["hidden"][inputs[:, 0]], x["head"])
        k, d = widths(segments)
        split_rows(segments, score_rows(logits, inputs, k, d, gen).cpu().numpy(), k, d)
    return clock.per(1), jobs


def same_teacher(a: list[dict], b: list[dict]) -> bool:
    """Same top-k ids; log-probs equal to float32 rounding (one batched vs per-request matmuls)."""
    return all(np.array_equal(x["topk_ids"], y["topk_ids"])
               and all(np.allclose(x[f], y[f], atol=1e-5) for f in ("topk_logprobs", "sampled", "mc"))
               for x, y in zip(a, b))


HOOKS = {"mc": (mc_inputs, mc_before, mc_after, same_mc),
         "teacher": (teacher_inputs, teacher_before, teacher_after, same_teacher)}


def measure(s: HooksSettings, hook: str, rows: int, vocab: int) -> dict[str, Any]:
    """Median per-step wall and CPU milliseconds of each side over `repeats` runs, the two
    sides alternating (so that a busy machine slows both alike), after one warm-up each."""
    inputs, before, after, same = HOOKS[hook]
    x = inputs(s, rows, vocab)
    if not same(before(s, x)[1], after(s, x)[1]):
        raise RuntimeError(f"{hook} hook: before and after disagree at rows={rows}, vocab={vocab}")
    runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(s.repeats):
        runs["before"].append(before(s, x)[0])
        runs["after"].append(after(s, x)[0])
    r: dict[str, Any] = {"hook": hook, "rows": rows, "vocab": vocab}
    for side, times in runs.items():
        r[f"{side}_ms"] = 1e3 * statistics.median(t[0] for t in times)
        r[f"{side}_cpu_ms"] = 1e3 * statistics.median(t[1] for t in times)
    r["ratio"], r["cpu_ratio"] = r["before_ms"] / r["after_ms"], r["before_cpu_ms"] / r["after_cpu_ms"]
    return r


def main(argv: list[str]) -> None:
    import torch

    s = CliApp.run(HooksSettings, cli_args=argv)
    if s.device == "auto":
        s = s.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})
    torch.set_num_threads(s.threads)
    print(f"\n== hooks: per-step time of the worker hooks' own work ({s.device}, N={s.mc_samples}, "
          f"temperature {s.temperature}, top_p {s.top_p}, {s.steps} decode steps; teacher "
          f"{s.teacher_rows} rows/request, k={s.top_k}, draws {s.draws}; median of {s.repeats}, "
          f"{s.threads} thread(s)) ==", flush=True)
    print(f"  {'':<23}{'wall ms per step':^36}  {'CPU ms per step':^36}")
    print(f"  {'hook':<8} {'vocab':<8} {'rows':<5}" + f"{'before':>12} {'after':>10} {'before/after':>13}" * 2)
    results = []
    for hook in s.hooks:
        for vocab in s.vocabs:
            for rows in s.rows:
                r = measure(s, hook, rows, vocab)
                results.append(r)
                print(f"  {hook:<8} {vocab:<8} {rows:<5}{r['before_ms']:12.3f} {r['after_ms']:10.3f} "
                      f"{r['ratio']:12.2f}x{r['before_cpu_ms']:12.3f} {r['after_cpu_ms']:10.3f} "
                      f"{r['cpu_ratio']:12.2f}x", flush=True)
    out = {"machine": machine(), "settings": s.model_dump(), "rows": results}
    Path(s.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(s.json_out).write_text(json.dumps(out, indent=2))
    print(f"\nJSON written to {s.json_out}")
