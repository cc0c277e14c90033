"""`opd audit`: where every trajectory of a run ended up, from Redis and the learner's checkpoint.

    REDIS_URL=redis://:PASSWORD@host:6379/0 OPD_RUN=default \\
        opd audit --checkpoint-dir /outputs/default/checkpoints [--batch-size 64]

Each trajectory the rollouts handed off (the run's produced counter) is exactly one of:
trained (the newest checkpoint's count: what the learner trained and will never train
again), dropped for staleness or a foreign lineage, abandoned by a learner's rollback (its
prompt re-queued), or still queued (every teacher's trajectories stream + the scored stream). A trajectory trained
twice would be counted twice on the right-hand side, one lost on neither: both break the
identity. Invalid messages dead-lettered with their reason are counted apart. Prints the
table and exits 1 when the identity does not hold, when the learner's published counter
disagrees with its checkpoint, or, with --batch-size, when version x batch size differs
from the trained count. Stop the producers and then the learner first (a clean stop
checkpoints everything trained) for exact numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
import redis

from shared.keys import Keys


def accounting(client: redis.Redis, keys: Keys, trained: int) -> dict[str, int]:
    """The outcome counts, given how many trajectories the learner's checkpoint says it trained."""
    reasons = [f[b"reason"] for _, f in client.xrange(keys.dead)]
    dropped = sum(r.startswith(b"dropped") for r in reasons)
    abandoned = sum(r.startswith(b"abandoned") for r in reasons)
    streams = keys.trajectory_streams(client)  # the default teacher's and each teacher id's
    return {"trajectories_produced": sum(int(client.hget(keys.produced, s) or 0) for s in streams),
            "trained": trained, "dropped_stale_or_foreign": dropped,
            "abandoned_by_rollback": abandoned, "invalid_dead_letters": len(reasons) - dropped - abandoned,
            "still_queued": sum(client.xlen(s) for s in streams) + client.xlen(keys.scored)}


def balanced(outcome: dict[str, int]) -> bool:
    """produced = trained + dropped + abandoned + still queued."""
    return outcome["trajectories_produced"] == (outcome["trained"] + outcome["dropped_stale_or_foreign"]
                                                + outcome["abandoned_by_rollback"] + outcome["still_queued"])


def audit(client: redis.Redis, keys: Keys, checkpoint_dir: str | Path,
          batch_size: int | None = None) -> tuple[dict[str, int], list[str]]:
    """The outcome counts plus the learner's own, and the list of violated checks."""
    from services.learner.checkpoint import latest

    newest = latest(checkpoint_dir)
    if newest is None:
        raise SystemExit(f"opd audit: no checkpoint in {checkpoint_dir}")
    state = json.loads((newest / "state.json").read_text())
    trained = sum(state["tracker"]["trained"].values())  # staleness histogram of every trained trajectory
    stats = {k.decode(): v.decode() for k, v in client.hgetall(keys.stats).items()}
    report = {**accounting(client, keys, trained), "checkpoint_version": int(state["version"]),
              "recent_ids_kept": len(state["consumed"]),  # the dedup window, not all of them
              "duplicate_deliveries_skipped": int(state["stats"].get("duplicates", 0))}
    problems = []
    if not balanced(report):
        problems.append("produced != trained + dropped + abandoned + still queued")
    if int(stats.get("step", -1)) == report["checkpoint_version"] and \
            int(stats.get("trained_trajectories", -1)) != trained:
        problems.append(f"the learner reports {stats.get('trained_trajectories')} trained, its checkpoint {trained}")
    if batch_size and report["checkpoint_version"] * batch_size != trained:
        problems.append(f"version x batch size = {report['checkpoint_version'] * batch_size} trajectories, "
                        f"but {trained} trained")
    return report, problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opd audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", required=True, help="the learner's --checkpoint-dir")
    parser.add_argument("--batch-size", type=int, default=None, help="the learner's batch size (extra check)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    from shared.redis_client import connect

    client = connect(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    report, problems = audit(client, Keys(os.environ.get("OPD_RUN", "default")), args.checkpoint_dir,
                             args.batch_size)
    if args.json:
        print(json.dumps({**report, "problems": problems}))
    else:
        for name, value in report.items():
            print(f"{name:<30} {value:>10}")
        print("OK: every trajectory accounted for once" if not problems else
              "\n".join(f"FAIL: {p}" for p in problems))
    sys.exit(1 if problems else 0)
