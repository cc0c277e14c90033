"""Learner service entry point: `opd-learner [--flags]` or `python -m services.learner`.

Consumes scored trajectories, bounds staleness, steps AdamW on the configured OPD losses
and publishes each new weight version (see services/learner/worker.py).

    torchrun --nproc-per-node N -m services.learner [--flags]   # one learner on N devices
    opd-learner --procs N [--flags]                              # the same

Under torchrun rank 0 runs the service (Redis, HTTP, the loop) and the other ranks follow
its commands (services/learner/student.py). They ignore SIGTERM/SIGINT, which torchrun
forwards to every rank, so that rank 0's graceful stop (finish the step, checkpoint) still
has them; a rank that stops otherwise ends the learner (services/learner/distributed.py).
"""

from __future__ import annotations

import os

from services.learner.distributed import Ranks, abort, relaunch
from services.learner.settings import LearnerSettings
from shared.service import exit_process, run_service
from shared.settings import parse


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    settings = parse(LearnerSettings, args)
    if settings.procs > 1 and "WORLD_SIZE" not in os.environ:
        relaunch(settings.procs, args)
    ranks = Ranks.start(settings.device, settings.dist_timeout_s)
    try:
        if ranks.leader:
            from services.learner.worker import LearnerWorker

            run_service("learner", settings, lambda ctx: LearnerWorker(ctx, settings, ranks))
        else:
            follow(settings, ranks)
    except BaseException as error:
        if not ranks.distributed:
            raise
        abort(ranks, error)
    exit_process(0)  # a clean stop: skip native teardown (see exit_process)


def follow(settings: LearnerSettings, ranks: Ranks) -> None:
    """Ranks 1..N-1: build the student's shard and do rank 0's commands until it says stop."""
    import signal

    from services.learner.student import Student
    from shared.service import setup_logging

    setup_logging()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.gpu_memory_fraction > 0 and ranks.device.startswith("cuda"):
        import torch

        torch.cuda.set_per_process_memory_fraction(settings.gpu_memory_fraction, ranks.device)
    Student(settings, ranks).serve()


if __name__ == "__main__":
    main()
