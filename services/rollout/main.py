"""Rollout service entry point: `opd-rollout [--flags]` or `python -m services.rollout`.

Reads prompts from Redis, samples completions with the newest published student weights,
and writes Trajectory messages (see services/rollout/worker.py).
"""

from __future__ import annotations

from services.rollout.settings import RolloutSettings
from shared.service import exit_process, run_service
from shared.settings import parse


def main(argv: list[str] | None = None) -> None:
    import sys

    settings = parse(RolloutSettings, sys.argv[1:] if argv is None else argv)
    from services.rollout.worker import RolloutWorker

    run_service("rollout", settings, lambda ctx: RolloutWorker(ctx, settings))
    exit_process(0)  # a clean stop: skip native teardown (see exit_process)


if __name__ == "__main__":
    main()
