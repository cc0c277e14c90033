"""`opd bench` end to end on a tiny setting: every table's numbers land in the JSON.

This checks that the benchmark runs and reports consistent quantities, not how fast anything
is (speed is read from `opd bench` output, never asserted in tests).
"""

from __future__ import annotations

import json

import pytest

from services.bench.main import main

pytestmark = [pytest.mark.smoke, pytest.mark.redis]


def test_bench_all_writes_consistent_results(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)  # the bench starts its own server
    out = tmp_path / "results.json"
    main(["all", "--steps", "3", "--batch-size", "8", "--codec-batch", "4", "--codec-tokens", "16",
          "--codec-top-k", "8", "--json-out", str(out)])
    r = json.loads(out.read_text())
    codec = r["codec"]["codec"]
    assert codec["messages"] == 4 and codec["bytes"] > 4 * 16 * 8 * 8
    assert codec["encode_gbps"] > 0 and codec["decode_gbps"] > 0
    assert r["codec"]["redis"]["messages"] == 4
    assert r["broadcast"]["parameters"] > 0 and r["broadcast"]["save_load_s"] > 0
    p = r["pipeline"]
    assert p["sync"]["staleness"]["max"] == 0 and p["sync"]["steps"] == 3 == p["async"]["steps"]
    busy = p["sync"]["busy_per_step_s"]
    assert all(busy[stage] > 0 for stage in ("rollout", "teacher", "learner"))
    assert {"codec", "weights"} <= set(p["sync"]["overhead_per_step_s"])
    c = p["comparison"]
    assert c["ideal_bound"] == pytest.approx(sum(busy.values()) / max(busy.values()))
    assert sum(c["sync_overhead_parts_s"].values()) == pytest.approx(c["sync_step_s"] - c["sync_stage_sum_s"])
    printed = capsys.readouterr().out
    assert "async / sync speed-up" in printed and "redis, wake-ups, scheduling" in printed


def test_presets_fill_in_only_what_was_not_given(tmp_path):
    from pydantic_settings import CliApp

    from services.bench.main import BenchSettings, apply_preset

    given = apply_preset(CliApp.run(BenchSettings, cli_args=["--preset", "cpu-test", "--steps", "3"]), tmp_path / "a")
    assert (given.steps, given.batch_size, given.device, given.max_new_tokens) == (3, 16, "cpu", 16)
    default = apply_preset(CliApp.run(BenchSettings, cli_args=["--preset", "cpu-test"]), tmp_path / "b")
    assert default.steps == 6 and (tmp_path / "b" / "teacher" / "config.json").exists()
    with pytest.raises(SystemExit, match="unknown preset"):
        apply_preset(BenchSettings(preset="huge"), tmp_path / "c")


def test_bench_memory_measures_both_paths_in_fresh_processes(tmp_path, capsys):
    out = tmp_path / "memory.json"
    main(["memory", "--tokens", "128,512", "--vocab", "4096", "--completion-tokens", "64", "--top-k", "8",
          "--chunk-tokens", "64", "--max-tokens-per-microbatch", "300", "--json-out", str(out)])
    r = json.loads(out.read_text())
    rows = {(x["pass"], x["path"], x["tokens"]): x for x in r["rows"]}
    assert set(rows) == {(p, path, t) for p in ("learner", "teacher") for path in ("chunked", "dense")
                         for t in (128, 512)}
    for (pass_, path, tokens), x in rows.items():
        assert x["peak_growth_bytes"] > 0 and x["seconds"] > 0 and x["trajectories"] == tokens // 64
        assert x["fp32_btv_bytes"] == tokens * 4096 * 4
        parts = {k: v for k, v in x["bound"].items() if k != "total"}
        assert sum(parts.values()) == pytest.approx(x["bound"]["total"])
        assert ("adamw_state" in parts) == (pass_ == "learner")
    assert rows[("learner", "chunked", 512)]["microbatches"] == 8 // 3 + 1  # 3 x 80 tokens fit in 300
    assert rows[("learner", "dense", 512)]["microbatches"] == 1
    ratio = r["ratios"]["learner/512/dense_over_chunked_memory"]
    assert ratio == pytest.approx(rows[("learner", "dense", 512)]["peak_growth_bytes"]
                                  / rows[("learner", "chunked", 512)]["peak_growth_bytes"])
    assert "growth/bound" in capsys.readouterr().out


def test_bench_memory_projects_dense_runs_that_cannot_fit(monkeypatch):
    from services.bench import memory

    monkeypatch.setattr(memory, "_available_bytes", lambda device: 10**6)
    r = memory.run(memory.MemorySettings(tokens=[1024, 4096], paths=["dense"], passes=["learner"], device="cpu"))
    assert all(x["skipped"] for x in r["rows"])
    assert r["rows"][1]["projected_peak_growth_bytes"] == pytest.approx(4.5 * 4096 * 151936 * 4)


def test_bench_hooks_times_identical_outputs_before_and_after(tmp_path, capsys):
    """Both implementations of each hook give the same results (the bench refuses to time
    them otherwise), also with temperature, top-p and teacher draws."""
    out = tmp_path / "hooks.json"
    main(["hooks", "--rows", "3,9", "--vocabs", "50", "--steps", "3", "--repeats", "1", "--temperature", "0.8",
          "--top-p", "0.9", "--draws", "2", "--json-out", str(out)])
    r = json.loads(out.read_text())
    assert [(x["hook"], x["rows"]) for x in r["rows"]] == [("mc", 3), ("mc", 9), ("teacher", 3), ("teacher", 9)]
    for x in r["rows"]:
        assert x["before_ms"] > 0 and x["after_ms"] > 0 and x["before_cpu_ms"] > 0 and x["after_cpu_ms"] > 0
        assert x["ratio"] == pytest.approx(x["before_ms"] / x["after_ms"])
        assert x["cpu_ratio"] == pytest.approx(x["before_cpu_ms"] / x["after_cpu_ms"])
    assert "before/after" in capsys.readouterr().out
