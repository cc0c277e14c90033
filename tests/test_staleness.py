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
