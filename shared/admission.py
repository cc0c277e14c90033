"""Staleness admission control (AReaL style): do not start work the learner would find too stale.

Trajectory number j (in admission order) is consumed around learner step j // B, so a
rollout that generates with the newest weights v may start it only while
`admitted + n <= (v + max_staleness + 1) * B`. The check-and-increment is one Lua script,
atomic across any number of rollout replicas. B and max_staleness are the learner's: it
writes them to the run's `limits` hash at start, so replicas cannot disagree with it.
Grants not used (fewer prompts were available) and trajectories the learner drops are
released so the budget does not leak. With max_staleness = 0 this is strict synchronous
training: B trajectories per version, generated only after the previous step published.
"""

from __future__ import annotations

import redis

from shared.streams import Keys

_ADMIT = """
local version = tonumber(redis.call('GET', KEYS[2]) or '-1')
local batch = tonumber(redis.call('HGET', KEYS[3], 'batch_size') or '0')
if version < 0 or batch < 1 then return {0, version} end
local stale = tonumber(redis.call('HGET', KEYS[3], 'max_staleness') or '0')
local admitted = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[1]), (version + stale + 1) * batch - admitted)
if grant <= 0 then return {0, version} end
redis.call('INCRBY', KEYS[1], grant)
return {grant, version}
"""


class Admission:
    """Client side of admission control, shared by all rollout replicas of a run."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys
        self._script = client.register_script(_ADMIT)

    def request(self, want: int) -> tuple[int, int]:
        """Try to admit up to `want` trajectories; returns (granted, learner version)."""
        granted, version = self._script(
            keys=[self.keys.admitted, self.keys.version, self.keys.limits], args=[want]
        )
        return int(granted), int(version)

    def release(self, n: int) -> None:
        """Give back admissions that will never produce a trainable trajectory."""
        if n > 0:
            self.client.decrby(self.keys.admitted, n)


def set_limits(client: redis.Redis, keys: Keys, batch_size: int, max_staleness: int,
               reset: bool = True) -> None:
    """Learner start: the bounds every replica admits against; a new run (reset) has
    admitted nothing yet, a resumed one keeps its count."""
    if batch_size < 1 or max_staleness < 0:
        raise ValueError("batch_size must be >= 1 and max_staleness >= 0")
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.limits, mapping={"batch_size": batch_size, "max_staleness": max_staleness})
    if reset:
        pipe.set(keys.admitted, 0)
    pipe.execute()
