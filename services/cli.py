"""`opd`: the project's command line.

    opd demo [--flags]        run the whole pipeline locally and print a summary (services/demo.py)
    opd eval --model PATH     exact-match accuracy of a checkpoint on a built-in task (--task addition|list)
    opd pretrain --out DIR    train the built-in tokenizer, teachers and student init (shared/pretrain.py)
    opd bench [what]          async vs sync throughput, codec, Redis, weight broadcast, memory, hooks (services/bench/)
    opd study staleness       estimators x staleness bounds on the built-in task (services/study.py)
    opd redis [--port --password --dir]   an embedded Redis server in the foreground (--help)
    opd audit --checkpoint-dir DIR        where every trajectory of a run ended up (services/audit.py)
    opd tail [--run RUN] [-n N] [--follow]   the learner's sampled completions (services/tail.py)
    opd rollout|teacher|learner [--flags]   run one service (same as opd-rollout, ...)
"""

from __future__ import annotations

import sys

COMMANDS = ("demo", "eval", "pretrain", "study", "bench", "redis", "audit", "tail", "rollout", "teacher", "learner")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "demo":
        _demo(rest)
    elif command == "eval":
        from shared.evaluate import main as eval_main

        eval_main(rest)
    elif command == "pretrain":
        from shared.pretrain import main as pretrain_main

        pretrain_main(rest)
    elif command == "bench":
        from services.bench.main import main as bench_main

        bench_main(rest)
    elif command == "study":
        from services.study import main as study_main

        study_main(rest)
    elif command == "audit":
        from services.audit import main as audit_main

        audit_main(rest)
    elif command == "tail":
        from services.tail import main as tail_main

        tail_main(rest)
    elif command == "redis":
        from shared.redis_server import main as redis_main

        redis_main(rest)
    else:
        import importlib

        importlib.import_module(f"services.{command}.main").main(rest)


def _demo(rest: list[str]) -> None:
    from pydantic_settings import CliApp

    from services.demo import DemoSettings, run_demo

    settings = CliApp.run(DemoSettings, cli_args=rest)
    try:
        run_demo(settings)
    except KeyboardInterrupt:
        print("\ninterrupted: services stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
