"""Codec and Redis-stream throughput for scored trajectories with a teacher top-k cache.

A synthetic batch of B ScoredTrajectory messages (T positions, top-k K, N MC samples):
encode + decode (with full validation) in GB/s of encoded bytes, and the same messages
through a real Redis stream (XADD, XREADGROUP, ack+delete) in messages/s and MB/s.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from shared.wire import Prompt, ScoredTrajectory, TeacherScores, Trajectory, decode, encode, tail_mass


def scored_batch(b: int, t: int, k: int, n: int = 1, prompt_len: int = 32, vocab: int = 32000) -> list[ScoredTrajectory]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(b):
        comp = rng.integers(0, vocab, t).astype(np.int32)
        mc = None if n < 2 else np.concatenate([comp[:, None], rng.integers(0, vocab, (t, n - 1))], 1).astype(np.int32)
        mc_lp = None if mc is None else -rng.random((t, n)).astype(np.float32)
        traj = Trajectory(f"t{i}", Prompt(f"p{i}", rng.integers(0, vocab, prompt_len).astype(np.int32), "", 3),
                          comp, -rng.random(t).astype(np.float32), np.full(t, 3, np.int32), mc, mc_lp)
        probs = rng.dirichlet(np.ones(k + 1), t)[:, :k]  # a real top-k: sorted, mass <= 1, its tail
        lp = np.sort(np.log(probs), axis=1)[:, ::-1].astype(np.float32)
        tail = tail_mass(lp)
        scores = TeacherScores(rng.integers(0, vocab, (t, k)).astype(np.int32), lp, tail,
                               -rng.random(t).astype(np.float32),
                               None if mc is None else -rng.random((t, n)).astype(np.float32))
        out.append(ScoredTrajectory(traj, scores))
    return out


def bench_codec(msgs: list[ScoredTrajectory], repeats: int = 20) -> dict[str, Any]:
    """Best-of-`repeats` encode and decode times for the whole batch."""
    enc_s = dec_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        payloads = [encode(m) for m in msgs]
        t1 = time.perf_counter()
        for p in payloads:
            decode(p, ScoredTrajectory)
        t2 = time.perf_counter()
        enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
    nbytes = sum(len(p) for p in payloads)
    return {"messages": len(msgs), "bytes": nbytes, "encode_s": enc_s, "decode_s": dec_s,
            "encode_gbps": nbytes / enc_s / 1e9, "decode_gbps": nbytes / dec_s / 1e9,
            "roundtrip_gbps": nbytes / (enc_s + dec_s) / 1e9}


def bench_redis(url: str, payloads: list[bytes], rounds: int = 3) -> dict[str, Any]:
    """Produce the payloads in one pipeline, consume them through a group, ack+delete."""
    from shared.streams import StreamConsumer, produce
    from shared.redis_client import connect

    client = connect(url)
    stream = "opd:bench:codec"
    client.delete(stream)
    consumer = StreamConsumer(client, stream, "bench", "c0")
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        produce(client, stream, payloads)
        got = 0
        while got < len(payloads):
            entries = consumer.read_new(256, block_ms=1000)
            consumer.ack([e.id for e in entries])
            got += len(entries)
        best = min(best, time.perf_counter() - t0)
    client.delete(stream)
    nbytes = sum(len(p) for p in payloads)
    return {"messages": len(payloads), "seconds": best, "msgs_per_s": len(payloads) / best,
            "mb_per_s": nbytes / best / 1e6}


def run(url: str, b: int = 64, t: int = 512, k: int = 64) -> dict[str, Any]:
    msgs = scored_batch(b, t, k)
    codec = bench_codec(msgs)
    redis_stats = bench_redis(url, [encode(m) for m in msgs])
    return {"shape": {"B": b, "T": t, "K": k}, "codec": codec, "redis": redis_stats}
