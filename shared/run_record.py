"""The run's record in Redis: the run-wide invariants every service must agree on.

Fields (ints): `top_k` (the teacher cache width, after capping at the vocabulary) and
`draws` (teacher draws per position, 0 = none), written by teachers; `mc_samples` (tokens
recorded per position, 1 = no MC arrays), written by rollouts. Each field is set once
(HSETNX) by the first replica that claims it; a replica whose own setting disagrees
stops with a clear error instead of producing messages the learner cannot batch.
Replicas claim before every hand-off, so the record is restored after a learner `--reset`
cleared the run. The learner checks every scored message against the record (never
against whichever message it happened to decode first) and dead-letters what disagrees.

    from shared.run_record import claim, read
    claim(client, keys, {"top_k": 64, "draws": 0})
"""

from __future__ import annotations

import redis

from shared.keys import Keys


class RunMismatch(RuntimeError):
    """This replica's settings disagree with what the run's record says."""


def claim(client: redis.Redis, keys: Keys, fields: dict[str, int]) -> None:
    """Write fields the record lacks and check the rest; RunMismatch if any differs."""
    pipe = client.pipeline(transaction=True)
    for name, value in fields.items():
        pipe.hsetnx(keys.record, name, int(value))
    pipe.hmget(keys.record, list(fields))
    current = pipe.execute()[-1]
    wrong = {n: int(c) for (n, v), c in zip(fields.items(), current) if c is not None and int(c) != int(v)}
    if wrong:
        mine = {n: fields[n] for n in wrong}
        raise RunMismatch(f"run {keys.run!r} uses {wrong}, this replica is configured with {mine}: "
                          "every replica of a run must use the same settings (or start a new run)")


def read(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """The record as {field: int}; fields nobody claimed yet are absent."""
    return {k.decode(): int(v) for k, v in client.hgetall(keys.record).items()}
