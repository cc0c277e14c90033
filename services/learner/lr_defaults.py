"""Per-estimator default learning rates: the one table the learner, `opd demo` and `opd study` use.

When a run does not set `lr`, each estimator's documented default applies (docs/losses.md,
"Learning-rate defaults", with the multi-seed sweep that chose them: reports/staleness/).
Estimators the sweep did not cover inherit the rate of the swept estimator of their family
(`INHERITS`). A run with several estimators takes the smallest default among those with a
non-zero weight: the most fragile estimator bounds the step size (the sampled reverse-KL
estimators collapse at rates the forward-KL ones need).

    python -m services.learner.lr_defaults            # print the table
"""

from __future__ import annotations

from collections.abc import Mapping

SWEPT: dict[str, float] = {
    "fkl_topk": 3e-3,
    "rkl_stale": 1e-4,
    "rkl_recompute": 3e-4,
    "rkl_mc": 3e-4,
}
"""Chosen by the staleness-0 sweep: best mean final accuracy over 2 seeds, 400 steps x 64."""

INHERITS: dict[str, str] = {
    "fkl_topk_renorm": "fkl_topk",
    "fkl_topk_tail": "fkl_topk",
    "rkl_support": "fkl_topk",  # exact on the cache, no sampling noise
    "fkl_teacher_sampled": "fkl_topk",  # forward KL on teacher draws
    "jsd": "fkl_topk",
    "skew_fkl": "fkl_topk",
    "skew_rkl": "fkl_topk",
}
"""Estimators not swept, and the swept one whose rate they take."""


def estimator_lr(name: str) -> float:
    """The default learning rate of one estimator."""
    if name in SWEPT:
        return SWEPT[name]
    if name in INHERITS:
        return SWEPT[INHERITS[name]]
    raise ValueError(f"no default learning rate for estimator {name!r}")


def default_lr(losses: Mapping[str, float]) -> float:
    """The default rate of a weighted set of estimators: the smallest among those weighted != 0."""
    active = [name for name, weight in losses.items() if weight != 0]
    if not active:
        raise ValueError("no estimator with a non-zero weight")
    return min(estimator_lr(name) for name in active)


def resolve_lr(lr: float | None, losses: Mapping[str, float]) -> float:
    """`lr` when given, else the estimators' default."""
    return default_lr(losses) if lr is None else lr


if __name__ == "__main__":
    for est in [*SWEPT, *INHERITS]:
        src = "swept" if est in SWEPT else f"as {INHERITS[est]}"
        print(f"{est:<22} {estimator_lr(est):.0e}  ({src})")
