"""Wire format: every message the services exchange, encoded with msgpack.

One place for all wire types. Arrays travel as raw little-endian bytes plus dtype and shape
(never Python lists), every message carries the schema version and the weight version, and
decoding validates everything (version, kind, field types, dtypes, shapes, finiteness, size)
and raises `WireError` with a message that says what is wrong. `docs/wire.md` documents the
layout for clients in other languages.

Shape suffixes: `_T` completion positions, `_P` prompt positions, `_TN` positions x MC
samples, `_TK` positions x teacher top-k.

    python -c "from shared.wire import *; print(SCHEMA_VERSION)"
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_DTYPES = {"int32": "<i4", "int64": "<i8", "float32": "<f4", "float64": "<f8"}
_NAME_OF = {np.dtype(code): name for name, code in _DTYPES.items()}
_ITEMSIZE = {name: np.dtype(code).itemsize for name, code in _DTYPES.items()}


class WireError(ValueError):
    """A payload that is not a valid message of the expected kind and schema version."""


# ---------------------------------------------------------------- arrays


def pack_array(a: np.ndarray) -> dict[str, Any]:
    """Array -> {"dtype", "shape", "data"}; data is a zero-copy view of little-endian bytes."""
    name = _NAME_OF.get(a.dtype) or _NAME_OF.get(a.dtype.newbyteorder("<"))
    if name is None:
        raise WireError(f"dtype {a.dtype} cannot travel; allowed: {sorted(_DTYPES)}")
    data = np.ascontiguousarray(a, dtype=_DTYPES[name])  # no copy when already so
    # flat byte view: cast() refuses multi-dimensional views with a zero-size axis
    return {"dtype": name, "shape": list(a.shape), "data": memoryview(data.reshape(-1)).cast("B")}


def unpack_array(obj: Any, where: str, dtype: str, ndim: int) -> np.ndarray:
    """Validate and decode one packed array (zero-copy view); `where` names the field."""
    if not isinstance(obj, dict) or len(obj) != 3 or obj.keys() != {"dtype", "shape", "data"}:
        raise WireError(f"{where}: expected an array map with dtype, shape, data")
    if obj["dtype"] != dtype:
        raise WireError(f"{where}: dtype {obj['dtype']!r}, expected {dtype!r}")
    shape = obj["shape"]
    if not isinstance(shape, list) or len(shape) != ndim or not all(
        type(s) is int and s >= 0 for s in shape
    ):
        raise WireError(f"{where}: shape {shape!r} is not {ndim} non-negative ints")
    data = obj["data"]
    want = math.prod(shape) * _ITEMSIZE[dtype]
    if not isinstance(data, bytes) or len(data) != want:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise WireError(f"{where}: {got} data bytes, shape {shape} needs {want}")
    return np.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape)


def _logprobs(obj: Any, where: str, ndim: int) -> np.ndarray:
    a = unpack_array(obj, where, "float32", ndim)
    if a.size:
        lo, hi = a.min(), a.max()  # two reductions, no temporaries; NaN fails both tests
        if not (lo > -np.inf and hi < np.inf):
            raise WireError(f"{where}: log-probs must be finite")
        if not hi <= 1e-3:
            raise WireError(f"{where}: log-probs must be <= 0")
    return a


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise WireError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise WireError(f"{where}.{key}: {type(value).__name__} is not {typ}")
    return value


def _opt_array(d: dict[str, Any], key: str, where: str, ndim: int) -> np.ndarray | None:
    return None if d.get(key) is None else _logprobs(d[key], f"{where}.{key}", ndim)


# ---------------------------------------------------------------- messages


@dataclass
class Prompt:
    """A task prompt, written by the learner's feeder, read by rollout replicas."""

    prompt_id: str
    prompt_ids_P: np.ndarray  # int32 token ids, includes BOS if the tokenizer uses one
    answer: str  # reference answer for exact-match reward/accuracy ("" when unknown)
    weight_version: int  # learner version when the prompt was enqueued
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "prompt_ids": pack_array(np.asarray(self.prompt_ids_P, np.int32)),
            "answer": self.answer,
            "weight_version": self.weight_version,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "prompt") -> Prompt:
        ids = unpack_array(d.get("prompt_ids"), f"{where}.prompt_ids", "int32", 1)
        if ids.size == 0:
            raise WireError(f"{where}.prompt_ids: empty prompt")
        return cls(
            prompt_id=_get(d, "prompt_id", str, where),
            prompt_ids_P=ids,
            answer=_get(d, "answer", str, where),
            weight_version=_get(d, "weight_version", int, where),
            created_at=float(_get(d, "created_at", (int, float), where)),
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

    @property
    def weight_version(self) -> int:
        """Oldest version that produced any token: what staleness is measured against."""
        return int(self.token_versions_T.min()) if self.token_versions_T.size else 0

    @property
    def num_tokens(self) -> int:
        return int(self.completion_ids_T.shape[0])

    def to_dict(self) -> dict[str, Any]:
        d = {
            "traj_id": self.traj_id,
            "prompt": self.prompt.to_dict(),
            "completion_ids": pack_array(np.asarray(self.completion_ids_T, np.int32)),
            "behaviour_logprobs": pack_array(np.asarray(self.behaviour_logprobs_T, np.float32)),
            "token_versions": pack_array(np.asarray(self.token_versions_T, np.int32)),
            "mc_ids": None,
            "mc_logprobs": None,
            "finish_reason": self.finish_reason,
            "replica": self.replica,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.mc_ids_TN is not None and self.mc_logprobs_TN is not None:
            d["mc_ids"] = pack_array(np.asarray(self.mc_ids_TN, np.int32))
            d["mc_logprobs"] = pack_array(np.asarray(self.mc_logprobs_TN, np.float32))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "trajectory") -> Trajectory:
        prompt = Prompt.from_dict(_get(d, "prompt", dict, where), f"{where}.prompt")
        ids = unpack_array(d.get("completion_ids"), f"{where}.completion_ids", "int32", 1)
        t = Trajectory(
            traj_id=_get(d, "traj_id", str, where),
            prompt=prompt,
            completion_ids_T=ids,
            behaviour_logprobs_T=_logprobs(
                d.get("behaviour_logprobs"), f"{where}.behaviour_logprobs", 1
            ),
            token_versions_T=unpack_array(
                d.get("token_versions"), f"{where}.token_versions", "int32", 1
            ),
            mc_ids_TN=None
            if d.get("mc_ids") is None
            else unpack_array(d["mc_ids"], f"{where}.mc_ids", "int32", 2),
            mc_logprobs_TN=_opt_array(d, "mc_logprobs", where, 2),
            finish_reason=_get(d, "finish_reason", str, where),
            replica=_get(d, "replica", str, where),
            started_at=float(_get(d, "started_at", (int, float), where)),
            finished_at=float(_get(d, "finished_at", (int, float), where)),
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "topk_ids": pack_array(np.asarray(self.topk_ids_TK, np.int32)),
            "topk_logprobs": pack_array(np.asarray(self.topk_logprobs_TK, np.float32)),
            "tail_mass": pack_array(np.asarray(self.tail_mass_T, np.float32)),
            "sampled_logprobs": pack_array(np.asarray(self.sampled_logprobs_T, np.float32)),
            "mc_logprobs": None
            if self.mc_logprobs_TN is None
            else pack_array(np.asarray(self.mc_logprobs_TN, np.float32)),
            "draw_ids": None if self.draw_ids_TN is None else pack_array(np.asarray(self.draw_ids_TN, np.int32)),
            "draw_logprobs": None
            if self.draw_logprobs_TN is None
            else pack_array(np.asarray(self.draw_logprobs_TN, np.float32)),
            "teacher": self.teacher,
            "replica": self.replica,
            "scored_at": self.scored_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "teacher") -> TeacherScores:
        tail = unpack_array(d.get("tail_mass"), f"{where}.tail_mass", "float32", 1)
        if not np.isfinite(tail).all() or (tail < 0).any() or (tail > 1).any():
            raise WireError(f"{where}.tail_mass: must be finite and in [0, 1]")
        return cls(
            topk_ids_TK=unpack_array(d.get("topk_ids"), f"{where}.topk_ids", "int32", 2),
            topk_logprobs_TK=_logprobs(d.get("topk_logprobs"), f"{where}.topk_logprobs", 2),
            tail_mass_T=tail,
            sampled_logprobs_T=_logprobs(
                d.get("sampled_logprobs"), f"{where}.sampled_logprobs", 1
            ),
            mc_logprobs_TN=_opt_array(d, "mc_logprobs", where, 2),
            draw_ids_TN=None
            if d.get("draw_ids") is None
            else unpack_array(d["draw_ids"], f"{where}.draw_ids", "int32", 2),
            draw_logprobs_TN=_opt_array(d, "draw_logprobs", where, 2),
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

    def to_dict(self) -> dict[str, Any]:
        return {"trajectory": self.trajectory.to_dict(), "teacher": self.scores.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "scored") -> ScoredTrajectory:
        traj = Trajectory.from_dict(_get(d, "trajectory", dict, where), f"{where}.trajectory")
        scores = TeacherScores.from_dict(_get(d, "teacher", dict, where), f"{where}.teacher")
        n, s = traj.num_tokens, scores
        if s.topk_ids_TK.shape[0] != n or s.topk_logprobs_TK.shape != s.topk_ids_TK.shape:
            raise WireError(f"{where}.teacher: top-k arrays must be ({n}, k) and equal shape")
        if s.tail_mass_T.shape != (n,) or s.sampled_logprobs_T.shape != (n,):
            raise WireError(f"{where}.teacher: per-position arrays must be ({n},)")
        mc_shape = None if traj.mc_ids_TN is None else traj.mc_ids_TN.shape
        if (None if s.mc_logprobs_TN is None else s.mc_logprobs_TN.shape) != mc_shape:
            raise WireError(f"{where}.teacher.mc_logprobs: must match mc_ids shape {mc_shape}")
        draw = None if s.draw_ids_TN is None else s.draw_ids_TN.shape
        if draw != (None if s.draw_logprobs_TN is None else s.draw_logprobs_TN.shape) or (
                draw is not None and (draw[0] != n or draw[1] < 1)):
            raise WireError(f"{where}.teacher: draw_ids/draw_logprobs must both be ({n}, N >= 1) or absent")
        return cls(traj, scores)


@dataclass
class WeightAnnouncement:
    """Published by the learner after a new weight version is fully written to disk."""

    weight_version: int
    path: str  # directory holding model.safetensors (+ config.json)
    published_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "published_at": self.published_at}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "weights") -> WeightAnnouncement:
        return cls(
            weight_version=_get(d, "weight_version", int, where),
            path=_get(d, "path", str, where),
            published_at=float(_get(d, "published_at", (int, float), where)),
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


def encode(msg: Message) -> bytes:
    """Message -> msgpack bytes: {"schema", "kind", "weight_version", **fields}."""
    body = msg.to_dict()
    body.update(schema=SCHEMA_VERSION, kind=_KIND_OF[type(msg)], weight_version=msg.weight_version)
    return msgpack.packb(body, use_bin_type=True)


def decode(payload: bytes, expect: type[Message] | None = None) -> Message:
    """msgpack bytes -> message; raises WireError on anything malformed or unexpected."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"payload is {type(payload).__name__}, not bytes")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"payload of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise WireError(f"not valid msgpack: {e}") from e
    if not isinstance(body, dict):
        raise WireError(f"message is a {type(body).__name__}, not a map")
    schema = body.get("schema")
    if schema != SCHEMA_VERSION:
        raise WireError(f"unknown schema version {schema!r}; this build reads {SCHEMA_VERSION}")
    kind = body.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"unknown message kind {kind!r}; known: {sorted(_KINDS)}")
    if expect is not None and cls is not expect:
        raise WireError(f"got a {kind!r} message, expected {_KIND_OF[expect]!r}")
    msg = cls.from_dict(body, kind)
    if _get(body, "weight_version", int, kind) != msg.weight_version:
        raise WireError(f"{kind}: envelope weight_version disagrees with the payload")
    return msg
