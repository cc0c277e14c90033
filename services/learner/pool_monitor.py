"""The learner's watch over the teacher pools: survey once a second, publish, export.

A daemon thread (beside the prompt feeder) that runs shared/teacher_pools.py's survey
over every teacher id it knows of (the data's, every trajectories stream's, every teacher
replica's), publishes it (the `teachers` hash for rollouts, `parked` for admission
control; both withdrawn when it stops) and exports per teacher id:

* `opd_teacher_replicas{teacher_id}`: live replicas of its pool;
* `opd_teacher_queue_depth{teacher_id}`: trajectories waiting in its stream (undelivered +
  pending): a trajectory for a teacher with no live replica stays here, never lost;
* `opd_teacher_down{teacher_id}`: 1 while work is queued and no replica is alive;
* `opd_prompts_skipped_total{teacher_id}`: prompt rows the feeder passed over while it was down.

The default teacher (id "") is labelled `default`. A pool going down or coming back is logged.
"""

from __future__ import annotations

import logging
import threading

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge

from shared import teacher_pools
from shared.keys import Keys

log = logging.getLogger("opd.learner")


def label(teacher_id: str) -> str:
    """The metric label of a teacher id ("" is the default pool)."""
    return teacher_id or "default"


class PoolMonitor:
    def __init__(self, client: redis.Redis, keys: Keys, teacher_ids: list[str], registry: CollectorRegistry,
                 lab: dict[str, str], live_after_s: float, park_cap: int = 0, every_s: float = 1.0) -> None:
        """`park_cap`: at most this many trajectories parked ((max_staleness + 1) x batch_size)."""
        self.client, self.keys, self.park_cap, self.every_s = client, keys, park_cap, every_s
        self.survey = teacher_pools.Survey(client, keys, sorted(set(teacher_ids)), live_after_s)
        names = [*lab, "teacher_id"]
        self.replicas = Gauge("opd_teacher_replicas", "Live replicas of each teacher pool", names, registry=registry)
        self.queued = Gauge("opd_teacher_queue_depth", "Trajectories waiting for each teacher pool",
                            names, registry=registry)
        self.down_gauge = Gauge("opd_teacher_down", "1 while a teacher pool has work queued and no live replica",
                                names, registry=registry)
        self.skipped = Counter("opd_prompts_skipped", "Prompt rows passed over while their teacher pool was down",
                               names, registry=registry)
        self.lab = lab
        self.pools: dict[str, teacher_pools.PoolStatus] = {}
        self.aside: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pool-monitor", daemon=True)

    def start(self) -> PoolMonitor:
        self.poll()
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        try:
            teacher_pools.withdraw(self.client, self.keys)
        except redis.RedisError as e:  # the parked count lapses on its own within seconds
            log.warning("could not withdraw the teacher pool survey: %s", e)

    def down(self, teacher_id: str) -> bool:
        """Whether the feeder should skip this teacher's prompts for now (set aside: down
        while another pool is not)."""
        return teacher_id in self.aside

    def count_skipped(self, teacher_id: str) -> None:
        self.skipped.labels(**self.lab, teacher_id=label(teacher_id)).inc()

    def poll(self) -> None:
        pools = self.survey.poll()
        teacher_pools.publish(self.client, self.keys, pools, self.park_cap)
        for tid, pool in pools.items():
            was = self.pools.get(tid)
            if pool.down and not (was and was.down):
                log.warning("teacher pool %r is down: %d trajectories queued, no live replica; while "
                            "another pool is up its prompts are skipped, until a replica with "
                            "--teacher-id %s is up%s", label(tid), pool.queued, tid or '""',
                            "" if tid in self.survey.teacher_ids else " (not a teacher id of this run's data)")
            elif was and was.down and not pool.down:
                log.info("teacher pool %r is back: %d replicas", label(tid), pool.replicas)
            lab = {**self.lab, "teacher_id": label(tid)}
            self.replicas.labels(**lab).set(pool.replicas)
            self.queued.labels(**lab).set(pool.queued)
            self.down_gauge.labels(**lab).set(int(pool.down))
            self.skipped.labels(**lab)  # exported as 0 from the start
        self.pools, self.aside = pools, teacher_pools.set_aside(pools)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.poll()
            except redis.RedisError as e:  # the learner's own loop surfaces Redis trouble
                log.warning("teacher pool survey failed: %s", e)
