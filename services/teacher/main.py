"""Teacher service entry point: `opd-teacher [--flags]` or `python -m services.teacher`.

Reads Trajectory messages, scores them with the teacher model and writes ScoredTrajectory
messages (see services/teacher/worker.py).
"""

from __future__ import annotations

from services.teacher.settings import TeacherSettings
from shared.service import exit_process, run_service
from shared.settings import parse


def main(argv: list[str] | None = None) -> None:
    import sys

    settings = parse(TeacherSettings, sys.argv[1:] if argv is None else argv)
    from services.teacher.worker import TeacherWorker

    run_service("teacher", settings, lambda ctx: TeacherWorker(ctx, settings))
    exit_process(0)  # a clean stop: skip native teardown (see exit_process)


if __name__ == "__main__":
    main()
