"""The learner's ranks: one logical learner over the processes torchrun starts.

    torchrun --nproc-per-node N -m services.learner [--flags]   # N ranks, one per GPU
    opd-learner --procs N [--flags]                              # the same: re-runs itself so

`Ranks.start` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK. World size 1 (no torchrun)
is the single-process learner, with no process group at all. Otherwise the backend is
picked from the device: NCCL on CUDA (rank r on cuda:<local rank>), gloo on CPU. Rank 0
owns all Redis I/O and tells the others what to do (services/learner/student.py); the
engine (FSDP2 or DDP, sharding.py) does every parameter and gradient exchange, and this
file only the few collectives the learner's own code needs: rank 0's commands, sums of
per-rank tensors, and gathering per-rank metrics.

A rank that dies takes the learner down: torchrun sees the exit at once, sends the other
ranks SIGTERM (and SIGKILL after its --shutdown-timeout, 30 s), and exits non-zero; a
survivor's next collective fails (gloo reports the closed connection at once and `abort`
ends it with one line saying so; with NCCL torchrun's signals end it, or NCCL's watchdog
aborts the process after `dist_timeout_s`). Nothing is acked without a
checkpoint, and a checkpoint needs every rank, so the supervisor's restart (compose
`restart: on-failure`, Kubernetes) resumes from the newest checkpoint and trains nothing twice.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from shared.settings import resolve_device

if TYPE_CHECKING:
    import torch

log = logging.getLogger("opd.learner")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the learner: rank, world size, its device and the backend."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    backend: str = ""  # "" when there is no process group (world size 1)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str, timeout_s: float) -> Ranks:
        """Join torchrun's process group (NCCL on CUDA, gloo on CPU), or stay alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=resolve_device(device))
        import torch
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if resolve_device(device).startswith("cuda"):
            device, backend = f"cuda:{local}", "nccl"
            torch.cuda.set_device(device)
        else:
            device, backend = "cpu", "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, device, backend)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's object on every rank (pickled over the process group, never to disk)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of every rank's `tensor` (in place; alone: unchanged)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (alone: [obj])."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def relaunch(procs: int, argv: list[str]) -> NoReturn:
    """Replace this process by torchrun running this learner on `procs` ranks (same flags)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "services.learner", *argv]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def abort(ranks: Ranks, error: BaseException) -> NoReturn:
    """End this rank after `error` (a peer died, or this rank failed): one clear line, then exit
    non-zero without the interpreter's teardown, which can block on a broken process group."""
    from shared.service import exit_process

    code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1
    if isinstance(error, SystemExit) and not isinstance(error.code, int):
        print(error.code, file=sys.stderr)
    elif not isinstance(error, SystemExit):
        log.error("learner rank %d of %d failed: %s", ranks.rank, ranks.world, error,
                  exc_info=not _peer_gone(error))
    log.error("learner rank %d of %d stops; torchrun stops the other ranks and exits non-zero, and the "
              "learner's supervisor restarts it: it resumes from its newest checkpoint", ranks.rank, ranks.world)
    exit_process(code or 1)


def _peer_gone(error: BaseException) -> bool:
    """A collective failed because another rank is gone (its traceback says nothing more)."""
    text = str(error)
    return "Connection closed by peer" in text or "Connection reset by peer" in text or "timed out" in text
