"""`opd bench [all|pipeline|codec|broadcast|learner|memory|hooks] [--flags]`: print tables, write JSON.

`memory` (services/bench/memory.py) measures one learner step and one teacher pass at
LLM vocabulary size; `hooks` (services/bench/hooks.py) the vLLM worker hooks' per-step
work before vs after batching; `learner` (services/bench/learner.py) the learner's step
time on 1 vs `--learner-procs N` ranks; `all` runs pipeline, codec and broadcast, and the
learner table too when `--learner-procs` is above 1 (the pipeline's learner then runs on N ranks).

Starts an embedded Redis unless REDIS_URL is set. The default preset `auto` measures the
built-in tiny models on a CPU machine and random-init ~0.5B/~1.5B models on a CUDA one;
`--preset tiny|gpu|cpu-test` picks one, and `--student/--teacher` paths measure your own.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict


class BenchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_BENCH_", use_attribute_docstrings=True,
                                      cli_kebab_case=True, cli_implicit_flags=True, cli_prog_name="opd bench")

    preset: str = "auto"
    """auto: gpu when CUDA is available, else tiny. tiny: the given (default: built-in) models;
    gpu: random-init ~0.5B student / ~1.5B teacher on CUDA, 256-token completions; cpu-test:
    the gpu preset's code path with small random-init models on CPU (gpu and cpu-test override
    student, teacher, device and max_new_tokens)."""
    steps: int = 100
    """Learner steps per pipeline run (throughput counts steps 2..N)."""
    batch_size: int = 64
    """Trajectories per learner step (split across rollout replicas)."""
    rollouts: int = 1
    """Rollout replicas."""
    learner_procs: int = Field(default=1, ge=1)
    """Learner ranks (torchrun; one per GPU): N > 1 runs the pipeline's learner on N ranks and
    measures learner step time on 1 vs N ranks (`opd bench learner`: default 2)."""
    max_staleness: int = 4
    """Staleness bound of the asynchronous run."""
    max_new_tokens: int = 8
    """Completion length cap."""
    student: str = "builtin:student"
    """Student checkpoint."""
    teacher: str = "builtin:teacher"
    """Teacher checkpoint."""
    losses: dict[str, float] = Field(default_factory=lambda: {"fkl_topk": 1.0})
    """Learner estimators."""
    device: str = "auto"
    """Device for the services."""
    engine: str = "transformers"
    """Rollout and teacher backend: transformers, or vllm (vLLM installed; share one GPU by
    setting OPD_ROLLOUT_GPU_MEMORY_UTILIZATION / OPD_TEACHER_GPU_MEMORY_UTILIZATION)."""
    torch_threads: int = 1
    """Torch threads per service process."""
    timeout_s: float = 900
    """Give up on a pipeline run after this long."""
    codec_batch: int = 64
    """Codec benchmark: scored trajectories per batch."""
    codec_tokens: int = 512
    """Codec benchmark: completion positions per trajectory."""
    codec_top_k: int = 64
    """Codec benchmark: teacher top-k."""
    json_out: str = "benchmarks/results.json"
    """Where the JSON results go."""


def table(title: str, rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    body = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    return f"\n== {title} ==\n{body}"


def pipeline(url: str, s: BenchSettings) -> dict[str, Any]:
    from services.bench.pipeline import compare, run_mode
    from shared.settings import resolve_device

    with tempfile.TemporaryDirectory(prefix="opd-bench-") as tmp:
        sync = run_mode(url, 0, s, Path(tmp))
        async_ = run_mode(url, s.max_staleness, s, Path(tmp))
    on_cpu = resolve_device(s.device) == "cpu" and s.torch_threads == 1
    c = compare(sync, async_, cpus=len(os.sched_getaffinity(0)) if on_cpu else None)
    rows = [("", f"{'sync':>12} {'async (s=' + str(s.max_staleness) + ')':>14}")]
    for key, fmt in [("trajectories_per_s", "{:12.1f}"), ("tokens_per_s", "{:12.1f}"), ("step_s", "{:12.3f}")]:
        rows.append((key, fmt.format(sync[key]) + " " + fmt.format(async_[key]).rjust(14)))
    for stage in ("rollout", "teacher", "learner"):
        rows.append((f"busy/step {stage} (s)", f"{sync['busy_per_step_s'][stage]:12.3f} "
                     f"{async_['busy_per_step_s'][stage]:14.3f}"))
    rows += [("async / sync speed-up", f"{c['speedup']:.2f}x"),
             ("ideal bound (R+T+L)/max", f"{c['ideal_bound']:.2f}x"),
             ("achieved / bound", f"{c['fraction_of_bound']:.0%}"),
             *([(f"machine bound ({c['cpus']} cores, approx.)", f"{c['machine_bound']:.2f}x, achieved "
                 f"{c['fraction_of_machine_bound']:.0%} of it")] if c["cpus"] else []),
             ("sync overhead share", f"{c['sync_overhead_share']:.1%} of step "
              f"({c['sync_step_s'] - c['sync_stage_sum_s']:.3f}s / {c['sync_step_s']:.3f}s)"),
             *[(f"  {part}", f"{s:.4f}s = {s / c['sync_step_s']:.1%} of step")
               for part, s in c["sync_overhead_parts_s"].items()],
             *[(f"weight broadcast ({name})", f"step end -> rollout generating: mean {r['weight_lag_mean_s'] or 0:.3f}s, "
                f"max {r['weight_lag_max_s'] or 0:.3f}s") for name, r in (("sync", sync), ("async", async_))]]
    print(table("pipeline: async vs synchronous", rows), flush=True)
    return {"sync": sync, "async": async_, "comparison": c}


def codec(url: str, s: BenchSettings) -> dict[str, Any]:
    from services.bench.codec import run

    r = run(url, s.codec_batch, s.codec_tokens, s.codec_top_k)
    c, q = r["codec"], r["redis"]
    print(table(f"codec + Redis: {c['messages']} scored trajectories, T={s.codec_tokens}, k={s.codec_top_k}, "
                f"{c['bytes'] / 1e6:.1f} MB", [
        ("encode", f"{c['encode_gbps']:.2f} GB/s"), ("decode (validated)", f"{c['decode_gbps']:.2f} GB/s"),
        ("encode + decode", f"{c['roundtrip_gbps']:.2f} GB/s"),
        ("redis stream produce+consume+ack", f"{q['msgs_per_s']:.0f} msg/s, {q['mb_per_s']:.0f} MB/s")]), flush=True)
    return r


def broadcast(s: BenchSettings) -> dict[str, Any]:
    from services.bench.broadcast import run

    r = run(s.student)
    print(table(f"raw safetensors save+load of the student ({r['parameters'] / 1e6:.2f}M params)", [
        ("save", f"{r['save_s'] * 1000:.1f} ms"), ("load", f"{r['load_s'] * 1000:.1f} ms"),
        ("save + load", f"{r['save_load_s'] * 1000:.1f} ms")]), flush=True)
    return r


def learner(url: str, s: BenchSettings) -> dict[str, Any]:
    from services.bench.learner import run
    from shared.settings import resolve_device

    device = resolve_device(s.device)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as tmp:
        r = run(url, s, Path(tmp))
    r["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # 1-min, before and after: a shared machine
    one, many, c, n = r["one"], r["many"], r["comparison"], s.learner_procs
    engine = f"{'NCCL' if device.startswith('cuda') else 'gloo'} on {device}, FSDP2"
    rows = [("", f"{'1 rank':>10} {str(n) + ' ranks':>10}"),
            ("train step (s)", f"{one['train_step_s']:10.4f} {many['train_step_s']:10.4f}"),
            ("whole step (s)", f"{one['step_s']:10.4f} {many['step_s']:10.4f}"),
            ("train speed-up", f"{c['train_speedup']:.2f}x, scaling efficiency {c['train_efficiency']:.0%}"),
            ("whole-step speed-up", f"{c['step_speedup']:.2f}x, scaling efficiency {c['step_efficiency']:.0%}")]
    if not device.startswith("cuda"):
        cores = len(os.sched_getaffinity(0))
        rows.append(("machine", f"{n} gloo processes on this machine's {cores} CPU cores, {s.torch_threads} torch "
                     f"thread(s) per process (1 rank: {s.torch_threads}): at most {min(n, cores)}x; load average "
                     f"{r['load_average'][0]} before, {r['load_average'][1]} after"))
        r["cores"] = cores
    print(table(f"learner: 1 vs {n} ranks ({engine}), {one['steps']} steps of {s.batch_size} trajectories, "
                f"measured over steps 2-{one['steps']}", rows), flush=True)
    return r


def main(argv: list[str]) -> None:
    what = argv[0] if argv and not argv[0].startswith("-") else "all"
    if what == "memory":
        from services.bench.memory import main as memory_main

        return memory_main(argv[1:])
    if what == "hooks":
        from services.bench.hooks import main as hooks_main

        return hooks_main(argv[1:])
    if what not in ("all", "pipeline", "codec", "broadcast", "learner"):
        raise SystemExit("usage: opd bench [all|pipeline|codec|broadcast|learner|memory|hooks] [--flags]")
    s = CliApp.run(BenchSettings, cli_args=argv[1:] if argv and argv[0] == what else argv)
    if what == "learner" and "learner_procs" not in s.model_fields_set:
        s = s.model_copy(update={"learner_procs": 2})
    if what == "learner" and s.learner_procs < 2:
        raise SystemExit("opd bench learner compares 1 rank with --learner-procs N: N must be 2 or more")
    if s.preset == "auto":
        import torch

        s = s.model_copy(update={"preset": "gpu" if torch.cuda.is_available() else "tiny"})
    with tempfile.TemporaryDirectory(prefix="opd-bench-models-") as models_dir:
        if s.preset != "tiny":
            s = apply_preset(s, Path(models_dir))
        run_benchmarks(what, s)


# preset -> (student size, teacher size) and the settings it changes; steps and batch size
# only when not given on the command line
PRESETS = {
    "gpu": (("0.5b", "1.5b"), {"device": "cuda", "max_new_tokens": 256}, {"steps": 20, "batch_size": 64}),
    "cpu-test": (("test", "test"), {"device": "cpu", "max_new_tokens": 16}, {"steps": 6, "batch_size": 16}),
}


def apply_preset(s: BenchSettings, models_dir: Path) -> BenchSettings:
    """Random-init checkpoints at the preset's sizes (see services/bench/models.py)."""
    from services.bench.models import random_checkpoint

    if s.preset not in PRESETS:
        raise SystemExit(f"unknown preset {s.preset!r}: auto, tiny, {', '.join(PRESETS)}")
    (student, teacher), fixed, defaults = PRESETS[s.preset]
    return s.model_copy(update={
        **{k: v for k, v in defaults.items() if k not in s.model_fields_set}, **fixed,
        "student": random_checkpoint(student, models_dir / "student", dtype="float32"),
        "teacher": random_checkpoint(teacher, models_dir / "teacher"),
    })


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__}


def run_benchmarks(what: str, s: BenchSettings) -> None:
    from shared.redis_server import EmbeddedRedis

    embedded = None if os.environ.get("REDIS_URL") else EmbeddedRedis().start()
    url = os.environ.get("REDIS_URL") or embedded.url
    settings = s.model_dump()
    if s.preset != "tiny":  # temporary checkpoint paths mean nothing outside this run
        settings.update(student=f"random-init ({s.preset} preset)", teacher=f"random-init ({s.preset} preset)")
    results: dict[str, Any] = {"machine": machine(), "settings": settings}
    try:
        if what in ("all", "codec"):
            results["codec"] = codec(url, s)
        if what in ("all", "broadcast"):
            results["broadcast"] = broadcast(s)
        if what in ("all", "pipeline"):
            results["pipeline"] = pipeline(url, s)
        if what == "learner" or what == "all" and s.learner_procs > 1:
            results["learner"] = learner(url, s)
    finally:
        if embedded is not None:
            embedded.close()
    Path(s.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(s.json_out).write_text(json.dumps(results, indent=2))
    print(f"\nJSON written to {s.json_out}")
