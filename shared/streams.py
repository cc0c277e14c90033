"""Redis streams transport: stream/key names, consumer groups, hand-off, reclaim, backpressure.

Each stage reads its input stream through a consumer group and hands results downstream
with `hand_off`, which writes the downstream entries and then acks+deletes the inputs in one
server-side Lua script: an input is never acked unless its outputs were written, and a
crash leaves it pending for `XAUTOCLAIM` by a live replica. Consumed entries are deleted, so a
stream holds only undelivered and pending entries; producers wait while the undelivered
backlog is at its bound (`wait_for_room`) instead of trimming unconsumed data.

All stream and key names live in `Keys`; every entry holds one msgpack message under field
`m` (see shared/wire.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

FIELD = b"m"
MOVE_CHUNK = 1000  # ids per hand-off script call
log = logging.getLogger("opd.streams")


@dataclass(frozen=True)
class Keys:
    """Every Redis stream and key of one run, namespaced by the run name."""

    run: str

    def _k(self, name: str) -> str:
        return f"opd:{self.run}:{name}"

    @property
    def prompts(self) -> str:
        """Stream: Prompt messages, feeder -> rollout."""
        return self._k("prompts")

    @property
    def trajectories(self) -> str:
        """Stream: Trajectory messages, rollout -> teacher."""
        return self._k("trajectories")

    @property
    def scored(self) -> str:
        """Stream: ScoredTrajectory messages, teacher -> learner."""
        return self._k("scored")

    @property
    def dead(self) -> str:
        """Stream: entries that failed validation, with the reason (fields m, reason, source)."""
        return self._k("dead")

    @property
    def weights(self) -> str:
        """Key: the newest WeightAnnouncement (msgpack)."""
        return self._k("weights")

    @property
    def versions(self) -> str:
        """Stream: one entry per published version (a wake-up signal, capped in length)."""
        return self._k("versions")

    @property
    def version(self) -> str:
        """Key: the learner's current weight version (int), read by admission control."""
        return self._k("version")

    @property
    def admitted(self) -> str:
        """Key: trajectories admitted for generation so far (int), see shared/admission.py."""
        return self._k("admitted")

    @property
    def limits(self) -> str:
        """Hash: batch_size and max_staleness, written by the learner, read by admission."""
        return self._k("limits")

    @property
    def replicas(self) -> str:
        """Hash: replica name -> JSON status (service, busy_s, items, tokens, version, at)."""
        return self._k("replicas")

    @property
    def produced(self) -> str:
        """Hash: downstream stream -> entries ever handed off to it (audit counts)."""
        return self._k("produced")

    @property
    def stats(self) -> str:
        """Hash: learner progress and run summary (step, consumed, staleness counts...)."""
        return self._k("stats")

    def all(self) -> list[str]:
        return [
            self.prompts, self.trajectories, self.scored, self.dead,
            self.weights, self.versions, self.version, self.admitted, self.limits, self.replicas, self.produced, self.stats,
        ]


GROUPS = {"prompts": "rollout", "trajectories": "teacher", "scored": "learner"}

# KEYS: downstream stream, source stream, produced-counts hash. ARGV: group, consumer, E entries, F values per
# entry, E*F field/value items, then the source ids (E of them, paired with the entries, or
# any number when E = 0). An id is handled only while it is still pending for this
# consumer: if another replica reclaimed it (we were presumed dead), our late result is
# dropped instead of duplicated (fencing). Writes come before acks, and an error aborts the
# script before any ack (unlike MULTI/EXEC, which would ack after a failed XADD, e.g. OOM).
# The produced-counts hash counts, per downstream stream, every entry ever handed off.
_MOVE = """
local e, f = tonumber(ARGV[3]), tonumber(ARGV[4])
local first = 5 + e * f
local owned = {}
for j = first, #ARGV do
  local p = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[j], ARGV[j], 1, ARGV[2])
  if #p > 0 then owned[#owned + 1] = ARGV[j] end
  if #p > 0 and e > 0 then
    local i = j - first
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5 + i * f, 4 + (i + 1) * f))
  end
end
if e > 0 and #owned > 0 then
  redis.call('HINCRBY', KEYS[3], KEYS[1], #owned)
end
if #owned > 0 then
  redis.call('XACK', KEYS[2], ARGV[1], unpack(owned))
  redis.call('XDEL', KEYS[2], unpack(owned))
end
return #owned
"""


def _produced_key(stream: str) -> str:
    """The run's `produced` hash, from any of its stream names (opd:<run>:<name>)."""
    return stream.rsplit(":", 1)[0] + ":produced"


def connect(url: str) -> redis.Redis:
    """Client that retries with exponential backoff across connection drops and restarts."""
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=20),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
    )


def wait_for_redis(client: redis.Redis, timeout_s: float = 30.0) -> None:
    """Block until the server answers PING; raise the last error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass(frozen=True)
class Entry:
    """One stream entry: its id and the raw message bytes (undecoded)."""

    id: bytes
    payload: bytes


class StreamConsumer:
    """A consumer in a consumer group: reclaims stuck entries first, then reads new ones."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        reclaim_idle_ms: int = 60_000,
    ) -> None:
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.reclaim_idle_ms = reclaim_idle_ms
        self.held: set[bytes] = set()  # delivered to us, not yet acked: never reclaim our own
        self._cursor: bytes | str = "0-0"  # XAUTOCLAIM scan position
        self._min_idle_ms: int | None = None  # set by take_over_pending
        self._move_script = client.register_script(_MOVE)
        ensure_group(client, stream, group)

    def read(self, count: int, block_ms: int = 1000) -> list[Entry]:
        """Up to `count` entries: reclaimed ones (idle > reclaim_idle_ms) before new ones."""
        entries = self.reclaim(count)
        if len(entries) < count:
            entries += self.read_new(count - len(entries), None if entries else block_ms)
        return entries

    def take_over_pending(self) -> None:
        """Let the next reads claim every pending entry whatever its idle time: a restarted
        sole consumer (the learner) taking over its predecessor's unfinished work."""
        self._min_idle_ms = 0

    def read_new(self, count: int, block_ms: int | None = 1000) -> list[Entry]:
        """Up to `count` never-delivered entries, blocking up to `block_ms` for the first."""
        reply = self._grouped(
            self.client.xreadgroup,
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms,
        )
        return self._hold(_entries(reply[0][1] if reply else []))

    def _hold(self, entries: list[Entry]) -> list[Entry]:
        self.held.update(e.id for e in entries)
        return entries

    def _grouped(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a group command, recreating the group once if the stream was reset (NOGROUP)."""
        try:
            return command(*args, **kwargs)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            ensure_group(self.client, self.stream, self.group)
            return command(*args, **kwargs)

    def reclaim(self, count: int) -> list[Entry]:
        """XAUTOCLAIM entries left pending by a dead (or stuck) consumer, scanning the
        pending list with a cursor so entries we hold ourselves never crowd others out."""
        idle = self.reclaim_idle_ms if self._min_idle_ms is None else self._min_idle_ms
        cursor, claimed, *rest = self._grouped(
            self.client.xautoclaim,
            self.stream, self.group, self.consumer, idle, self._cursor, count=count,
        )
        deleted = rest[0] if rest else []  # Redis >= 7 also reports deleted ids
        self._cursor = cursor
        if deleted:  # pending ids whose entries are gone: nothing to process, clear them
            self.client.xack(self.stream, self.group, *deleted)
        if cursor in (b"0-0", "0-0"):
            self._min_idle_ms = None  # a full pass is done: back to normal reclaiming
        return self._hold([e for e in _entries(claimed) if e.id not in self.held])

    def ack(self, ids: Sequence[bytes]) -> int:
        """Ack and delete consumed entries we still own; returns how many."""
        return self._move(None, [], ids)

    def hand_off(self, ids: Sequence[bytes], stream: str, payloads: Sequence[bytes]) -> int:
        """Write payloads[i] to `stream` and ack+delete ids[i], in one server-side script: if
        a write fails the script stops before the ack, so inputs are never lost."""
        return self._move(stream, [[FIELD, p] for p in payloads], ids)

    def dead_letter(self, dead_stream: str, entry: Entry, reason: str) -> bool:
        """Move an entry to the dead-letter stream with its reason, and ack it; False if
        another consumer had reclaimed it meanwhile (then it is theirs to handle)."""
        fields = [FIELD, entry.payload, b"reason", reason[:2000].encode(),
                  b"source", self.stream.encode(), b"id", entry.id]
        return self._move(dead_stream, [fields], [entry.id]) == 1

    def _move(self, stream: str | None, entries: Sequence[list[bytes]], ids: Sequence[bytes]) -> int:
        """Write entries (paired with ids) and ack+delete ids we still own; returns how many."""
        if entries and len(entries) != len(ids):
            raise ValueError("hand-off needs exactly one output per input id")
        owned = 0
        for start in range(0, len(ids), MOVE_CHUNK):  # Lua's unpack() takes ~8k values at most
            part = entries[start:start + MOVE_CHUNK]
            width = len(part[0]) if part else 0
            flat = [x for fields in part for x in fields]
            owned += self._move_script(
                keys=[stream or self.stream, self.stream, _produced_key(self.stream)],
                args=[self.group, self.consumer, len(part), width, *flat, *ids[start:start + MOVE_CHUNK]])
        self.held.difference_update(ids)
        if owned < len(ids):
            log.warning("%s: %d of %d entries were reclaimed by another consumer; their results "
                        "were dropped", self.stream, len(ids) - owned, len(ids))
        return int(owned)

    def pending(self) -> int:
        """Entries delivered to this group and not yet acked."""
        return int(self.client.xpending(self.stream, self.group)["pending"])


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing; reading starts at the beginning."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def _entries(raw: list) -> list[Entry]:
    out = []
    for entry_id, fields in raw:
        if fields is None:  # deleted while pending (older Redis reports it like this)
            continue
        out.append(Entry(entry_id, fields.get(FIELD, b"")))
    return out


def read_stats(client: redis.Redis, keys: Keys) -> dict[str, str]:
    """The learner's progress/summary hash, decoded."""
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.stats).items()}


def backlog(client: redis.Redis, stream: str) -> int:
    """Entries not yet delivered to the stream's (single) consumer group: the queue waiting
    for a consumer. Acked entries are deleted, so length = undelivered + pending."""
    pipe = client.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)
    try:
        length, groups = pipe.execute()
    except redis.ResponseError:  # no such stream yet
        return 0
    return int(length) - sum(int(g["pending"]) for g in groups)


def wait_for_room(
    client: redis.Redis,
    stream: str,
    max_backlog: int,
    need: int = 1,
    *,
    stop: Callable[[], bool] = lambda: False,
    on_wait: Callable[[], None] = lambda: None,
    poll_s: float = 0.05,
) -> bool:
    """Backpressure: block until `stream` has room for `need` more entries. False if stopped."""
    while backlog(client, stream) + need > max_backlog:
        if stop():
            return False
        on_wait()
        time.sleep(poll_s)
    return True


def produce(client: redis.Redis, stream: str, payloads: Sequence[bytes]) -> list[bytes]:
    """XADD payloads in one round trip (no trimming: backpressure bounds the stream)."""
    pipe = client.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(stream, {FIELD: payload})
    return pipe.execute()
