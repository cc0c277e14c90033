"""Learner checkpoints restore model and AdamW state exactly, without pickle."""

from __future__ import annotations

import torch

from services.learner import checkpoint


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train(model, opt, steps: int) -> None:
    for i in range(steps):
        loss = model(torch.full((2, 4), float(i))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resumed_training_matches_uninterrupted(tmp_path):
    model, opt = make()
    train(model, opt, 3)
    checkpoint.save(tmp_path, 3, model, opt, {"consumed": ["a", "b"], "stats": {"n": 1}})
    train(model, opt, 2)  # uninterrupted reference

    other, other_opt = make()
    state = checkpoint.load(checkpoint.latest(tmp_path), other, other_opt)
    assert state["version"] == 3 and state["consumed"] == ["a", "b"] and state["stats"] == {"n": 1}
    train(other, other_opt, 2)
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_latest_skips_partial_and_prunes_old(tmp_path):
    model, opt = make()
    train(model, opt, 1)
    for v in (1, 2, 3):
        checkpoint.save(tmp_path, v, model, opt, {}, keep=2)
    (tmp_path / "step-000009.tmp").mkdir()  # a crash mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003", "step-000009.tmp"]
    assert checkpoint.latest(tmp_path).name == "step-000003"
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_atomic_dir_makes_the_rename_durable(tmp_path, monkeypatch):
    """Files, the filled directory and, after the rename, its parent are fsynced in that order."""
    import os

    from shared import weights

    events: list[tuple[str, str]] = []
    real_open, real_replace = os.open, os.replace
    monkeypatch.setattr(weights.os, "open", lambda p, flags: events.append(("fsync-dir", str(p))) or real_open(p, flags))
    monkeypatch.setattr(weights.os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    final = tmp_path / "v000001"
    with weights.atomic_dir(final) as tmp:
        (tmp / "f").write_bytes(b"x")
    assert events == [("fsync-dir", str(tmp_path / "v000001.tmp")), ("rename", str(final)),
                      ("fsync-dir", str(tmp_path))]
    assert (final / "f").read_bytes() == b"x"


def test_pruning_spares_versions_a_slow_reader_may_still_load(tmp_path):
    import os
    import time

    from shared.weights import prune_versions, version_dir

    for v in range(5):
        version_dir(tmp_path, v).mkdir()
    old = time.time() - 120
    for v in (0, 1):
        os.utime(version_dir(tmp_path, v), (old, old))
    prune_versions(tmp_path, keep=2, newest=4, min_age_s=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000002", "v000003", "v000004"]  # v2: too recent
    prune_versions(tmp_path, keep=2, newest=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000003", "v000004"]
