"""Wire format: every message the services exchange, encoded with msgpack.

One place for all wire types. A message is the msgpack array `[header, blob]`: the header
map holds the fields, the schema version and the weight version; each array field is a map
{dtype, shape, offset} whose raw little-endian bytes sit in the blob (a bin), 8-byte aligned
(never Python lists). Encoding copies the array data once, into the result; decoding parses
only the header and returns read-only numpy views into the payload. Decoding validates
everything (version, kind, field types, dtypes, shapes, bounds, finiteness, size) and raises
`WireError` with a message that says what is wrong. `docs/wire.md` documents the layout for
clients in other languages.

Shape suffixes: `_T` completion positions, `_P` prompt positions, `_TN` positions x MC
samples, `_TK` positions x teacher top-k.

    python -c "from shared.wire import *; print(SCHEMA_VERSION)"
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from shared.wire_arrays import MAX_MESSAGE_BYTES, ArrayReader, ArrayWriter, WireError

SCHEMA_VERSION = 2
__all__ = ["MAX_MESSAGE_BYTES", "SCHEMA_VERSION", "ArrayReader", "ArrayWriter", "Message", "Prompt",
           "ScoredTrajectory", "TeacherScores", "Trajectory", "WeightAnnouncement", "WireError", "decode",
           "encode", "tail_mass"]


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise WireError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise WireError(f"{where}.{key}: {type(value).__name__} is not {typ}")
    return value


def _teacher_id(value: str, where: str) -> str:
    from shared.keys import check_teacher_id

    try:
        return check_teacher_id(value)
    except ValueError as e:
        raise WireError(f"{where}: {e}") from None


def _opt(w: ArrayWriter, a: np.ndarray | None, dtype: type) -> dict[str, Any] | None:
    return None if a is None else w.add(np.asarray(a, dtype))


# ---------------------------------------------------------------- messages


@dataclass
class Prompt:
    """A task prompt, written by the learner's feeder, read by rollout replicas."""

    prompt_id: str
    prompt_ids_P: np.ndarray  # int32 token ids, includes BOS if the tokenizer uses one
    answer: str  # reference answer for exact-match reward/accuracy ("" when unknown)
    weight_version: int  # learner version when the prompt was enqueued
    created_at: float = field(default_factory=time.time)
    teacher_id: str = ""  # the teacher pool that scores it ("" = the default pool), see shared/teacher_pools.py

    def to_dict(self, w: ArrayWriter) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "prompt_ids": w.add(np.asarray(self.prompt_ids_P, np.int32)),
            "answer": self.answer,
            "weight_version": self.weight_version,
            "created_at": self.created_at,
            "teacher_id": self.teacher_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], r: ArrayReader, where: str = "prompt") -> Prompt:
        ids = r.array(d.get("prompt_ids"), f"{where}.prompt_ids", "int32", 1)
        if ids.size == 0:
            raise WireError(f"{where}.prompt_ids: empty prompt")
        return cls(
            prompt_id=_get(d, "prompt_id", str, where),
            prompt_ids_P=ids,
            answer=_get(d, "answer", str, where),
            weight_version=_get(d, "weight_version", int, where),
            created_at=float(_get(d, "created_at", (int, float), where)),
            teacher_id=_teacher_id(_get(d, "teacher_id", str, where) if "teacher_id" in d else "", where),
        )


@dataclass
class Trajectory:
    """One sampled completion from a rollout replica, with behaviour log-probs and versions."""

    traj_id: str
    prompt: Prompt
    completion_ids_T: np.ndarray  # int32 sampled tokens y_t (EOS included when emitted)
    behaviour_logprobs_T: np.ndarray  # float32 log mu(y_t | h_t)
    token_versions_T: np.ndarray  # int32 weight version that sampled each token
    mc_ids_TN: np.ndarray | None = None  # int32, column 0 is y_t, the rest drawn from mu
    mc_logprobs_TN: np.ndarray | None = None  # float32 log mu of mc_ids_TN
    finish_reason: str = "eos"  # "eos" or "length"
    replica: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    weight_epoch: int = 0  # the learner epoch of the weights that sampled it (bumped by every restore)

    @property
    def weight_version(self) -> int:
        """Oldest version that produced any token: what staleness is measured against."""
        return int(self.token_versions_T.min()) if self.token_versions_T.size else 0

    @property
    def num_tokens(self) -> int:
        return int(self.completion_ids_T.shape[0])

    def to_dict(self, w: ArrayWriter) -> dict[str, Any]:
        both = self.mc_ids_TN is not None and self.mc_logprobs_TN is not None
        return {
            "traj_id": self.traj_id,
            "prompt": self.prompt.to_dict(w),
            "completion_ids": w.add(np.asarray(self.completion_ids_T, np.int32)),
            "behaviour_logprobs": w.add(np.asarray(self.behaviour_logprobs_T, np.float32)),
            "token_versions": w.add(np.asarray(self.token_versions_T, np.int32)),
            "mc_ids": _opt(w, self.mc_ids_TN if both else None, np.int32),
            "mc_logprobs": _opt(w, self.mc_logprobs_TN if both else None, np.float32),
            "finish_reason": self.finish_reason,
            "replica": self.replica,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "weight_epoch": self.weight_epoch,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], r: ArrayReader, where: str = "trajectory") -> Trajectory:
        prompt = Prompt.from_dict(_get(d, "prompt", dict, where), r, f"{where}.prompt")
        t = Trajectory(
            traj_id=_get(d, "traj_id", str, where),
            prompt=prompt,
            completion_ids_T=r.array(d.get("completion_ids"), f"{where}.completion_ids", "int32", 1),
            behaviour_logprobs_T=r.logprobs(d.get("behaviour_logprobs"), f"{where}.behaviour_logprobs", 1),
            token_versions_T=r.array(d.get("token_versions"), f"{where}.token_versions", "int32", 1),
            mc_ids_TN=r.optional(d, "mc_ids", where, "int32", 2),
            mc_logprobs_TN=r.optional(d, "mc_logprobs", where, "float32", 2),
            finish_reason=_get(d, "finish_reason", str, where),
            replica=_get(d, "replica", str, where),
            started_at=float(_get(d, "started_at", (int, float), where)),
            finished_at=float(_get(d, "finished_at", (int, float), where)),
            weight_epoch=_get(d, "weight_epoch", int, where) if "weight_epoch" in d else 0,
        )
        t.check(where)
        return t

    def check(self, where: str) -> None:
        """Cross-field shape checks shared by decode and the services."""
        n = self.num_tokens
        if n == 0:
            raise WireError(f"{where}: empty completion")
        for name in ("behaviour_logprobs_T", "token_versions_T"):
            if getattr(self, name).shape != (n,):
                raise WireError(f"{where}.{name}: shape {getattr(self, name).shape} != ({n},)")
        if (self.mc_ids_TN is None) != (self.mc_logprobs_TN is None):
            raise WireError(f"{where}: mc_ids and mc_logprobs must come together")
        if self.mc_ids_TN is not None:
            if (self.mc_ids_TN.shape[0] != n or self.mc_ids_TN.shape[1] < 1
                    or self.mc_logprobs_TN.shape != self.mc_ids_TN.shape):
                raise WireError(f"{where}: MC arrays must be ({n}, N >= 1) and equal shape")
            if not (self.mc_ids_TN[:, 0] == self.completion_ids_T).all():
                raise WireError(f"{where}.mc_ids: column 0 must be the sampled tokens")


@dataclass
class TeacherScores:
    """The finite teacher-score cache for one trajectory (per completion position)."""

    topk_ids_TK: np.ndarray  # int32 teacher top-k token ids, descending log-prob
    topk_logprobs_TK: np.ndarray  # float32 log p of those ids
    tail_mass_T: np.ndarray  # float32 1 - sum_topk p (clamped to [0, 1])
    sampled_logprobs_T: np.ndarray  # float32 log p(y_t)
    mc_logprobs_TN: np.ndarray | None = None  # float32 log p of the trajectory's mc_ids_TN
    draw_ids_TN: np.ndarray | None = None  # int32 ids drawn from the teacher p (teacher-sampled FKL)
    draw_logprobs_TN: np.ndarray | None = None  # float32 log p of draw_ids_TN
    teacher: str = ""  # teacher model name, for provenance
    replica: str = ""
    scored_at: float = 0.0

    def to_dict(self, w: ArrayWriter) -> dict[str, Any]:
        return {
            "topk_ids": w.add(np.asarray(self.topk_ids_TK, np.int32)),
            "topk_logprobs": w.add(np.asarray(self.topk_logprobs_TK, np.float32)),
            "tail_mass": w.add(np.asarray(self.tail_mass_T, np.float32)),
            "sampled_logprobs": w.add(np.asarray(self.sampled_logprobs_T, np.float32)),
            "mc_logprobs": _opt(w, self.mc_logprobs_TN, np.float32),
            "draw_ids": _opt(w, self.draw_ids_TN, np.int32),
            "draw_logprobs": _opt(w, self.draw_logprobs_TN, np.float32),
            "teacher": self.teacher,
            "replica": self.replica,
            "scored_at": self.scored_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], r: ArrayReader, where: str = "teacher") -> TeacherScores:
        tail = r.array(d.get("tail_mass"), f"{where}.tail_mass", "float32", 1)
        if tail.size and not (tail.min() >= 0 and tail.max() <= 1):  # NaN fails both
            raise WireError(f"{where}.tail_mass: must be finite and in [0, 1]")
        return cls(
            topk_ids_TK=r.array(d.get("topk_ids"), f"{where}.topk_ids", "int32", 2),
            topk_logprobs_TK=r.logprobs(d.get("topk_logprobs"), f"{where}.topk_logprobs", 2),
            tail_mass_T=tail,
            sampled_logprobs_T=r.logprobs(d.get("sampled_logprobs"), f"{where}.sampled_logprobs", 1),
            mc_logprobs_TN=r.optional(d, "mc_logprobs", where, "float32", 2),
            draw_ids_TN=r.optional(d, "draw_ids", where, "int32", 2),
            draw_logprobs_TN=r.optional(d, "draw_logprobs", where, "float32", 2),
            teacher=_get(d, "teacher", str, where),
            replica=_get(d, "replica", str, where),
            scored_at=float(_get(d, "scored_at", (int, float), where)),
        )


@dataclass
class ScoredTrajectory:
    """A trajectory plus its teacher-score cache: what the learner trains on."""

    trajectory: Trajectory
    scores: TeacherScores

    @property
    def weight_version(self) -> int:
        return self.trajectory.weight_version

    def to_dict(self, w: ArrayWriter) -> dict[str, Any]:
        return {"trajectory": self.trajectory.to_dict(w), "teacher": self.scores.to_dict(w)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], r: ArrayReader, where: str = "scored") -> ScoredTrajectory:
        traj = Trajectory.from_dict(_get(d, "trajectory", dict, where), r, f"{where}.trajectory")
        scores = TeacherScores.from_dict(_get(d, "teacher", dict, where), r, f"{where}.teacher")
        n, s = traj.num_tokens, scores
        if s.topk_ids_TK.shape[0] != n or s.topk_logprobs_TK.shape != s.topk_ids_TK.shape:
            raise WireError(f"{where}.teacher: top-k arrays must be ({n}, k) and equal shape")
        if s.topk_ids_TK.shape[1] < 1:
            raise WireError(f"{where}.teacher: top-k width must be >= 1")
        if s.tail_mass_T.shape != (n,) or s.sampled_logprobs_T.shape != (n,):
            raise WireError(f"{where}.teacher: per-position arrays must be ({n},)")
        mc_shape = None if traj.mc_ids_TN is None else traj.mc_ids_TN.shape
        if (None if s.mc_logprobs_TN is None else s.mc_logprobs_TN.shape) != mc_shape:
            raise WireError(f"{where}.teacher.mc_logprobs: must match mc_ids shape {mc_shape}")
        draw = None if s.draw_ids_TN is None else s.draw_ids_TN.shape
        if draw != (None if s.draw_logprobs_TN is None else s.draw_logprobs_TN.shape) or (
                draw is not None and (draw[0] != n or draw[1] < 1)):
            raise WireError(f"{where}.teacher: draw_ids/draw_logprobs must both be ({n}, N >= 1) or absent")
        _check_topk(s, f"{where}.teacher")
        return cls(traj, scores)


TOPK_SLACK = 1e-3  # float32/bf16 rounding of normalised log-probs


def tail_mass(topk_logprobs_TK: np.ndarray) -> np.ndarray:
    """TeacherScores.tail_mass_T of a top-k: 1 - sum p, clamped to [0, 1] (summed in float64)."""
    return np.clip(1.0 - np.exp(topk_logprobs_TK, dtype=np.float64).sum(-1), 0.0, 1.0).astype(np.float32)


def _check_topk(s: TeacherScores, where: str) -> None:
    """A real top-k of a distribution: sorted descending, mass <= 1, and the tail mass is
    what the top-k leaves (1 - sum p, clamped to [0, 1]), each within TOPK_SLACK."""
    lp = s.topk_logprobs_TK
    if lp.shape[1] > 1 and not (np.diff(lp, axis=1) <= TOPK_SLACK).all():
        raise WireError(f"{where}.topk_logprobs: not sorted in descending order")
    mass = np.exp(lp, dtype=np.float64).sum(axis=1)
    if mass.size and mass.max() > 1 + TOPK_SLACK:
        raise WireError(f"{where}.topk_logprobs: top-k probabilities sum to {mass.max():.4f} > 1")
    if mass.size and np.abs(np.clip(1 - mass, 0, 1) - s.tail_mass_T).max() > TOPK_SLACK:
        raise WireError(f"{where}.tail_mass: differs from 1 - sum of the top-k probabilities")


@dataclass
class WeightAnnouncement:
    """Published by the learner after a new weight version is fully written to disk."""

    weight_version: int
    path: str  # directory holding model.safetensors (+ config.json)
    published_at: float = field(default_factory=time.time)
    step_finished_at: float = 0.0  # when the optimizer step that made it ended (before saving)
    server_published_at: float = 0.0  # the Redis server's clock at publication (0: unknown)
    epoch: int = 0  # the learner epoch (bumped by every restore from a checkpoint)

    def to_dict(self, w: ArrayWriter) -> dict[str, Any]:
        return {"path": self.path, "published_at": self.published_at,
                "step_finished_at": self.step_finished_at, "server_published_at": self.server_published_at,
                "epoch": self.epoch}

    @classmethod
    def from_dict(cls, d: dict[str, Any], r: ArrayReader, where: str = "weights") -> WeightAnnouncement:
        return cls(
            weight_version=_get(d, "weight_version", int, where),
            path=_get(d, "path", str, where),
            published_at=float(_get(d, "published_at", (int, float), where)),
            step_finished_at=float(_get(d, "step_finished_at", (int, float), where)),
            server_published_at=float(_get(d, "server_published_at", (int, float), where))
            if "server_published_at" in d else 0.0,
            epoch=_get(d, "epoch", int, where) if "epoch" in d else 0,
        )


Message = Prompt | Trajectory | ScoredTrajectory | WeightAnnouncement
_KINDS: dict[str, type] = {
    "prompt": Prompt,
    "trajectory": Trajectory,
    "scored": ScoredTrajectory,
    "weights": WeightAnnouncement,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


# ---------------------------------------------------------------- envelope

_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin8/16/32 marker -> length bytes


def encode(msg: Message) -> bytes:
    """Message -> msgpack [header, blob]; one copy of the array data, into the result."""
    w = ArrayWriter()
    header = msg.to_dict(w)
    header.update(schema=SCHEMA_VERSION, kind=_KIND_OF[type(msg)], weight_version=msg.weight_version,
                  align=b"")
    packed = msgpack.packb(header, use_bin_type=True)
    if pad := -(1 + len(packed) + 5) % 8:  # start the blob's data on an 8-byte boundary
        header["align"] = bytes(pad)  # bin8 of 0..7 bytes: the header grows by exactly pad
        packed = msgpack.packb(header, use_bin_type=True)
    return b"".join([b"\x92", packed, b"\xc6", w.size.to_bytes(4, "big"), *w.parts])


def _check_schema(header: dict[str, Any]) -> None:
    schema = header.get("schema")
    if schema is not None and type(schema) is not int:  # 2.0 or True equal 2 in Python: not on this wire
        raise WireError(f"schema must be an int, got {type(schema).__name__} {schema!r}")
    if schema != SCHEMA_VERSION:
        raise WireError(f"unknown schema version {schema!r}; this build reads {SCHEMA_VERSION}")


def _split(view: memoryview) -> tuple[Any, memoryview]:
    """[header, blob] -> (header object, zero-copy view of the blob's bytes)."""
    if not len(view) or view[0] != 0x92:
        try:  # name the schema of a well-formed message from another version
            other = msgpack.unpackb(view, raw=False, strict_map_key=True)
        except Exception:  # msgpack raises several unrelated exception types
            other = None
        if isinstance(other, dict):
            _check_schema(other)
        if other is not None:  # valid msgpack, wrong structure
            raise WireError(f"valid msgpack but a {type(other).__name__}, not a [header, blob] array")
        raise WireError("not valid msgpack: expected a [header, blob] array")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(view))
    fed, chunk = 1, 4096
    while True:  # feed only as much as the header needs
        unpacker.feed(view[fed:fed + chunk])
        fed, chunk = min(len(view), fed + chunk), chunk * 4
        try:
            header = unpacker.unpack()
            break
        except msgpack.OutOfData:
            if fed >= len(view):
                raise WireError("not valid msgpack: truncated header") from None
        except Exception as e:
            raise WireError(f"not valid msgpack: {e}") from e
    if not isinstance(header, dict):
        raise WireError(f"header is a {type(header).__name__}, not a map")
    _check_schema(header)
    at = 1 + unpacker.tell()
    width = _BIN.get(view[at]) if at < len(view) else None
    if width is None:
        raise WireError("not valid msgpack: the second element is not a bin blob")
    start = at + 1 + width
    size = int.from_bytes(view[at + 1:start], "big")
    if start + size != len(view):
        raise WireError(f"blob of {size} bytes does not end the {len(view)}-byte payload")
    return header, view[start:]


def decode(payload: bytes, expect: type[Message] | None = None) -> Message:
    """msgpack bytes -> message; raises WireError on anything malformed or unexpected."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"payload is {type(payload).__name__}, not bytes")
    view = memoryview(payload)
    if view.nbytes > MAX_MESSAGE_BYTES:
        raise WireError(f"payload of {view.nbytes} bytes exceeds {MAX_MESSAGE_BYTES}")
    if not view.c_contiguous:
        raise WireError("payload is a non-contiguous memoryview")
    # read-only: arrays decoded from a bytearray must not be writable views of it
    header, blob = _split(view.toreadonly().cast("B"))
    kind = header.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"unknown message kind {kind!r}; known: {sorted(_KINDS)}")
    if expect is not None and cls is not expect:
        raise WireError(f"got a {kind!r} message, expected {_KIND_OF[expect]!r}")
    msg = cls.from_dict(header, ArrayReader(blob), kind)
    if _get(header, "weight_version", int, kind) != msg.weight_version:
        raise WireError(f"{kind}: envelope weight_version disagrees with the payload")
    return msg
