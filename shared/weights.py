"""Weight versions: the learner writes each version atomically and announces it in Redis.

Publish = write `model.safetensors` + `config.json` into `<root>/v000123.tmp/` (`v000123.e1`
in epoch 1, after a restore), fsync, rename to `<root>/v000123/` and fsync the parent (atomic
and durable on one filesystem), then MULTI: SET the announcement key and the version key,
XADD a wake-up to the `versions` stream. Readers (rollout replicas) GET the announcement
between batches and load the directory whenever the announcement changed (a newer version,
or an older one after a restore). Safetensors only: no pickle.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from shared.keys import Keys
from shared.wire import WeightAnnouncement, decode, encode

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"


_VERSION_DIR = re.compile(r"^v(\d{6,})(?:\.e(\d+))?$")


def version_dir(root: str | Path, version: int, epoch: int = 0) -> Path:
    """`v000123` (epoch 0) or `v000123.e1`: a restored learner's epoch never reuses a directory."""
    return Path(root) / (f"v{version:06d}" + (f".e{epoch}" if epoch else ""))


def save_version(model: torch.nn.Module, root: str | Path, version: int, epoch: int = 0) -> Path:
    """Write the model's weights for `version` atomically; returns the final directory."""
    from safetensors.torch import save_model

    final = version_dir(root, version, epoch)
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
    old = final.with_name(final.name + ".old")
    if final.exists():  # set the old one aside, never delete it before the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """fsync a directory: its entries (a rename into it) are durable once this returns."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def announce(client: redis.Redis, keys: Keys, version: int, path: Path,
             step_finished_at: float | None = None, epoch: int = 0) -> WeightAnnouncement:
    """Make `version` visible to readers (after its files are complete); `step_finished_at`
    (default: now) is when the learner's step that produced it ended."""
    now = time.time()
    seconds, micros = client.time()  # one clock for learner and rollouts: the weight lag spans machines
    ann = WeightAnnouncement(weight_version=version, path=str(path), published_at=now,
                             step_finished_at=now if step_finished_at is None else step_finished_at,
                             server_published_at=seconds + micros / 1e6, epoch=epoch)
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.weights, encode(ann))
    pipe.set(keys.version, version)
    pipe.xadd(keys.versions, {"v": version}, maxlen=100, approximate=True)  # wake-ups only
    pipe.execute()
    return ann


def weight_lag(client: redis.Redis, ann: WeightAnnouncement) -> float:
    """Seconds from the learner's step end to now, without comparing two machines' clocks: the
    learner's own clock up to publication, the Redis server's clock after it."""
    if ann.server_published_at <= 0:  # an announcement from before this field existed
        return max(0.0, time.time() - ann.step_finished_at)
    seconds, micros = client.time()
    return max(0.0, ann.published_at - ann.step_finished_at) + max(0.0, seconds + micros / 1e6 - ann.server_published_at)


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


def prune_versions(root: str | Path, keep: int, newest: int, min_age_s: float = 0.0, epoch: int = 0) -> None:
    """Delete version directories of abandoned epochs and those older than the newest `keep`
    of `epoch`, once published more than `min_age_s` ago (directory mtime), so a slow reader
    (a large model's load over a shared filesystem, which gives no open-file protection)
    never loses the version it is loading; readers retry with the newest announcement."""
    cutoff = time.time() - min_age_s
    for d in Path(root).iterdir() if Path(root).is_dir() else []:
        m = _VERSION_DIR.match(d.name)
        if not (m and d.is_dir()):
            continue
        version, dir_epoch = int(m.group(1)), int(m.group(2) or 0)
        if (dir_epoch < epoch or version <= newest - keep) and (min_age_s <= 0 or d.stat().st_mtime < cutoff):
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

