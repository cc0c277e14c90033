"""Raw safetensors save + load of a model: the floor for a weight broadcast.

The pipeline benchmark measures the real broadcast (learner announces a version ->
each rollout replica generating with it); this is the reference it is compared to.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def run(model_name: str, repeats: int = 3) -> dict[str, Any]:
    from safetensors.torch import load_model, save_model

    from shared.models import load_model as load_hf

    model = load_hf(model_name)
    params = sum(p.numel() for p in model.parameters())
    save_s = load_s = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.safetensors")
        for _ in range(repeats):
            t0 = time.perf_counter()
            save_model(model, path)
            t1 = time.perf_counter()
            load_model(model, path, strict=False)
            t2 = time.perf_counter()
            save_s, load_s = min(save_s, t1 - t0), min(load_s, t2 - t1)
        size = Path(path).stat().st_size
    return {"model": model_name, "parameters": params, "bytes": size, "save_s": save_s,
            "load_s": load_s, "save_load_s": save_s + load_s}
