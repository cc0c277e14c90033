"""Wire format: round trips keep every array bit-exact; malformed payloads are rejected clearly."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shared.wire import (SCHEMA_VERSION, Prompt, ScoredTrajectory, TeacherScores, Trajectory,
                         WeightAnnouncement, WireError, decode, encode)


def make_scored(t: int = 5, k: int = 4, n: int = 3, version: int = 7) -> ScoredTrajectory:
    rng = np.random.default_rng(0)
    prompt = Prompt("p1", np.array([1, 5, 6, 7], np.int32), "12", weight_version=version)
    comp = rng.integers(0, 20, t).astype(np.int32)
    mc = np.concatenate([comp[:, None], rng.integers(0, 20, (t, n - 1))], 1).astype(np.int32)
    traj = Trajectory("t1", prompt, comp, -rng.random(t).astype(np.float32),
                      np.array([version] * (t - 1) + [version + 1], np.int32),
                      mc, -rng.random((t, n)).astype(np.float32), "eos", "r0", 1.0, 2.0)
    probs = rng.dirichlet(np.ones(k + 1), t)[:, :k]  # a top-k of a real distribution, plus its tail
    topk_lp = np.sort(np.log(probs), axis=1)[:, ::-1].astype(np.float32)
    tail = (1 - np.exp(topk_lp, dtype=np.float64).sum(1)).astype(np.float32)
    scores = TeacherScores(rng.integers(0, 20, (t, k)).astype(np.int32), topk_lp, tail,
                           -rng.random(t).astype(np.float32), -rng.random((t, n)).astype(np.float32),
                           draw_ids_TN=rng.integers(0, 20, (t, 2)).astype(np.int32),
                           draw_logprobs_TN=-rng.random((t, 2)).astype(np.float32),
                           teacher="teacher", replica="tr0", scored_at=3.0)
    return ScoredTrajectory(traj, scores)


def assert_arrays_equal(a: object, b: object) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and value.shape == other.shape
            assert np.array_equal(value, other), name
        elif hasattr(value, "__dataclass_fields__"):
            assert_arrays_equal(value, other)
        else:
            assert value == other, name


def test_scored_round_trip_is_exact():
    msg = make_scored()
    back = decode(encode(msg), ScoredTrajectory)
    assert_arrays_equal(msg, back)
    assert back.weight_version == 7  # oldest token version


def test_prompt_and_weights_round_trip():
    p = Prompt("x", np.array([1, 2, 3], np.int32), "6", weight_version=3, created_at=1.5)
    assert_arrays_equal(p, decode(encode(p), Prompt))
    w = WeightAnnouncement(4, "/w/v000004", 9.0)
    assert decode(encode(w)) == w


def test_prompt_teacher_id_is_optional_on_decode():
    p = Prompt("x", np.array([1, 2], np.int32), "3", weight_version=0, teacher_id="math")
    assert decode(encode(p), Prompt).teacher_id == "math"
    header, blob = msgpack.unpackb(encode(p))
    header.pop("teacher_id")  # a message from a build before the field: reads as "any teacher"
    assert decode(msgpack.packb([header, blob]), Prompt).teacher_id == ""
    header["teacher_id"] = 7
    with pytest.raises(WireError, match="teacher_id"):
        decode(msgpack.packb([header, blob]), Prompt)


def test_envelope_carries_schema_and_version():
    header, blob = msgpack.unpackb(encode(make_scored(version=11)))
    assert header["schema"] == SCHEMA_VERSION == 2 and header["kind"] == "scored"
    assert header["weight_version"] == 11
    arr = header["trajectory"]["completion_ids"]
    assert arr["dtype"] == "int32" and arr["shape"] == [5] and arr["offset"] % 8 == 0
    ids = np.frombuffer(blob, "<i4", 5, arr["offset"])
    assert np.array_equal(ids, make_scored().trajectory.completion_ids_T)


def test_decode_is_zero_copy_and_aligned():
    payload = encode(make_scored(t=33, k=7))
    back = decode(payload, ScoredTrajectory)
    base = np.frombuffer(payload, np.uint8)
    for a in (back.trajectory.completion_ids_T, back.scores.topk_ids_TK, back.scores.topk_logprobs_TK,
              back.trajectory.mc_logprobs_TN):
        assert np.shares_memory(a, base) and a.ctypes.data % 8 == 0 and not a.flags.writeable


def test_decode_from_mutable_or_odd_buffers():
    msg = make_scored()
    buf = bytearray(encode(msg))
    back = decode(buf, ScoredTrajectory)
    assert not back.scores.topk_ids_TK.flags.writeable
    with pytest.raises(BufferError):  # the views hold the buffer: it cannot move under them
        buf.extend(b"x")
    assert_arrays_equal(msg, decode(memoryview(bytes(buf)), ScoredTrajectory))
    with pytest.raises(WireError, match="non-contiguous"):
        decode(memoryview(bytes(buf))[::2])


def tamper(mutate, blob_mutate=None) -> bytes:
    header, blob = msgpack.unpackb(encode(make_scored()))
    mutate(header)
    if blob_mutate is not None:
        blob = blob_mutate(header, bytearray(blob))
    return msgpack.packb([header, bytes(blob)], use_bin_type=True)


def put(field: tuple[str, str], values: np.ndarray):
    """A blob mutation that overwrites one array's bytes."""
    def mutate(header, blob):
        arr = header[field[0]][field[1]]
        raw = values.tobytes()
        blob[arr["offset"]:arr["offset"] + len(raw)] = raw
        return blob
    return mutate


@pytest.mark.parametrize("payload, message", [
    (b"\xc1\x00garbage", "not valid msgpack"),
    (msgpack.packb([1, 2]), "header is a int"),
    (msgpack.packb({"schema": 1, "kind": "prompt"}), "unknown schema version 1; this build reads 2"),
    (msgpack.packb([{"schema": 2}, 5]), "not a bin blob"),
    (encode(make_scored())[:-1], "does not end"),
    (encode(make_scored()) + b"\0", "does not end"),
    (tamper(lambda b: b.update(schema=99)), "unknown schema version 99"),
    (tamper(lambda b: b.pop("schema")), "unknown schema version None"),
    (tamper(lambda b: b.update(kind="bogus")), "unknown message kind"),
    (tamper(lambda b: b["trajectory"].pop("traj_id")), "missing field 'traj_id'"),
    (tamper(lambda b: b["trajectory"]["completion_ids"].update(offset=10**6)), "outside the"),
    (tamper(lambda b: b["trajectory"]["completion_ids"].update(offset=-4)), "outside the"),
    (tamper(lambda b: b["trajectory"]["completion_ids"].update(dtype="float32")), "dtype"),
    (tamper(lambda b: b["trajectory"]["completion_ids"].update(data=b"")), "dtype, shape, offset"),
    (tamper(lambda b: b["teacher"]["topk_ids"].update(shape=[4, 5])), "top-k arrays"),
    (tamper(lambda b: b["trajectory"]["mc_ids"].update(shape=[0, 2**62])), "ints in"),
    (tamper(lambda b: b["teacher"].update(mc_logprobs=None)), "mc_logprobs"),
    (tamper(lambda b: b["teacher"].update(draw_logprobs=None)), "draw_ids/draw_logprobs"),
    (tamper(lambda b: None, put(("trajectory", "behaviour_logprobs"), np.array([0, np.nan], np.float32))),
     "finite"),
    (tamper(lambda b: None, put(("teacher", "sampled_logprobs"), np.array([0, 2.0], np.float32))), "<= 0"),
    (tamper(lambda b: None, put(("teacher", "tail_mass"), np.array([1.5], np.float32))), r"in \[0, 1\]"),
    (tamper(lambda b: b.update(weight_version=0)), "disagrees"),
    (tamper(lambda b: b.update(schema=2.0)), "schema must be an int"),
    (tamper(lambda b: b.update(schema=True)), "schema must be an int"),
    (msgpack.packb({"a": 1}), "unknown schema version None"),
    (msgpack.packb("text"), "valid msgpack but a str"),
    (tamper(lambda b: None, put(("teacher", "topk_logprobs"), np.zeros(20, np.float32))), "sum to 4.0000 > 1"),
    (tamper(lambda b: None, put(("teacher", "topk_logprobs"),
                                np.log(np.tile([0.1, 0.2, 0.3, 0.35], 5)).astype(np.float32))), "not sorted"),
    (tamper(lambda b: None, put(("teacher", "tail_mass"), np.full(5, 0.9, np.float32))), "differs from 1 - sum"),
    (tamper(lambda b: b["trajectory"].update(traj_id=5)), "traj_id"),
])
def test_bad_payloads_are_rejected_with_a_reason(payload, message):
    with pytest.raises(WireError, match=message):
        decode(payload)


def test_wrong_kind_and_oversize_rejected(monkeypatch):
    with pytest.raises(WireError, match="expected 'prompt'"):
        decode(encode(make_scored()), Prompt)
    monkeypatch.setattr("shared.wire.MAX_MESSAGE_BYTES", 100)
    with pytest.raises(WireError, match="exceeds"):
        decode(encode(make_scored()))


def test_empty_mc_sample_axis_rejected():
    def empty(header):
        for arr in (header["trajectory"]["mc_ids"], header["trajectory"]["mc_logprobs"],
                    header["teacher"]["mc_logprobs"]):
            arr.update(shape=[5, 0])
    with pytest.raises(WireError, match="N >= 1"):
        decode(tamper(empty))


def test_large_header_and_empty_arrays_round_trip():
    """Headers longer than the first feed chunk decode exactly; a zero-width top-k is refused."""
    p = Prompt("x" * 100_000, np.array([1], np.int32), "y" * 50_000, weight_version=1)
    assert_arrays_equal(p, decode(encode(p), Prompt))
    msg = make_scored()
    msg.scores.topk_ids_TK = np.zeros((5, 0), np.int32)
    msg.scores.topk_logprobs_TK = np.zeros((5, 0), np.float32)
    with pytest.raises(WireError, match="top-k width must be >= 1"):  # K = 0 is no teacher cache
        decode(encode(msg), ScoredTrajectory)
    e = Prompt("e", np.array([1], np.int32), "", weight_version=0)
    e.prompt_ids_P = np.zeros(0, np.int32)
    with pytest.raises(WireError, match="empty prompt"):
        decode(encode(e), Prompt)


def test_mc_column_zero_must_be_sampled_token():
    msg = make_scored()
    msg.trajectory.mc_ids_TN[0, 0] += 1
    with pytest.raises(WireError, match="column 0"):
        decode(encode(msg))


def test_corrupted_payloads_raise_only_wire_errors():
    """Random truncations and byte flips never escape as anything but WireError."""
    good = encode(make_scored())
    rng = np.random.default_rng(1)
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(2000):
        buf = bytearray(good)
        if rng.random() < 0.3:
            buf = buf[: rng.integers(0, len(buf))]
        for pos in rng.integers(0, max(1, len(buf)), rng.integers(1, 4)):
            if buf:
                buf[pos] = rng.integers(0, 256)
        try:
            decode(bytes(buf))
            outcomes["ok"] += 1
        except WireError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 1000
