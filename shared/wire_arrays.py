"""Arrays on the wire: raw little-endian bytes + dtype + shape + offset in a message's blob.

`ArrayWriter` lays out one message's arrays 8-byte aligned in its blob (zero-copy views
until `shared.wire.encode` joins them); `ArrayReader` validates an array map against the
blob (dtype, rank, shape bounds, offset + size inside the blob; log-probs finite and <= 0)
and returns a read-only numpy view into the payload. `WireError` is what every check
raises. The messages themselves are in shared/wire.py; docs/wire.md §3 has the layout.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_DTYPES = {"int32": "<i4", "int64": "<i8", "float32": "<f4", "float64": "<f8"}
_NAME_OF = {np.dtype(code): name for name, code in _DTYPES.items()}
_ITEMSIZE = {name: np.dtype(code).itemsize for name, code in _DTYPES.items()}
_ARRAY_KEYS = frozenset(("dtype", "shape", "offset"))


class WireError(ValueError):
    """A payload that is not a valid message of the expected kind and schema version."""


class ArrayWriter:
    """Lays out one message's arrays in its blob: 8-byte aligned, zero-copy views until encode."""

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def add(self, a: np.ndarray) -> dict[str, Any]:
        """Array -> {"dtype", "shape", "offset"}; its little-endian bytes join the blob."""
        name = _NAME_OF.get(a.dtype) or _NAME_OF.get(a.dtype.newbyteorder("<"))
        if name is None:
            raise WireError(f"dtype {a.dtype} cannot travel; allowed: {sorted(_DTYPES)}")
        data = np.ascontiguousarray(a, dtype=_DTYPES[name])  # no copy when already so
        if pad := -self.size % 8:
            self.parts.append(bytes(pad))
            self.size += pad
        offset = self.size
        # flat byte view: cast() refuses multi-dimensional views with a zero-size axis
        view = memoryview(data.reshape(-1)).cast("B")
        self.parts.append(view)
        self.size += view.nbytes
        return {"dtype": name, "shape": list(a.shape), "offset": offset}


class ArrayReader:
    """Validates array maps against one message's blob and returns zero-copy views into it."""

    def __init__(self, blob: memoryview) -> None:
        self.blob = blob

    def array(self, obj: Any, where: str, dtype: str, ndim: int) -> np.ndarray:
        """One packed array as a read-only view; `where` names the field."""
        if not isinstance(obj, dict) or obj.keys() != _ARRAY_KEYS:
            raise WireError(f"{where}: expected an array map with dtype, shape, offset")
        if obj["dtype"] != dtype:
            raise WireError(f"{where}: dtype {obj['dtype']!r}, expected {dtype!r}")
        shape, offset = obj["shape"], obj["offset"]
        if not isinstance(shape, list) or len(shape) != ndim or not all(
            type(s) is int and 0 <= s <= MAX_MESSAGE_BYTES for s in shape
        ):
            raise WireError(f"{where}: shape {shape!r} is not {ndim} ints in [0, {MAX_MESSAGE_BYTES}]")
        want = math.prod(shape) * _ITEMSIZE[dtype]
        if type(offset) is not int or offset < 0 or offset + want > len(self.blob):
            raise WireError(f"{where}: offset {offset!r} + {want} data bytes (shape {shape}) "
                            f"is outside the {len(self.blob)}-byte blob")
        if want == 0:
            empty = np.zeros(shape, _DTYPES[dtype])
            empty.flags.writeable = False  # like every other decoded array
            return empty
        count = want // _ITEMSIZE[dtype]  # frombuffer holds the buffer: a bytearray cannot resize
        return np.frombuffer(self.blob, _DTYPES[dtype], count, offset).reshape(shape)

    def logprobs(self, obj: Any, where: str, ndim: int) -> np.ndarray:
        """A float32 array of log-probs: finite and <= 0 (1e-3 rounding slack)."""
        a = self.array(obj, where, "float32", ndim)
        if a.size:
            lo, hi = a.min(), a.max()  # two reductions, no temporaries; NaN fails both tests
            if not (lo > -np.inf and hi < np.inf):
                raise WireError(f"{where}: log-probs must be finite")
            if not hi <= 1e-3:
                raise WireError(f"{where}: log-probs must be <= 0")
        return a

    def optional(self, d: dict[str, Any], key: str, where: str, dtype: str, ndim: int) -> np.ndarray | None:
        """An array field that may be nil or absent (float32 fields are all log-probs)."""
        if d.get(key) is None:
            return None
        if dtype == "float32":
            return self.logprobs(d[key], f"{where}.{key}", ndim)
        return self.array(d[key], f"{where}.{key}", dtype, ndim)
