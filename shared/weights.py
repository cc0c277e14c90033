"""Weight versions: the learner writes each version atomically and announces it in Redis.

Publish = write `model.safetensors` + `config.json` into `<root>/v000123.tmp/`, fsync, rename
to `<root>/v000123/` (atomic on one filesystem), then MULTI: SET the announcement key and
the version key. Readers (rollout replicas) GET the announcement between batches and load
the directory only when the version is newer than theirs. Safetensors only: no pickle.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from shared.streams import Keys
from shared.wire import WeightAnnouncement, decode, encode

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:06d}"


def save_version(model: torch.nn.Module, root: str | Path, version: int) -> Path:
    """Write the model's weights for `version` atomically; returns the final directory."""
    from safetensors.torch import save_model

    final = version_dir(root, version)
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / WEIGHTS_FILE))  # handles tied embeddings
        config = getattr(model, "config", None)
        if config is not None:
            config.to_json_file(str(tmp / "config.json"))
    return final


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; when the block succeeds, fsync its files
    and the directory, rename it to `final` (replacing an older one) and fsync the parent, so
    the rename itself survives a power loss before anyone acts on it (the learner acks right
    after a checkpoint): readers never see a partial directory."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    """fsync a directory: its entries (a rename into it) are durable once this returns."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def announce(client: redis.Redis, keys: Keys, version: int, path: Path,
             step_finished_at: float | None = None) -> WeightAnnouncement:
    """Make `version` visible to readers (after its files are complete); `step_finished_at`
    (default: now) is when the learner's step that produced it ended."""
    now = time.time()
    ann = WeightAnnouncement(weight_version=version, path=str(path), published_at=now,
                             step_finished_at=now if step_finished_at is None else step_finished_at)
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.weights, encode(ann))
    pipe.set(keys.version, version)
    pipe.xadd(keys.versions, {"v": version}, maxlen=100, approximate=True)  # wake-ups only
    pipe.execute()
    return ann


def wait_for_new_version(client: redis.Redis, keys: Keys, cursor: bytes | str, timeout_s: float) -> bytes | str:
    """Block until a version is announced after `cursor` (a versions-stream id; "0-0" at
    first) or `timeout_s` passes; returns the new cursor. Nothing announced between two
    calls is missed, so there is no polling delay."""
    reply = client.xread({keys.versions: cursor}, block=max(1, int(timeout_s * 1000)), count=1000)
    return reply[0][1][-1][0] if reply else cursor


def latest(client: redis.Redis, keys: Keys) -> WeightAnnouncement | None:
    """The newest announced version, or None before the learner's first publish."""
    raw = client.get(keys.weights)
    if raw is None:
        return None
    msg = decode(raw, WeightAnnouncement)
    assert isinstance(msg, WeightAnnouncement)
    return msg


def load_version(model: torch.nn.Module, path: str | Path) -> None:
    """Load a published version into `model` in place (strict: every tensor must match)."""
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(Path(path) / WEIGHTS_FILE), strict=False)
    tied = _tied_names(model)
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(f"weights at {path} do not fit the model: missing={missing[:5]} "
                         f"unexpected={list(unexpected)[:5]}")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with another parameter (tied embeddings)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            tied.update({name, seen[ptr]})
        seen[ptr] = name
    return tied


def prune_versions(root: str | Path, keep: int, newest: int) -> None:
    """Delete version directories older than the newest `keep` (readers retry on a miss)."""
    for d in Path(root).glob("v*"):
        if d.is_dir() and d.name[1:].isdigit() and int(d.name[1:]) <= newest - keep:
            shutil.rmtree(d, ignore_errors=True)


def wait_for_version(
    client: redis.Redis, keys: Keys, min_version: int = 0, timeout_s: float = 300.0
) -> WeightAnnouncement:
    """Block until a version >= min_version is announced."""
    deadline = time.monotonic() + timeout_s
    while True:
        ann = latest(client, keys)
        if ann is not None and ann.weight_version >= min_version:
            return ann
        if time.monotonic() > deadline:
            raise TimeoutError(f"no weight version >= {min_version} announced in {timeout_s}s")
        time.sleep(0.1)

