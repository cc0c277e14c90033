"""Teacher pools of a multi-teacher run: who is up, what waits for whom, and which are down.

A prompt's `teacher_id` routes its trajectory to stream `trajectories:<teacher_id>` (the
default teacher, id "", reads `trajectories`), which only that teacher's pool consumes
(`opd-teacher --teacher-id ID`). The learner surveys the pools about once a second
(`Survey.poll`) over every teacher id it knows of: its data's, every trajectories stream's
that was ever written, and every teacher replica's. A replica is live while its status
report in the run's `replicas` hash keeps changing (judged on the learner's own clock,
so clock skew between hosts does not matter) and says it is healthy; a pool's `queued` is
the length of its stream (undelivered + pending). A pool is **down** when it has work
queued and no live replica, and **set aside** when it is down while another pool has a
live replica (otherwise nothing can progress and the usual backpressure holds everything).
`publish` writes the survey to the run's `teachers` hash, and the trajectories parked at
set-aside pools (at most `(max_staleness + 1) x batch_size`) to the run's `parked` key,
which expires within seconds unless the learner keeps refreshing it:

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
from dataclasses import asdict, dataclass, field

import redis

from shared.keys import Keys

PARKED_TTL_S = 5  # the parked count lapses this long after the learner's last survey


@dataclass(frozen=True)
class PoolStatus:
    replicas: int  # live teacher replicas started with this teacher id
    queued: int  # entries in its trajectories stream: not yet delivered + delivered, unscored
    down: bool  # work queued and nobody alive to score it


@dataclass
class Survey:
    """The learner's view of the pools; remembers when each replica's report last changed."""

    client: redis.Redis
    keys: Keys
    teacher_ids: list[str]
    live_after_s: float
    changed: dict[str, tuple[str, float]] = field(default_factory=dict)  # replica -> (report, when)

    def live_replicas(self, now: float | None = None) -> dict[str, int]:
        """Live teacher replicas per teacher id (every teacher id a replica reports, even 0)."""
        now = time.monotonic() if now is None else now
        counts: dict[str, int] = {}
        for name, raw in self.client.hgetall(self.keys.replicas).items():
            status = json.loads(raw)
            if status.get("service") != "teacher":
                continue
            tid = str(status.get("teacher_id", ""))
            counts.setdefault(tid, 0)
            if self.changed.get(name, (None,))[0] != raw:
                self.changed[name] = (raw, now)
            fresh = now - self.changed[name][1] <= self.live_after_s
            if fresh and status.get("healthy", True) and status.get("state") != "failed":
                counts[tid] += 1
        return counts

    def ids(self, live: dict[str, int]) -> list[str]:
        """The data's teacher ids, those of every trajectories stream ever written and every replica's."""
        prefix = len(self.keys.trajectories) + 1
        streamed = {s[prefix:] for s in self.keys.trajectory_streams(self.client)[1:]}
        return sorted({*self.teacher_ids, *streamed, *live})

    def poll(self, now: float | None = None) -> dict[str, PoolStatus]:
        """Each known teacher id's pool: live replicas, queued entries, down or not."""
        live = self.live_replicas(now)
        ids = self.ids(live)
        pipe = self.client.pipeline(transaction=False)
        for tid in ids:
            pipe.xlen(self.keys.trajectories_for(tid))
        queued = [int(q) for q in pipe.execute()]
        return {tid: PoolStatus(live.get(tid, 0), q, live.get(tid, 0) == 0 and q > 0) for tid, q in zip(ids, queued)}


def set_aside(pools: dict[str, PoolStatus]) -> set[str]:
    """Down pools while another pool has a live replica (else none: everything waits)."""
    if not any(p.replicas for p in pools.values()):
        return set()
    return {tid for tid, p in pools.items() if p.down}


def parked(pools: dict[str, PoolStatus], cap: int) -> int:
    """Trajectories waiting at set-aside pools, at most `cap`."""
    aside = set_aside(pools)
    return min(cap, sum(p.queued for tid, p in pools.items() if tid in aside))


def publish(client: redis.Redis, keys: Keys, pools: dict[str, PoolStatus], cap: int) -> None:
    """The survey for rollouts and dashboards, and the parked count for admission control."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.teachers)
    if pools:
        pipe.hset(keys.teachers, mapping={tid: json.dumps(asdict(p)) for tid, p in pools.items()})
    pipe.set(keys.parked, parked(pools, cap), ex=PARKED_TTL_S)
    pipe.execute()


def withdraw(client: redis.Redis, keys: Keys) -> None:
    """The learner stops surveying: no pool set aside, nothing parked."""
    client.delete(keys.teachers, keys.parked)


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
