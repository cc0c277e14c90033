"""`opd tail`: print the samples a learner logs (prompt, completion, teacher id, reward).

    REDIS_URL=redis://127.0.0.1:6379/0 opd tail [--run RUN] [-n 10] [--follow]

Reads the run's capped `samples` stream (services/learner/samples.py; the learner writes a
few trained samples every `samples_every` steps): the last N entries, oldest first, then
with --follow each new one as it arrives, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

import redis

from shared.keys import Keys


def format_entry(fields: dict[bytes, bytes]) -> str:
    """One sample as two or three readable lines."""
    f = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
    teacher = f.get("teacher_id") or "-"
    head = f"step {f.get('step', '?')}  reward {f.get('reward', '?')}  teacher_id {teacher}  scored by {f.get('teacher', '?')}"
    return (f"{head}\n  prompt:     {f.get('prompt', '')!r}\n  completion: {f.get('completion', '')!r}"
            f"\n  answer:     {f.get('answer', '')!r}")


def last(client: redis.Redis, stream: str, n: int) -> list[tuple[bytes, dict]]:
    """The newest `n` entries, oldest first."""
    return list(reversed(client.xrevrange(stream, count=n))) if n > 0 else []


def follow(client: redis.Redis, stream: str, after: bytes) -> None:
    """Print entries newer than `after` as they arrive (blocks until interrupted)."""
    while True:
        for _, entries in client.xread({stream: after}, block=1000) or []:
            for entry_id, fields in entries:
                print(format_entry(fields), flush=True)
                after = entry_id


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="opd tail", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=os.environ.get("OPD_RUN", "default"), help="run name (env OPD_RUN)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="Redis URL (env REDIS_URL)")
    parser.add_argument("-n", type=int, default=10, help="how many of the newest samples to print first")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new samples")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    client = redis.Redis.from_url(args.redis_url)
    stream = Keys(args.run).samples
    entries = last(client, stream, args.n)
    if not entries and not args.follow:
        print(f"no samples yet in {stream} (the learner writes them every samples_every steps)", file=sys.stderr)
    for _, fields in entries:
        print(format_entry(fields), flush=True)
    if args.follow:
        try:
            follow(client, stream, entries[-1][0] if entries else b"$")
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
