"""Learner service entry point: `opd-learner [--flags]` or `python -m services.learner`.

Consumes scored trajectories, bounds staleness, steps AdamW on the configured OPD losses
and publishes each new weight version (see services/learner/worker.py).
"""

from __future__ import annotations

from services.learner.settings import LearnerSettings
from shared.service import exit_process, run_service
from shared.settings import parse


def main(argv: list[str] | None = None) -> None:
    import sys

    settings = parse(LearnerSettings, sys.argv[1:] if argv is None else argv)
    from services.learner.worker import LearnerWorker

    run_service("learner", settings, lambda ctx: LearnerWorker(ctx, settings))
    exit_process(0)  # a clean stop: skip native teardown (see exit_process)


if __name__ == "__main__":
    main()
