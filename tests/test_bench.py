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
