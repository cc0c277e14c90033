"""`opd study staleness` end to end on a tiny grid: sweep, variants, gradients, report, merge."""

from __future__ import annotations

import json

import pytest

from services.study import StudySettings, parse_variant, run_study

pytestmark = pytest.mark.smoke


def test_study_writes_report(tmp_path):
    s = StudySettings(staleness=[0, 2], estimators=["fkl_topk", "rkl_stale+ppo_clip"], seeds=1, steps=2,
                      batch_size=8, eval_every=2, eval_n=8, lr_sweep={"fkl_topk": [1e-3, 3e-3]},
                      lrs={"rkl_stale": 1e-4}, gradients=True, grad_prefixes=8, grad_minibatch=4,
                      grad_start_step=1, grad_topk=[2, 15], grad_mc=[1, 2], out=str(tmp_path / "a"))
    results = run_study(s)
    assert len(results) == 5  # 2 sweep runs (one reused at staleness 0) + 3 grid runs
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert {(r["estimator"], r["staleness"]) for r in saved["runs"] if r["phase"] == "grid"} >= {
        ("fkl_topk", 2), ("rkl_stale+ppo_clip", 0), ("rkl_stale+ppo_clip", 2)}
    assert {r["lr"] for r in saved["runs"] if r["estimator"] == "rkl_stale+ppo_clip"} == {1e-4}
    for run in saved["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 2]
        assert run["curve"][-1]["sync_s"] >= run["curve"][-1]["async_s"] > 0
    grads = json.loads((tmp_path / "a" / "gradients.json").read_text())
    assert set(grads["rows"]) == {"fkl_topk", "rkl_stale+ppo_clip", "fkl_topk@2", "fkl_topk@15",
                                  "rkl_support@2", "rkl_support@15", "rkl_mc@1", "rkl_mc@2"}
    assert grads["rows"]["rkl_support@15"]["2"]["cos_mean"] == pytest.approx(1.0, abs=1e-4)
    table = (tmp_path / "a" / "table.md").read_text()
    assert "| fkl_topk |" in table and "rkl_support@2" in table and "**" in table
    for name in ("accuracy_vs_steps.png", "accuracy_vs_time.png"):
        assert (tmp_path / "a" / name).read_bytes()[:4] == b"\x89PNG"
    merged = run_study(s.model_copy(update={"merge": [str(tmp_path / "a")], "out": str(tmp_path / "m")}))
    assert len(merged) == 5 and (tmp_path / "m" / "gradients.json").exists()


def test_variants_parse():
    base, cfg = parse_variant("rkl_stale+vcpo")
    assert base == "rkl_stale" and cfg.vcpo and cfg.stabiliser.kind == "none"
    assert parse_variant("rkl_stale+m2po")[1].stabiliser.kind == "m2po"
    with pytest.raises(ValueError):
        parse_variant("fkl_topk+tis")


def test_reuse_and_merge_match_run_length(tmp_path):
    s = StudySettings(staleness=[0], estimators=["fkl_topk"], seeds=1, steps=2, batch_size=8, eval_every=1,
                      eval_n=8, curves=True, out=str(tmp_path / "a"))
    (first,) = run_study(s)
    table = (tmp_path / "a" / "table.md").read_text()
    assert "fkl_topk, staleness 0:" in table and "| step | seed 0 | mean |" in table and "\n| 2 | " in table
    (again,) = run_study(s.model_copy(update={"reuse": [str(tmp_path / "a")], "out": str(tmp_path / "b")}))
    assert again == first  # same settings: reused, not re-run (the timings would differ)
    longer = run_study(s.model_copy(update={"reuse": [str(tmp_path / "a")], "steps": 3, "out": str(tmp_path / "c")}))
    assert [r["curve"][-1]["step"] for r in longer] == [2, 3]  # a 2-step run does not stand in for a 3-step one
    merged = run_study(s.model_copy(update={"merge": [str(tmp_path / "a"), str(tmp_path / "c")],
                                            "out": str(tmp_path / "m")}))
    assert len(merged) == 2
