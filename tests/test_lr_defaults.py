"""Per-estimator learning-rate defaults: one table, applied by the learner, demo and study settings."""

from __future__ import annotations

import pytest

from services.learner.losses import ESTIMATORS
from services.learner.lr_defaults import INHERITS, SWEPT, default_lr, estimator_lr, resolve_lr


def test_every_estimator_has_a_default():
    assert set(SWEPT) | set(INHERITS) == set(ESTIMATORS)
    assert set(INHERITS.values()) <= set(SWEPT)
    for name in ESTIMATORS:
        assert estimator_lr(name) > 0


def test_several_estimators_take_the_smallest_active_default():
    mixed = {"fkl_topk": 1.0, "rkl_recompute": 0.5}
    assert default_lr(mixed) == min(SWEPT["fkl_topk"], SWEPT["rkl_recompute"])
    assert default_lr({"fkl_topk": 1.0, "rkl_recompute": 0.0}) == SWEPT["fkl_topk"]
    assert resolve_lr(0.123, mixed) == 0.123
    with pytest.raises(ValueError):
        default_lr({"fkl_topk": 0.0})
    with pytest.raises(ValueError):
        estimator_lr("no_such_estimator")


def test_settings_apply_the_defaults_unless_lr_is_given():
    from services.demo import DemoSettings
    from services.learner.settings import LearnerSettings
    from services.study import StudySettings, variant_lr

    assert LearnerSettings().lr == SWEPT["fkl_topk"]
    assert LearnerSettings(losses={"rkl_mc": 1.0}).lr == SWEPT["rkl_mc"]
    assert LearnerSettings(losses={"rkl_mc": 1.0}, lr=0.5).lr == 0.5
    assert DemoSettings(losses={"rkl_stale": 1.0}).lr == SWEPT["rkl_stale"]
    assert DemoSettings(lr=2e-3).lr == 2e-3
    s = StudySettings(lrs={"rkl_stale": 7e-5})
    assert variant_lr(s, "fkl_topk", {}) == SWEPT["fkl_topk"]
    assert variant_lr(s, "rkl_stale+ppo_clip", {}) == 7e-5  # a variant takes its base's rate
    assert variant_lr(s, "rkl_stale+ppo_clip", {"rkl_stale": 3e-4}) == 3e-4  # sweep winner first
    assert variant_lr(StudySettings(lr=1e-2), "rkl_mc", {}) == 1e-2
