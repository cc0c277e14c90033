"""Redis-side facts for the dashboard: memory in use, and each run stream's length and
entries ever added (so the dead-letter stream's depth and rate are visible even though
the stream is capped).

Read by every service's Redis probe (shared/service.py, every 2 s) into
`opd_redis_memory_bytes`, `opd_stream_length{stream}` and
`opd_stream_entries_added{stream}`; the dashboard takes the max over replicas, so the
numbers stay visible while any one service is up. One pipelined round trip per probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from shared.keys import Keys


@dataclass(frozen=True)
class StreamStats:
    length: int
    entries_added: int  # XINFO STREAM's entries-added: never decreases, trimming included


@dataclass(frozen=True)
class RedisStats:
    used_memory_bytes: int
    streams: dict[str, StreamStats]  # short name (prompts, trajectories[:<teacher id>], scored, dead) -> stats


def run_streams(keys: Keys, teacher_streams: list[str] | None = None) -> dict[str, str]:
    """The run's streams by the short name the metrics use (each teacher id's trajectories
    stream as `trajectories:<id>`)."""
    named = {s.split(":", 2)[-1]: s for s in teacher_streams or [] if s != keys.trajectories}
    return {"prompts": keys.prompts, "trajectories": keys.trajectories, **named, "scored": keys.scored,
            "dead": keys.dead}


def read_redis_stats(client: redis.Redis, keys: Keys) -> RedisStats:
    """Memory and per-stream stats; a stream that does not exist (yet) reads as empty."""
    streams = run_streams(keys, keys.trajectory_streams(client))
    pipe = client.pipeline(transaction=False)
    pipe.info("memory")
    for key in streams.values():
        pipe.xinfo_stream(key)
    memory, *infos = pipe.execute(raise_on_error=False)
    if isinstance(memory, Exception):
        raise memory
    stats = {}
    for name, info in zip(streams, infos):
        if isinstance(info, redis.ResponseError):  # "no such key": not created yet
            stats[name] = StreamStats(0, 0)
        elif isinstance(info, Exception):
            raise info
        else:
            stats[name] = StreamStats(int(info["length"]), int(info.get("entries-added", info["length"])))
    return RedisStats(int(memory["used_memory"]), stats)
