"""Staleness admission control (AReaL style): do not start work the learner would find too stale.

Trajectory number j (in admission order) is consumed around learner step j // B, so a
rollout that generates with the newest weights v may start it only while
`admitted + n <= (v + max_staleness + 1) * B + parked`, where `parked` counts trajectories
waiting at teacher pools that are down (shared/teacher_pools.py: a dead pool must not
starve the others of slots). The check-and-increment is one Lua script,
atomic across any number of rollout replicas. B and max_staleness are the learner's: it
writes them to the run's `limits` hash at start, so replicas cannot disagree with it.
Grants not used (fewer prompts were available) and trajectories the learner drops are
released so the budget does not leak. With max_staleness = 0 this is strict synchronous
training: B trajectories per version, generated only after the previous step published.

Every mutation is safe to retry after a lost reply (the services' client retries on
connection errors, and the server may have run the command): grants and releases carry a
unique id whose first outcome is remembered for 10 minutes; token operations are set
operations.

Admission tokens: a rollout holds one token per admitted prompt (its prompt id, in the
run's `admission_tokens` set) before handing off its trajectory. Downstream, a trajectory
gives its slot back only by removing its token (one script: SREM, then DECRBY what was
removed), so a slot is released at most once, and messages that were never admitted
(injected garbage, a duplicate) release nothing. The learner consumes tokens of what it
trained once a checkpoint covers them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import redis

from shared.keys import Keys
from shared.streams import Entry

# KEYS: admitted, version, limits, this request's key, parked. A request id seen before (the client
# retried after a lost reply) gets its first answer back and changes nothing.
_ADMIT = """
local version = tonumber(redis.call('GET', KEYS[2]) or '-1')
local seen = redis.call('GET', KEYS[4])
if seen then return {tonumber(seen), version} end
local batch = tonumber(redis.call('HGET', KEYS[3], 'batch_size') or '0')
local grant = 0
if version >= 0 and batch >= 1 then
  local stale = tonumber(redis.call('HGET', KEYS[3], 'max_staleness') or '0')
  local admitted = tonumber(redis.call('GET', KEYS[1]) or '0')
  local parked = tonumber(redis.call('GET', KEYS[5]) or '0')
  grant = math.max(0, math.min(tonumber(ARGV[1]), (version + stale + 1) * batch + parked - admitted))
end
if grant > 0 then  -- a retried zero grant took nothing: it may be answered afresh
  redis.call('SET', KEYS[4], grant, 'EX', 600)
  redis.call('INCRBY', KEYS[1], grant)
end
return {grant, version}
"""

# KEYS: admitted, this release's key. Applied once per release id.
_RELEASE = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', 600) then redis.call('DECRBY', KEYS[1], ARGV[1]) end
return 0
"""


_RELEASE_TOKENS = """
local n = 0
for i = 1, #ARGV do n = n + redis.call('SREM', KEYS[2], ARGV[i]) end
if n > 0 then redis.call('DECRBY', KEYS[1], n) end
return n
"""


class Admission:
    """Client side of admission control, shared by all rollout replicas of a run."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys
        self._script = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)
        self._release_tokens = client.register_script(_RELEASE_TOKENS)

    def request(self, want: int) -> tuple[int, int]:
        """Try to admit up to `want` trajectories; returns (granted, learner version)."""
        request = f"{self.keys.admitted}:request:{uuid.uuid4().hex}"  # retries re-send the same id
        granted, version = self._script(
            keys=[self.keys.admitted, self.keys.version, self.keys.limits, request, self.keys.parked], args=[want]
        )
        return int(granted), int(version)

    def release(self, n: int) -> None:
        """Give back slots of this replica's own grant that produced nothing (unused, or
        prompts it could not use): rollouts only."""
        if n > 0:
            release = f"{self.keys.admitted}:release:{uuid.uuid4().hex}"
            self._release(keys=[self.keys.admitted, release], args=[n])

    def hold(self, tokens: list[str]) -> None:
        """Rollout: the prompts of this grant (or reclaimed ones) now have a slot each."""
        if tokens:
            self.client.sadd(self.keys.admission_tokens, *tokens)

    def release_tokens(self, tokens: list[str]) -> int:
        """Give back the slots of trajectories that will never be trained; each token once,
        tokens not held (never admitted, already released) give back nothing."""
        return int(self._release_tokens(keys=[self.keys.admitted, self.keys.admission_tokens],
                                        args=tokens)) if tokens else 0

    def consume(self, tokens: list[str]) -> None:
        """Learner: these trained trajectories keep their slots for good (checkpointed)."""
        if tokens:
            self.client.srem(self.keys.admission_tokens, *tokens)


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


def token_of(msg: object) -> str:
    """The admission token a Trajectory or ScoredTrajectory carries: its prompt's id."""
    return getattr(msg, "trajectory", msg).prompt.prompt_id  # type: ignore[attr-defined]


def release_poison(admission: Admission, expect: type) -> Callable[[Entry], None]:
    """on_poison callback for downstream stages: a dead-lettered poison entry gives back its
    slot if it decodes to an admitted trajectory (garbage gives back nothing)."""
    from shared.wire import WireError, decode

    def release(entry: Entry) -> None:
        try:
            msg = decode(entry.payload, expect)
        except WireError:
            return
        admission.release_tokens([token_of(msg)])
    return release
