"""`opd bench memory`: peak memory and time of one learner step and one teacher pass at LLM vocabulary.

Each measurement runs in a fresh process: it builds a random-init Qwen2-shaped model
(default: hidden 64, 2 layers, the real 151,936-token vocabulary, tied embeddings) and
synthetic scored trajectories filling `tokens` completion positions per step, resets the
kernel's peak-RSS counter, then runs one `Trainer.step` (learner) or one `score` call
(teacher). On CPU it reports the peak RSS growth over the step; on CUDA
`torch.cuda.max_memory_allocated` over what was allocated before. The chunked path (the
services' defaults) and the dense path (chunk_tokens = 0, one batch: the previous
implementation) run side by side; a dense run projected not to fit in memory is skipped
and its projection printed. The analytic bound is grads + AdamW state + one micro-batch's
activations + one chunk of logits (weights are resident before the step: not growth).

    opd bench memory                                   # 4k, 16k, 64k tokens; table + JSON
    opd bench memory --tokens 4096 --device cuda --json-out benchmarks/results-memory-gpu.json
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from services.bench.main import machine, table

GB = 1e9


class MemorySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_BENCH_", use_attribute_docstrings=True, cli_kebab_case=True,
                                      cli_implicit_flags=True, cli_prog_name="opd bench memory")

    tokens: list[int] = Field(default_factory=lambda: [4096, 16384, 65536])
    """Completion tokens per learner step / teacher pass (each a separate fresh process)."""
    vocab: int = 151936
    """Vocabulary size V (Qwen2's by default)."""
    size: str = "test"
    """Model shape from services/bench/models.py (test: hidden 64, 2 layers; 0.5b, 1.5b on GPUs)."""
    completion_tokens: int = 512
    """Positions per trajectory (trajectories per step = tokens / completion_tokens)."""
    prompt_tokens: int = 16
    """Prompt length per trajectory."""
    top_k: int = 64
    """Teacher top-k in the scored messages and the teacher pass."""
    chunk_tokens: int = 1024
    """The chunked path's logprob_chunk_tokens (the services' default)."""
    max_tokens_per_microbatch: int = 8192
    """The chunked path's micro-batch budget (the services' default)."""
    passes: list[str] = Field(default_factory=lambda: ["learner", "teacher"])
    """Which passes to measure."""
    paths: list[str] = Field(default_factory=lambda: ["chunked", "dense"])
    """Which implementations to measure."""
    device: str = "auto"
    """cpu, cuda or auto."""
    dtype: str = "float32"
    """Learner autocast / teacher weight dtype: float32 or bfloat16."""
    json_out: str = "benchmarks/results-memory.json"
    """Where the JSON results go."""


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _synthetic(c: dict[str, Any]) -> list:
    from services.bench.codec import scored_batch

    b = max(1, c["tokens"] // c["completion_tokens"])
    return scored_batch(b, c["completion_tokens"], c["top_k"], prompt_len=c["prompt_tokens"], vocab=c["vocab"])


def measure(c: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process; c holds the settings plus pass, path, tokens."""
    import gc

    import torch

    from services.bench.models import random_model
    from services.learner.losses import ObjectiveConfig
    from services.learner.trainer import Trainer
    from services.teacher.scorer import score

    dense = c["path"] == "dense"
    chunk, budget = (0, 0) if dense else (c["chunk_tokens"], c["max_tokens_per_microbatch"])
    learner = c["pass"] == "learner"
    model = random_model(c["size"], c["vocab"], "float32" if learner else c["dtype"]).to(c["device"])
    batch = _synthetic(c)
    if learner:
        trainer = Trainer(model.train(), lr=1e-5, weight_decay=0.0, grad_clip=1.0, objective=ObjectiveConfig(),
                          pad_id=0, chunk_tokens=chunk, max_tokens_per_microbatch=budget, dtype=c["dtype"])
        run = lambda: trainer.step(batch)  # noqa: E731
        groups = trainer.plan(batch)
    else:
        trajs = [b.trajectory for b in batch]
        run = lambda: score(model, trajs, top_k=c["top_k"], pad_id=0, chunk_tokens=chunk,  # noqa: E731
                            max_tokens_per_microbatch=budget)
        from shared.microbatch import microbatches
        groups = microbatches([t.prompt.prompt_ids_P.size + t.num_tokens for t in trajs], budget)
    gc.collect()
    cuda = c["device"].startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS") * 1024
    started = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    params = sum(p.numel() for p in model.parameters())
    mb_rows = max(len(g) for g in groups)
    seq_len = c["prompt_tokens"] + c["completion_tokens"]
    return {"peak_growth_bytes": peak - before, "before_bytes": before, "seconds": seconds,
            "trajectories": len(batch), "microbatches": len(groups), "parameters": params,
            "bound": bound(c, model.config, params, mb_rows, seq_len, chunk)}


def bound(c: dict[str, Any], cfg: Any, params: int, rows: int, seq_len: int, chunk: int) -> dict[str, float]:
    """Analytic peak growth of the chunked path: the parts that must exist at once."""
    act_bytes = 2 if c["dtype"] == "bfloat16" else 4
    h, i, layers, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads
    kv = cfg.num_key_value_heads * (h // heads)
    tokens = rows * seq_len  # one micro-batch, padded
    positions = rows * c["completion_tokens"]
    if c["pass"] == "learner":  # saved for backward per layer: ~10 h + 4 kv + 4 i values and the attention probs
        per_token = layers * ((10 * h + 4 * kv + 4 * i) * act_bytes + 2 * heads * seq_len * 4)
        state = {"grads": 4 * params, "adamw_state": 8 * params, "head_grad_accumulator": 4 * cfg.vocab_size * h}
        extra = positions * (c["top_k"] + 1) * (8 + 4 * 4)  # ids, teacher/student log-probs and their grads
    else:  # no grad: one layer's transients at a time, and the top-k outputs
        per_token = (4 * h + 3 * i) * act_bytes + 2 * heads * seq_len * 4
        state = {}
        extra = positions * c["top_k"] * (8 + 4) * 2
    parts = {**state, "activations": tokens * per_token + positions * h * 4 * 2, "inputs": extra,
             "logits_chunk": min(chunk, positions) * cfg.vocab_size * 4}
    parts["total"] = sum(parts.values())
    return parts


def _run_child(c: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "services.bench.memory", json.dumps(c)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement {c['pass']}/{c['path']}/{c['tokens']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024


def run(s: MemorySettings) -> dict[str, Any]:
    """Every (pass, path, tokens) measurement; dense runs that would not fit are projected."""
    base = s.model_dump(exclude={"json_out", "tokens", "passes", "paths"})
    results: list[dict[str, Any]] = []
    for pass_ in s.passes:
        factor = {"learner": 4.5, "teacher": 2.5}[pass_]  # x fp32 [B,T,V]; replaced by the first dense run
        for path in s.paths:
            for tokens in sorted(s.tokens):
                c = {**base, "pass": pass_, "path": path, "tokens": tokens}
                btv = tokens * s.vocab * 4
                row = {"pass": pass_, "path": path, "tokens": tokens, "fp32_btv_bytes": btv}
                if path == "dense" and factor * btv > 0.8 * _available_bytes(s.device):
                    row.update(skipped=True, projected_peak_growth_bytes=factor * btv)
                else:
                    row.update(_run_child(c))
                    if path == "dense":
                        factor = row["peak_growth_bytes"] / btv
                results.append(row)
                print(_line(row), flush=True)
    return {"rows": results, "ratios": ratios(results)}


def _line(r: dict[str, Any]) -> str:
    head = f"  {r['pass']:<8} {r['path']:<8} {r['tokens']:>7}"
    if r.get("skipped"):
        return f"{head}  skipped: projected {r['projected_peak_growth_bytes'] / GB:.1f} GB does not fit"
    b = r["bound"]["total"]
    vs_bound = (f"bound {b / GB:5.2f} GB  growth/bound {r['peak_growth_bytes'] / b:4.2f}"
                if r["path"] == "chunked" else f"{r['peak_growth_bytes'] / r['fp32_btv_bytes']:4.2f} x fp32[B,T,V]".ljust(36))
    return (f"{head}  growth {r['peak_growth_bytes'] / GB:6.2f} GB  {vs_bound}  fp32[B,T,V] "
            f"{r['fp32_btv_bytes'] / GB:6.2f} GB  {r['seconds']:7.2f} s  ({r['microbatches']} micro-batches)")


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Side-by-side ratios measured in this run: dense/chunked memory and time, flatness."""
    got = {(r["pass"], r["path"], r["tokens"]): r for r in rows if not r.get("skipped")}
    out: dict[str, Any] = {}
    for (pass_, path, tokens), r in got.items():
        if path == "dense" and (pass_, "chunked", tokens) in got:
            c = got[(pass_, "chunked", tokens)]
            out[f"{pass_}/{tokens}/dense_over_chunked_memory"] = r["peak_growth_bytes"] / c["peak_growth_bytes"]
            out[f"{pass_}/{tokens}/chunked_over_dense_time"] = c["seconds"] / r["seconds"]
    for pass_ in {k[0] for k in got}:
        chunked = sorted((t, r) for (p, path, t), r in got.items() if p == pass_ and path == "chunked")
        if len(chunked) > 1:
            out[f"{pass_}/chunked_largest_over_smallest_memory"] = (
                chunked[-1][1]["peak_growth_bytes"] / chunked[0][1]["peak_growth_bytes"])
            out[f"{pass_}/chunked_max_growth_over_bound"] = max(
                r["peak_growth_bytes"] / r["bound"]["total"] for _, r in chunked)
        past_one = [r["peak_growth_bytes"] for _, r in chunked if r["microbatches"] > 1]
        if len(past_one) > 1:  # the target: flat in tokens per step once past one micro-batch
            out[f"{pass_}/chunked_flatness_past_one_microbatch"] = max(past_one) / min(past_one)
    return out


def main(argv: list[str]) -> None:
    s = CliApp.run(MemorySettings, cli_args=argv)
    if s.device == "auto":
        import torch

        s = s.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})
    print(f"\n== memory: one learner step / one teacher pass, V={s.vocab}, model {s.size}, K={s.top_k}, "
          f"{s.completion_tokens}-token completions, chunk {s.chunk_tokens}, micro-batch "
          f"{s.max_tokens_per_microbatch} tokens, {s.device}, {s.dtype} ==", flush=True)
    results = run(s)
    if results["ratios"]:
        print(table("ratios (same run)", [(k, f"{v:.2f}x") for k, v in sorted(results["ratios"].items())]))
    out = {"machine": machine(), "settings": s.model_dump(), **results}
    Path(s.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(s.json_out).write_text(json.dumps(out, indent=2))
    print(f"\nJSON written to {s.json_out}")


if __name__ == "__main__":  # a child measurement: settings JSON in, result JSON out
    import torch

    config = json.loads(sys.argv[1])
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(json.dumps(measure(config)))
