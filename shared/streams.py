"""Redis streams transport: stream/key names, consumer groups, hand-off, reclaim, backpressure.

Each stage reads its input stream through a consumer group and hands results downstream
with `hand_off`, which writes the downstream entries and then acks+deletes the inputs in one
server-side Lua script: an input is never acked unless its outputs were written, and a
crash leaves it pending for `XAUTOCLAIM` by a live replica. Consumed entries are deleted, so a
stream holds only undelivered and pending entries; producers wait while the undelivered
backlog is at its bound (`wait_for_room`) instead of trimming unconsumed data.

All stream and key names live in `Keys` (shared/keys.py); every entry holds one msgpack message under field
`m` (see shared/wire.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from shared.keys import Keys

FIELD = b"m"
MOVE_CHUNK = 1000  # ids per hand-off script call
log = logging.getLogger("opd.streams")


# KEYS: downstream stream, source stream, produced-counts hash, this call's result key (a
# retry after a lost reply gets the first answer instead of "0 owned"). ARGV: group, consumer, E entries, F values per
# entry, maxlen of the downstream stream (0: none; the dead-letter stream is capped, work
# streams never are), E*F field/value items, then the source ids (E of them, paired with
# the entries, or any number when E = 0). An id is handled only while it is still pending for this
# consumer: if another replica reclaimed it (we were presumed dead), our late result is
# dropped instead of duplicated (fencing). Writes come before acks, and an error aborts the
# script before any ack (unlike MULTI/EXEC, which would ack after a failed XADD, e.g. OOM).
# The produced-counts hash counts, per downstream stream, every entry ever handed off.
_MOVE = """
local seen = redis.call('GET', KEYS[4])
if seen then return tonumber(seen) end
local e, f, maxlen = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local first = 6 + e * f
local owned = {}
for j = first, #ARGV do
  local p = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[j], ARGV[j], 1, ARGV[2])
  if #p > 0 then owned[#owned + 1] = ARGV[j] end
  if #p > 0 and e > 0 then
    local i = j - first
    if maxlen > 0 then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, 6 + i * f, 5 + (i + 1) * f))
    else
      redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6 + i * f, 5 + (i + 1) * f))
    end
  end
end
if e > 0 and #owned > 0 then
  redis.call('HINCRBY', KEYS[3], KEYS[1], #owned)
end
if #owned > 0 then
  redis.call('XACK', KEYS[2], ARGV[1], unpack(owned))
  redis.call('XDEL', KEYS[2], unpack(owned))
end
redis.call('SET', KEYS[4], #owned, 'EX', 600)
return #owned
"""


# Raw XAUTOCLAIM ... JUSTID (redis-py's parser drops the cursor): ownership moves to us
# without the payload and without raising the delivery counter.
_AUTOCLAIM_IDS = """
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
"""


# KEYS: stream. ARGV: group, consumer, ids. Resets the idle time of the ids still pending for
# this consumer (XCLAIM 0 JUSTID: no payload, no delivery count); ids another consumer has
# reclaimed meanwhile are left to it.
_RENEW = """
local n = 0
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""


@dataclass(frozen=True)
class DeadLetters:
    """Caps of the dead-letter stream, so bad input cannot grow Redis without bound: at most
    ~max_entries entries (oldest trimmed; the run's `produced` hash keeps the total count)
    holding at most max_payload_bytes of each original message."""

    max_entries: int = 10_000
    max_payload_bytes: int = 65_536


def produced_key(stream: str) -> str:
    """The run's `produced` hash, from any of its stream names (opd:<run>:<name>[:<teacher id>])."""
    return ":".join(stream.split(":", 2)[:2]) + ":produced"


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
        max_deliveries: int = 5,
        dead_stream: str | None = None,
        dead_letters: DeadLetters = DeadLetters(),
        on_poison: Callable[[Entry], None] = lambda entry: None,
    ) -> None:
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.reclaim_idle_ms, self.max_deliveries = reclaim_idle_ms, max_deliveries
        self.dead_stream = dead_stream or stream.rsplit(":", 1)[0] + ":dead"
        self.dead_letters, self.on_poison = dead_letters, on_poison
        self.held: set[bytes] = set()  # delivered to us, not yet acked: never reclaim our own
        self._cursor: bytes | str = "0-0"  # XAUTOCLAIM scan position
        self._min_idle_ms: int | None = None  # set by take_over_pending
        self._move_script = client.register_script(_MOVE)
        self._autoclaim_script = client.register_script(_AUTOCLAIM_IDS)
        self._renew_script = client.register_script(_RENEW)
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
        """Run a group command, recreating the group once if the stream was reset: NOGROUP, or
        UNBLOCKED when the stream was deleted under a blocking read (a learner --reset)."""
        try:
            return command(*args, **kwargs)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                raise
            ensure_group(self.client, self.stream, self.group)
            return command(*args, **kwargs)

    def reclaim(self, count: int) -> list[Entry]:
        """Entries left pending (idle > reclaim_idle_ms) by a dead or stuck consumer, scanning the
        pending list with a cursor. Ids are claimed first without payloads (JUSTID), so entries
        we hold ourselves are neither re-downloaded nor counted as redelivered; an entry already
        delivered max_deliveries times (it keeps killing its consumers) is dead-lettered."""
        taking_over = self._min_idle_ms is not None  # a restarted sole consumer: not a redelivery
        idle = self.reclaim_idle_ms if self._min_idle_ms is None else self._min_idle_ms
        cursor, ids, *rest = self._grouped(
            self._autoclaim_script, keys=[self.stream],
            args=[self.group, self.consumer, idle, self._cursor, count])
        self._cursor = cursor
        if rest and rest[0]:  # pending ids whose entries are gone (Redis >= 7): clear them
            self.client.xack(self.stream, self.group, *rest[0])
        if cursor in (b"0-0", "0-0"):
            self._min_idle_ms = None  # a full pass is done: back to normal reclaiming
        ids = [i for i in ids if i not in self.held]
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.xpending_range(self.stream, self.group, i, i, 1)
        delivered = {i: (p[0]["times_delivered"] if p else 0) for i, p in zip(ids, pipe.execute())}
        poison = [i for i in ids if self.max_deliveries > 0 and delivered[i] >= self.max_deliveries]
        healthy = [i for i in ids if i not in poison]
        for entry in self._read(poison):
            self._dead_letter_poison(entry, delivered[entry.id])
        if taking_over:  # ours already (JUSTID): read the payloads without counting a delivery
            entries = self._read(healthy)
        else:
            entries = _entries(self.client.xclaim(self.stream, self.group, self.consumer, 0, healthy)) if healthy else []
        gone = set(healthy) - {e.id for e in entries}  # deleted while pending (Redis 6.2 still lists them)
        if gone:
            self.client.xack(self.stream, self.group, *gone)
        return self._hold(entries)

    def _read(self, ids: list[bytes]) -> list[Entry]:
        """The entries of these ids (one round trip; deleted ones are missing), without claiming."""
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.xrange(self.stream, i, i)
        return _entries([e for found in pipe.execute() for e in found])

    def _dead_letter_poison(self, entry: Entry, delivered: int) -> None:
        reason = (f"delivered {delivered} times without being handed off (max_deliveries "
                  f"{self.max_deliveries}): it keeps failing or killing its consumers")
        if self.dead_letter(self.dead_stream, entry, reason):
            log.error("%s: dead-lettered poison entry %s: %s", self.stream, entry.id, reason)
            self.on_poison(entry)

    def renew(self, ids: Sequence[bytes]) -> int:
        """Renew this consumer's claim on entries it is still working on; returns how many it owns."""
        return int(self._renew_script(keys=[self.stream], args=[self.group, self.consumer, *ids])) if ids else 0

    @contextmanager
    def lease(self, ids: Sequence[bytes], every_s: float | None = None,
              alive: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """Keep renewing the claim on `ids` while the block runs (every reclaim_idle / 3 by
        default) and `alive()` holds (the service passes its health check, so a loop hung
        longer than its health window stops renewing), so a live replica whose batch
        outlasts reclaim_idle is never robbed; a dead or hung one's entries are reclaimed."""
        every = every_s if every_s is not None else max(0.05, self.reclaim_idle_ms / 3000)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(every):
                if not alive():  # hung (or Redis away): skip, renew again once healthy
                    continue
                try:
                    self.renew(list(ids))
                except redis.RedisError:  # best effort: the next renewal, or a reclaim, follows
                    log.warning("%s: lease renewal failed", self.stream)

        thread = threading.Thread(target=renew, name="lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

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
        cap = self.dead_letters
        payload = entry.payload[:cap.max_payload_bytes]
        fields = [FIELD, payload, b"reason", reason[:2000].encode(), b"source", self.stream.encode(),
                  b"id", entry.id, b"bytes", str(len(entry.payload)).encode()]
        return self._move(dead_stream, [fields], [entry.id], maxlen=cap.max_entries) == 1

    def _move(self, stream: str | None, entries: Sequence[list[bytes]], ids: Sequence[bytes],
              maxlen: int = 0) -> int:
        """Write entries (paired with ids) and ack+delete ids we still own; returns how many."""
        if entries and len(entries) != len(ids):
            raise ValueError("hand-off needs exactly one output per input id")
        owned = 0
        for start in range(0, len(ids), MOVE_CHUNK):  # Lua's unpack() takes ~8k values at most
            result = f"{self.stream}:moved:{uuid.uuid4().hex}"  # a retried call returns the first answer
            part = entries[start:start + MOVE_CHUNK]
            width = len(part[0]) if part else 0
            flat = [x for fields in part for x in fields]
            try:
                owned += self._move_script(
                    keys=[stream or self.stream, self.stream, produced_key(self.stream), result],
                    args=[self.group, self.consumer, len(part), width, maxlen, *flat, *ids[start:start + MOVE_CHUNK]])
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                log.warning("%s: the stream was reset (%s): nothing of ours is pending any more", self.stream, e)
        self.held.difference_update(ids)
        if owned < len(ids):
            log.warning("%s: %d of %d entries were reclaimed by another consumer; their results "
                        "were dropped", self.stream, len(ids) - owned, len(ids))
        return int(owned)

    def close(self) -> None:
        """Leave the group on a clean stop: delete this consumer's name unless it still owns
        pending entries (deleting it would drop them; a live replica reclaims them instead)."""
        try:
            mine = self.client.xpending_range(self.stream, self.group, "-", "+", 1, consumername=self.consumer)
            if not mine:
                self.client.xgroup_delconsumer(self.stream, self.group, self.consumer)
        except redis.ResponseError:  # the stream or group is gone (a --reset): nothing to leave
            pass

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
    stream: str | Callable[[], Sequence[str]],
    max_backlog: int,
    need: int = 1,
    *,
    stop: Callable[[], bool] = lambda: False,
    on_wait: Callable[[], None] = lambda: None,
    poll_s: float = 0.05,
) -> bool:
    """Backpressure: block until `stream` has room for `need` more entries (or, given a
    function naming streams, each of those it names at the time). False if stopped."""
    streams = (lambda: [stream]) if isinstance(stream, str) else stream
    while any(backlog(client, s) + need > max_backlog for s in streams()):
        if stop():
            return False
        on_wait()
        time.sleep(poll_s)
    return True


# KEYS: stream, dedup key, counter hash (may be unused). ARGV: counter field ("" for none),
# how much to add to it, then payloads. A call whose dedup key exists already ran (its reply
# was lost and the client retried): it writes nothing again.
_PRODUCE = """
if not redis.call('SET', KEYS[2], 1, 'NX', 'EX', 600) then return 0 end
for i = 3, #ARGV do redis.call('XADD', KEYS[1], '*', 'm', ARGV[i]) end
if ARGV[1] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[1], ARGV[2]) end
return #ARGV - 2
"""


def produce(client: redis.Redis, stream: str, payloads: Sequence[bytes], counter: str = "",
            count: int | None = None) -> int:
    """XADD payloads in one server-side script (no trimming: backpressure bounds the stream);
    returns how many were written. Idempotent: the call carries a unique token, so the
    client's retry after a lost reply writes nothing twice. `counter`: a field of the run's
    `produced` hash to add `count` (default len(payloads)) to in the same step (the feeder's
    position, which also counts rows it passed over)."""
    count = len(payloads) if count is None else count
    if not payloads and not (counter and count):
        return 0
    token = f"{stream}:dedup:{uuid.uuid4().hex}"
    script = client.register_script(_PRODUCE)
    return int(script(keys=[stream, token, produced_key(stream)], args=[counter, count, *payloads]))
