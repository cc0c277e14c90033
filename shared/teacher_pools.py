"""Teacher pools of a multi-teacher run: who is up, what waits for whom, and which are down.

A prompt's `teacher_id` routes its trajectory to stream `trajectories:<teacher_id>` (the
default teacher, id "", reads `trajectories`), which only that teacher's pool consumes
(`opd-teacher --teacher-id ID`). The learner surveys the pools about once a second
(`survey`): live replicas per id (a teacher replica whose status report in the run's
`replicas` hash is younger than `live_after_s`) and entries queued in its stream
(undelivered + pending). A pool is **down** when it has work queued and no live replica,
and **set aside** when it is down while another pool is not (when every pool is down
nothing can progress, and the usual backpressure holds everything). `publish` writes the
survey to the run's `teachers` hash and the number of trajectories parked at set-aside
pools to the `limits` hash:

* admission control (shared/admission.py) does not count parked trajectories against the
  staleness budget, so the other pools' work keeps flowing (a dead pool stalls only its
  share); they are still queued, visible in opd_teacher_queue_depth, and scored when the
  pool is back (the learner then drops what is too stale, with the reason);
* the prompt feeder skips rows of a set-aside pool (counted), and rollouts apply
  backpressure only to the streams of pools that are not set aside; so a dead pool's
  stream grows at most by its prompts already queued.

    from shared.teacher_pools import read
    read(client, keys)  # {'addition': PoolStatus(replicas=2, queued=17, down=False), ...}
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import redis

from shared.keys import Keys


@dataclass(frozen=True)
class PoolStatus:
    replicas: int  # live teacher replicas started with this teacher id
    queued: int  # entries in its trajectories stream: not yet delivered + delivered, unscored
    down: bool  # work queued and nobody alive to score it


def live_replicas(client: redis.Redis, keys: Keys, live_after_s: float, now: float | None = None) -> dict[str, int]:
    """Live teacher replicas per teacher id, from the replicas' status reports."""
    now = time.time() if now is None else now
    counts: dict[str, int] = {}
    for raw in client.hvals(keys.replicas):
        status = json.loads(raw)
        if status.get("service") != "teacher" or status.get("state") == "failed":
            continue
        if now - float(status.get("at", 0.0)) <= live_after_s:
            tid = str(status.get("teacher_id", ""))
            counts[tid] = counts.get(tid, 0) + 1
    return counts


def survey(client: redis.Redis, keys: Keys, teacher_ids: list[str], live_after_s: float,
           now: float | None = None) -> dict[str, PoolStatus]:
    """Each teacher id's pool: live replicas, queued entries, down or not."""
    live = live_replicas(client, keys, live_after_s, now)
    pipe = client.pipeline(transaction=False)
    for tid in teacher_ids:
        pipe.xlen(keys.trajectories_for(tid))
    queued = pipe.execute()
    return {tid: PoolStatus(live.get(tid, 0), int(q), live.get(tid, 0) == 0 and int(q) > 0)
            for tid, q in zip(teacher_ids, queued)}


def set_aside(pools: dict[str, PoolStatus]) -> set[str]:
    """Down pools while at least one pool is not down (all down: none, so all wait)."""
    down = {tid for tid, p in pools.items() if p.down}
    return down if len(down) < len(pools) else set()


def parked(pools: dict[str, PoolStatus]) -> int:
    """Trajectories waiting at set-aside pools."""
    aside = set_aside(pools)
    return sum(p.queued for tid, p in pools.items() if tid in aside)


def publish(client: redis.Redis, keys: Keys, pools: dict[str, PoolStatus]) -> None:
    """The survey for rollouts and dashboards, and the parked count for admission control."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.teachers)
    if pools:
        pipe.hset(keys.teachers, mapping={tid: json.dumps(asdict(p)) for tid, p in pools.items()})
    pipe.hset(keys.limits, "parked", parked(pools))
    pipe.execute()


def read(client: redis.Redis, keys: Keys) -> dict[str, PoolStatus]:
    """The learner's last survey (empty before the learner's first)."""
    return {k.decode(): PoolStatus(**json.loads(v)) for k, v in client.hgetall(keys.teachers).items()}


def open_streams(keys: Keys, pools: dict[str, PoolStatus]) -> list[str]:
    """The trajectories streams backpressure applies to: every pool's that is not set aside
    (the default stream when the learner has not surveyed yet)."""
    if not pools:
        return [keys.trajectories]
    aside = set_aside(pools)
    return [keys.trajectories_for(tid) for tid in sorted(pools) if tid not in aside]
