"""Redis streams transport against a real server: hand-off, reclaim after a consumer dies,
backpressure, dead letters, admission control."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from shared.admission import Admission, set_limits
from shared.streams import StreamConsumer, backlog, produce, wait_for_room

pytestmark = pytest.mark.redis


def test_hand_off_writes_downstream_then_acks(client, keys):
    produce(client, keys.prompts, [b"a", b"b", b"c"])
    c = StreamConsumer(client, keys.prompts, "rollout", "r0")
    entries = c.read(10, block_ms=100)
    assert [e.payload for e in entries] == [b"a", b"b", b"c"]
    assert c.pending() == 3
    c.hand_off([e.id for e in entries], keys.trajectories, [b"A", b"B", b"C"])
    assert c.pending() == 0 and backlog(client, keys.prompts) == 0
    down = StreamConsumer(client, keys.trajectories, "teacher", "t0").read(10, block_ms=100)
    assert [e.payload for e in down] == [b"A", b"B", b"C"]


def test_failed_hand_off_leaves_input_pending(client, keys):
    produce(client, keys.prompts, [b"a"])
    c = StreamConsumer(client, keys.prompts, "rollout", "r0")
    entries = c.read(1, block_ms=100)
    client.set(keys.trajectories, "not a stream")  # XADD inside the transaction fails
    with pytest.raises(Exception):
        c.hand_off([entries[0].id], keys.trajectories, [b"A"])
    assert c.pending() == 1  # nothing acked: the prompt is not lost


CHILD = """
import os, sys
from shared.streams import StreamConsumer
from shared.redis_client import connect
c = StreamConsumer(connect(sys.argv[1]), sys.argv[2], "teacher", "doomed")
got = c.read(2, block_ms=2000)
print(len(got), flush=True)
import time; time.sleep(60)  # killed here, holding 2 unacked entries
"""


def test_entries_of_a_killed_consumer_are_reclaimed(client, keys, redis_server):
    produce(client, keys.trajectories, [b"1", b"2", b"3"])
    proc = subprocess.Popen([sys.executable, "-c", CHILD, redis_server.url, keys.trajectories],
                            stdout=subprocess.PIPE, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == b"2"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    live = StreamConsumer(client, keys.trajectories, "teacher", "live", reclaim_idle_ms=200)
    (third,) = live.read(5, block_ms=100)  # the new entry; 1 and 2 are not idle long enough yet
    assert third.payload == b"3"
    time.sleep(0.3)
    reclaimed = live.read(5, block_ms=100)  # our own in-progress entry 3 is not re-delivered
    assert sorted(e.payload for e in reclaimed) == [b"1", b"2"]
    live.ack([e.id for e in reclaimed])
    pending = client.xpending_range(keys.trajectories, "teacher", "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(third.id, b"live")]


def test_backpressure_blocks_producer_without_trimming(client, keys):
    produce(client, keys.scored, [b"x"] * 4)
    released = threading.Event()

    def producer():
        assert wait_for_room(client, keys.scored, max_backlog=4, need=1, poll_s=0.01)
        produce(client, keys.scored, [b"y"])
        released.set()

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.2)
    assert not released.is_set() and backlog(client, keys.scored) == 4  # blocked, nothing dropped
    c = StreamConsumer(client, keys.scored, "learner", "l0")
    c.ack([c.read(1, block_ms=100)[0].id])
    t.join(timeout=5)
    assert released.is_set() and backlog(client, keys.scored) == 4
    assert [e.payload for e in c.read(10, block_ms=100)] == [b"x", b"x", b"x", b"y"]


def test_wait_for_room_stops_when_asked(client, keys):
    produce(client, keys.scored, [b"x"] * 2)
    assert wait_for_room(client, keys.scored, 2, stop=lambda: True) is False


def test_dead_letter_keeps_payload_and_reason(client, keys):
    produce(client, keys.scored, [b"junk"])
    c = StreamConsumer(client, keys.scored, "learner", "l0")
    entry = c.read(1, block_ms=100)[0]
    c.dead_letter(keys.dead, entry, "not valid msgpack")
    assert c.pending() == 0
    (_, fields), = client.xrange(keys.dead)
    assert fields[b"m"] == b"junk" and fields[b"reason"] == b"not valid msgpack"
    assert fields[b"source"] == keys.scored.encode()


def test_consumer_recovers_when_stream_is_reset(client, keys):
    c = StreamConsumer(client, keys.prompts, "rollout", "r0")
    client.delete(keys.prompts)  # a fresh learner wiped the run
    produce(client, keys.prompts, [b"p"])
    assert [e.payload for e in c.read(1, block_ms=100)] == [b"p"]


def test_admission_bounds_work_by_staleness(client, keys):
    adm = Admission(client, keys)
    assert adm.request(5) == (0, -1)  # no weights published yet
    set_limits(client, keys, batch_size=4, max_staleness=1)
    client.set(keys.version, 0)
    assert adm.request(5) == (5, 0)
    assert adm.request(5) == (3, 0)  # cap (0 + 1 + 1) * 4 = 8
    assert adm.request(5) == (0, 0)
    adm.release(2)  # e.g. fewer prompts were available
    assert adm.request(5) == (2, 0)
    client.set(keys.version, 1)
    assert adm.request(10) == (4, 1)


def test_sync_admission_is_one_batch_per_version(client, keys):
    adm = Admission(client, keys)
    set_limits(client, keys, batch_size=4, max_staleness=0)
    client.set(keys.version, 3)
    client.set(keys.admitted, 12)  # versions 0..2 consumed
    assert adm.request(8) == (4, 3)
    assert adm.request(8) == (0, 3)


def test_late_hand_off_of_a_reclaimed_entry_is_fenced(client, keys):
    """A slow consumer whose entry was reclaimed must not write a duplicate downstream."""
    produce(client, keys.trajectories, [b"t"])
    slow = StreamConsumer(client, keys.trajectories, "teacher", "slow", reclaim_idle_ms=100)
    (entry,) = slow.read(1, block_ms=100)
    time.sleep(0.2)
    fast = StreamConsumer(client, keys.trajectories, "teacher", "fast", reclaim_idle_ms=100)
    (again,) = fast.read(1, block_ms=100)
    assert again.id == entry.id
    assert fast.hand_off([again.id], keys.scored, [b"scored-by-fast"]) == 1
    assert slow.hand_off([entry.id], keys.scored, [b"scored-by-slow"]) == 0
    assert [f[b"m"] for _, f in client.xrange(keys.scored)] == [b"scored-by-fast"]
    assert client.xpending(keys.trajectories, "teacher")["pending"] == 0


def test_backlog_counts_only_undelivered_entries(client, keys):
    produce(client, keys.scored, [b"a", b"b", b"c"])
    c = StreamConsumer(client, keys.scored, "learner", "l0")
    assert backlog(client, keys.scored) == 3
    c.read(2, block_ms=100)  # being worked on: pending, not backlog
    assert backlog(client, keys.scored) == 1
    assert backlog(client, "opd:nope:scored") == 0


def test_hand_offs_are_counted_per_downstream_stream(client, keys):
    produce(client, keys.prompts, [b"a", b"b"])
    c = StreamConsumer(client, keys.prompts, "rollout", "r0")
    entries = c.read(2, block_ms=100)
    c.hand_off([e.id for e in entries], keys.trajectories, [b"A", b"B"])
    assert int(client.hget(keys.produced, keys.trajectories)) == 2


def test_large_acks_and_hand_offs_are_chunked(client, keys):
    """More ids than Lua's unpack() takes (~8k) in one call: all moved, none left pending."""
    n = 9000
    produce(client, keys.scored, [b"x"] * n)
    c = StreamConsumer(client, keys.scored, "learner", "l0")
    entries = c.read(n, block_ms=100)
    assert len(entries) == n
    assert c.ack([e.id for e in entries]) == n
    assert c.pending() == 0 and client.xlen(keys.scored) == 0


def test_an_entry_that_keeps_killing_consumers_is_dead_lettered(client, keys):
    """Each "crash" is a consumer that took the entry and vanished; after max_deliveries
    deliveries the next reclaim dead-letters it with the reason instead of handing it out."""
    produce(client, keys.trajectories, [b"poison", b"fine"])
    poisoned = []
    first = StreamConsumer(client, keys.trajectories, "teacher", "c0", reclaim_idle_ms=0, max_deliveries=3)
    assert len(first.read(2, block_ms=100)) == 2  # delivery 1 of both, then c0 dies
    handed = 0
    for n in range(1, 5):
        c = StreamConsumer(client, keys.trajectories, "teacher", f"c{n}", reclaim_idle_ms=0,
                           max_deliveries=3, on_poison=poisoned.append)
        got = c.reclaim(10)
        fine = [e for e in got if e.payload == b"fine"]
        if fine and n == 1:  # the healthy entry is handed off by the first replica that reclaims it
            handed += c.hand_off([fine[0].id], keys.scored, [b"F"])
    dead = client.xrange(keys.dead)
    assert handed == 1 and len(dead) == 1 and [e.payload for e in poisoned] == [b"poison"]
    fields = dead[0][1]
    assert fields[b"m"] == b"poison" and b"delivered 3 times" in fields[b"reason"]
    assert client.xlen(keys.trajectories) == 0  # nothing left to crash on


def test_reclaiming_our_own_held_entries_neither_downloads_nor_counts(client, keys):
    produce(client, keys.scored, [b"x" * 1000] * 4)
    c = StreamConsumer(client, keys.scored, "learner", "l0", reclaim_idle_ms=0)
    assert len(c.read(4, block_ms=100)) == 4
    for _ in range(3):
        assert c.reclaim(10) == []  # ours: skipped without taking the payloads again
    counts = [p["times_delivered"] for p in client.xpending_range(keys.scored, "learner", "-", "+", 10)]
    assert counts == [1, 1, 1, 1]


def test_dead_letter_stream_is_capped_in_length_and_payload(client, keys):
    from shared.streams import DeadLetters, Entry

    c = StreamConsumer(client, keys.prompts, "rollout", "r0", dead_letters=DeadLetters(max_entries=5,
                                                                                       max_payload_bytes=8))
    produce(client, keys.prompts, [b"y" * 100] * 300)
    entries = c.read(300, block_ms=100)
    for e in entries:
        assert c.dead_letter(keys.dead, Entry(e.id, e.payload), "bad")
    assert client.xlen(keys.dead) < 300 and client.xlen(keys.dead) >= 5  # trimmed (approximately)
    last = client.xrange(keys.dead)[-1][1]
    assert last[b"m"] == b"y" * 8 and last[b"bytes"] == b"100"
    assert int(client.hget(keys.produced, keys.dead)) == 300  # the total survives the trimming


def test_admission_tokens_release_each_slot_once_and_never_for_strangers(client, keys):
    adm = Admission(client, keys)
    set_limits(client, keys, batch_size=4, max_staleness=0)
    client.set(keys.version, 0)
    assert adm.request(4)[0] == 4
    adm.hold(["p0", "p1", "p2", "p3"])
    assert adm.release_tokens(["garbage", "other"]) == 0  # never admitted: no slot comes back
    assert adm.release_tokens(["p1", "p1"]) == 1 and adm.release_tokens(["p1"]) == 0  # once
    adm.consume(["p0", "p2"])  # trained: the slots stay taken
    assert adm.release_tokens(["p0", "p2"]) == 0
    assert int(client.get(keys.admitted)) == 3 and client.smembers(keys.admission_tokens) == {b"p3"}


def test_a_blocking_read_survives_the_stream_being_deleted(client, keys):
    """A learner --reset deletes the streams while replicas block in XREADGROUP (UNBLOCKED)."""
    c = StreamConsumer(client, keys.trajectories, "teacher", "t0")
    got = []
    reader = threading.Thread(target=lambda: got.append(c.read_new(1, block_ms=3000)))
    reader.start()
    time.sleep(0.3)
    client.delete(keys.trajectories)
    time.sleep(0.2)
    produce(client, keys.trajectories, [b"after reset"])
    reader.join(10)
    assert not reader.is_alive() and [e.payload for e in got[0]] == [b"after reset"]


def test_admission_and_produce_are_idempotent_under_lost_replies(client, keys, lossy):
    """The server runs each command, the reply is lost, the client retries: nothing twice."""
    from shared.redis_client import connect

    via = connect(lossy.url())
    adm = Admission(via, keys)
    set_limits(client, keys, batch_size=4, max_staleness=0)
    client.set(keys.version, 0)
    lossy.arm(keys.limits.encode())  # the admission script names the limits key
    assert adm.request(2)[0] == 2
    assert int(client.get(keys.admitted)) == 2  # granted once, not 4 (a later wedge at S = 0)
    lossy.arm(b":release:")
    adm.release(1)
    assert int(client.get(keys.admitted)) == 1
    lossy.arm(b":dedup:")
    assert produce(via, keys.prompts, [b"a", b"b", b"c"], counter="fed") in (0, 3)  # 0: the retry's answer
    assert [f[b"m"] for _, f in client.xrange(keys.prompts)] == [b"a", b"b", b"c"]  # 3 entries, not 6
    assert int(client.hget(keys.produced, "fed")) == 3
    assert lossy.dropped == 3  # each reply really was lost


def test_a_live_replica_slower_than_the_reclaim_time_keeps_its_work(client, keys):
    produce(client, keys.trajectories, [b"1", b"2"])
    slow = StreamConsumer(client, keys.trajectories, "teacher", "slow", reclaim_idle_ms=300)
    idle = StreamConsumer(client, keys.trajectories, "teacher", "idle", reclaim_idle_ms=300)
    entries = slow.read(2, block_ms=100)
    robbed = []
    with slow.lease([e.id for e in entries], every_s=0.1):
        deadline = time.monotonic() + 1.5  # five reclaim times of "work"
        while time.monotonic() < deadline:
            robbed += idle.reclaim(10)
            time.sleep(0.05)
    assert robbed == []
    assert slow.hand_off([e.id for e in entries], keys.scored, [b"A", b"B"]) == 2  # not fenced
    produce(client, keys.trajectories, [b"3"])
    dead = StreamConsumer(client, keys.trajectories, "teacher", "dead", reclaim_idle_ms=300)
    assert len(dead.read(1, block_ms=100)) == 1  # ... and then stops renewing (it died)
    time.sleep(0.4)
    assert [e.payload for e in idle.reclaim(10)] == [b"3"]


def test_a_cleanly_stopped_consumer_leaves_its_group_unless_it_owns_entries(client, keys):
    produce(client, keys.prompts, [b"a"])
    busy = StreamConsumer(client, keys.prompts, "rollout", "busy")
    assert len(busy.read(1, block_ms=100)) == 1
    done = StreamConsumer(client, keys.prompts, "rollout", "done")
    done.close()
    busy.close()  # still owns "a": its name stays so the entry is reclaimed, not dropped
    names = {c["name"] for c in client.xinfo_consumers(keys.prompts, "rollout")}
    assert names == {b"busy"} and busy.pending() == 1


def test_weight_lag_does_not_compare_two_machines_clocks(client, keys):
    from shared.weights import announce, latest, weight_lag

    skew = 1000.0  # the learner's clock runs 1000 s ahead of this (rollout) machine's
    real_time = time.time
    try:
        time.time = lambda: real_time() + skew
        announce(client, keys, 1, "/w/v000001", step_finished_at=real_time() + skew - 0.5)
    finally:
        time.time = real_time
    lag = weight_lag(client, latest(client, keys))
    assert 0.5 <= lag < 1.5  # 0.5 s of saving on the learner + the moments since, not -1000 s


def test_a_resumed_feeder_does_not_feed_prompts_twice(client, keys):
    """A learner checkpointed after 8 prompts, fed 16 more, died: its successor resumes at 24."""
    import itertools

    from services.learner.feeder import PromptFeeder, builtin_problems, resume_position
    from shared.models import load_tokenizer
    from shared.wire import Prompt, decode

    tok = load_tokenizer("builtin:student")
    first = PromptFeeder(client, keys.prompts, tok, builtin_problems(0), backlog=24, version=lambda: 0).start()
    deadline = time.monotonic() + 10
    while client.xlen(keys.prompts) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.close()
    assert first.fed == 24
    fed = resume_position(client, keys.produced, checkpointed=8)
    assert fed == 24
    second = PromptFeeder(client, keys.prompts, tok, itertools.islice(builtin_problems(0), fed, None),
                          backlog=48, version=lambda: 0, fed=fed).start()
    deadline = time.monotonic() + 10
    while client.xlen(keys.prompts) < 48 and time.monotonic() < deadline:
        time.sleep(0.05)
    second.close()
    texts = [tok.decode(decode(f[b"m"], Prompt).prompt_ids_P) for _, f in client.xrange(keys.prompts)]
    want = [tok.decode(tok(p.prompt)["input_ids"]) for p in itertools.islice(builtin_problems(0), 48)]
    assert texts == want  # problems 0..47 once each, in order: none fed twice, none skipped


def test_a_restarted_learner_taking_over_does_not_count_deliveries(client, keys):
    """Learner restarts must not push healthy pending entries toward the poison cap."""
    produce(client, keys.scored, [b"a", b"b"])
    first = StreamConsumer(client, keys.scored, "learner", "l0", max_deliveries=2)
    assert len(first.read(2, block_ms=100)) == 2
    for n in range(1, 5):  # four restarts, each taking over its predecessor's pending entries
        again = StreamConsumer(client, keys.scored, "learner", f"l{n}", max_deliveries=2)
        again.take_over_pending()
        assert sorted(e.payload for e in again.reclaim(10)) == [b"a", b"b"]
    assert client.xlen(keys.dead) == 0
    counts = [p["times_delivered"] for p in client.xpending_range(keys.scored, "learner", "-", "+", 10)]
    assert counts == [1, 1]


def test_a_lost_hand_off_reply_still_reports_the_entries_handed_off(client, keys, lossy):
    """The script ran, its reply was lost, the retry must not answer "0 owned": callers act on it."""
    from shared.streams import Entry
    from shared.redis_client import connect

    via = connect(lossy.url())
    produce(client, keys.trajectories, [b"bad"])
    c = StreamConsumer(via, keys.trajectories, "teacher", "t0")
    (entry,) = c.read(1, block_ms=100)
    lossy.arm(b":moved:")
    assert c.dead_letter(keys.dead, Entry(entry.id, entry.payload), "bad input") is True
    assert lossy.dropped == 1 and client.xlen(keys.dead) == 1 and c.pending() == 0


def test_redis_stats_count_stream_inflow_through_trimming(client, keys):
    from shared.monitoring import ServiceMetrics
    from shared.redis_stats import read_redis_stats

    empty = read_redis_stats(client, keys)  # nothing created yet: zeros, no error
    assert set(empty.streams) == {"prompts", "trajectories", "scored", "dead"}
    assert all(s.length == 0 and s.entries_added == 0 for s in empty.streams.values())
    produce(client, keys.prompts, [b"a", b"b", b"c"])
    for i in range(5):
        client.xadd(keys.dead, {"n": i}, maxlen=2, approximate=False)
    stats = read_redis_stats(client, keys)
    assert (stats.streams["prompts"].length, stats.streams["prompts"].entries_added) == (3, 3)
    assert (stats.streams["dead"].length, stats.streams["dead"].entries_added) == (2, 5)  # capped, still counted
    assert stats.used_memory_bytes > 0
    metrics = ServiceMetrics("learner", "r0")
    metrics.redis(stats)
    labels = {"service": "learner", "replica": "r0"}
    assert metrics.registry.get_sample_value("opd_stream_entries_added", {**labels, "stream": "dead"}) == 5
    assert metrics.registry.get_sample_value("opd_stream_length", {**labels, "stream": "prompts"}) == 3
    assert metrics.registry.get_sample_value("opd_redis_memory_bytes", labels) == stats.used_memory_bytes


def test_produce_counts_what_it_is_told_in_the_same_step(client, keys):
    """The feeder's position counts rows it passed over too: count >= the entries written."""
    from shared.streams import produce, produced_key

    assert produce(client, keys.prompts, [b"a"], counter="pos", count=3) == 1
    assert produce(client, keys.prompts, [], counter="pos", count=2) == 0  # only rows passed over
    assert produce(client, keys.prompts, []) == 0
    assert client.xlen(keys.prompts) == 1 and int(client.hget(produced_key(keys.prompts), "pos")) == 5
    assert produced_key("opd:run:trajectories:Qwen/Qwen2.5-7B") == "opd:run:produced"
