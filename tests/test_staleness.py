"""Staleness accounting at the learner."""

from services.learner.staleness import StalenessTracker


def test_admit_drops_and_counts_over_bound_and_foreign():
    t = StalenessTracker(max_staleness=2)
    assert t.admit(5, 5) and t.admit(5, 3)
    assert not t.admit(5, 2)  # staleness 3 > 2
    assert not t.admit(5, 6)  # from the future: not this run
    assert (t.dropped_stale, t.dropped_foreign) == (1, 1)


def test_record_builds_histogram_and_summary():
    t = StalenessTracker(max_staleness=4)
    for learner, traj in [(3, 3), (3, 2), (4, 2), (4, 2)]:
        t.record(learner, traj)
    s = t.summary()
    assert s["histogram"] == {"0": 1, "1": 1, "2": 2}
    assert s["trained"] == 4 and s["max"] == 2 and s["mean"] == 1.25


def test_lineage_keeps_versions_up_to_each_restore_point():
    from services.learner.staleness import Lineage

    lineage = Lineage()
    assert lineage.epoch == 0 and lineage.current(0, 7)
    assert lineage.restore(3) == 1  # the learner died at version 7 and resumed from checkpoint 3
    assert lineage.current(0, 3) and lineage.current(1, 5)  # same weights up to 3, then the new epoch's
    assert not lineage.current(0, 4) and not lineage.current(0, 7)  # numbers the new epoch reuses
    lineage.restore(5)
    assert lineage.current(1, 5) and not lineage.current(1, 6) and not lineage.current(0, 4)
    assert not lineage.current(3, 0)  # an epoch this learner never had


def test_lineage_names_the_restore_that_discarded_a_version():
    from services.learner.staleness import Lineage

    lineage = Lineage({0: 0, 1: 10, 2: 15})
    assert lineage.discarded_by(0, 12) == (1, 10)  # the first restore, not the latest one
    assert lineage.discarded_by(1, 16) == (2, 15) and lineage.discarded_by(1, 15) is None
    assert lineage.discarded_by(2, 40) is None


def test_staleness_buckets_give_exact_integer_quantiles():
    """Prometheus' histogram_quantile interpolates linearly inside the bucket the rank falls in;
    with bounds at k + 0.5 the rounded result is the true integer quantile."""
    import math

    from services.learner.staleness import STALENESS_BUCKETS

    def prometheus_quantile(q, values):
        bounds = list(STALENESS_BUCKETS) + [math.inf]
        counts = [sum(v <= b for v in values) for b in bounds]  # cumulative, like _bucket{le}
        rank = q * counts[-1]
        i = next(j for j, c in enumerate(counts) if c >= rank)
        lo, below = (0.0, 0) if i == 0 else (bounds[i - 1], counts[i - 1])
        return lo + (bounds[i] - lo) * (rank - below) / (counts[i] - below)

    for values in ([4] * 97 + [3] * 3, [0] * 10 + [1] * 5 + [4] * 85, [2, 3, 3, 5, 6, 6, 6]):
        for q in (0.05, 0.5, 0.95):
            true = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
            assert round(prometheus_quantile(q, values)) == true, (values, q)
