"""`opd study staleness` end to end on a tiny grid: results, table and plots are written."""

from __future__ import annotations

import json

import pytest

from services.study import StudySettings, run_study

pytestmark = pytest.mark.smoke


def test_study_writes_report(tmp_path):
    s = StudySettings(staleness=[0, 2], estimators=["fkl_topk", "rkl_recompute"], seeds=1, steps=3,
                      batch_size=8, eval_every=3, eval_n=16, out=str(tmp_path))
    results = run_study(s)
    assert len(results) == 4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {(r["estimator"], r["staleness"]) for r in saved["runs"]} == {
        ("fkl_topk", 0), ("fkl_topk", 2), ("rkl_recompute", 0), ("rkl_recompute", 2)}
    for run in saved["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 3]
        assert run["curve"][-1]["sync_s"] >= run["curve"][-1]["async_s"] > 0
    assert "| fkl_topk |" in (tmp_path / "table.md").read_text()
    for name in ("accuracy_vs_steps.png", "accuracy_vs_time.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
