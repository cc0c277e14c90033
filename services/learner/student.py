"""The student the learner trains: on one process, or as one student over torchrun ranks.

One process (world size 1): the model, its Trainer and AdamW, and `weights()` is the model
itself. Over N ranks (distributed.py) every rank holds the student sharded (sharding.py)
and rank 0, which owns all Redis I/O (worker.py), leads: before each operation that takes
every rank it broadcasts a command, and ranks 1..N-1 do the same operation in `serve`:

    step <batch>            train on the step's batch (wire-encoded; each rank its shard)
    weights                 gather the full weights to rank 0 (once per new version)
    optimizer               gather the full AdamW state to rank 0 (a checkpoint)
    restore <version> <f>   take a checkpoint's weights, and AdamW state unless fresh, from rank 0
    idle                    rank 0 is waiting for data (keeps the others' wait under dist_timeout_s)
    stop                    the run is over: exit 0

Rank 0 keeps a plain CPU copy of the student (memory: one full copy of the weights),
loaded from the gathered weights when a new version's are asked for: what it publishes,
checkpoints, evaluates and saves at the end. A step that fails on any rank ends the
learner (no rank can skip a collective the others wait in); a message that keeps killing
it is dead-lettered by the stream's delivery cap (max_deliveries) like any poison message.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.learner import checkpoint, sharding
from services.learner.distributed import Ranks
from services.learner.settings import LearnerSettings

if TYPE_CHECKING:
    import torch

    from shared.wire import ScoredTrajectory

KEEPALIVE_S = 5.0  # rank 0 waiting for data says so this often
log = logging.getLogger("opd.learner")


class Student:
    def __init__(self, settings: LearnerSettings, ranks: Ranks) -> None:
        import torch

        from services.learner.trainer import LrSchedule, Trainer
        from shared.models import enable_activation_checkpointing, load_model, load_tokenizer, resolve_model

        torch.manual_seed(settings.seed)
        self.ranks, s = ranks, settings
        path = resolve_model(s.model)
        self.tokenizer = load_tokenizer(path)
        # over N ranks: loaded on the CPU, copied for rank 0, then moved and sharded
        model = load_model(path, device="cpu" if ranks.distributed else ranks.device)
        self.names = [name for name, _ in model.named_parameters()]  # optimizer order
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.plain: torch.nn.Module | None = model
        if ranks.distributed:
            self.plain = copy.deepcopy(model) if ranks.leader else None
        if s.gradient_checkpointing:
            enable_activation_checkpointing(model)
        forward = sharding.wrap(model, ranks, s.parallel) if ranks.distributed else None
        self.model = model
        self.trainer = Trainer(model, lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                               objective=s.objective(), warmup_steps=s.warmup_steps,
                               schedule=LrSchedule(s.warmup_steps, s.lr_schedule, s.max_steps, s.lr_min_ratio),
                               pad_id=int(self.tokenizer.pad_token_id), chunk_tokens=s.logprob_chunk_tokens,
                               max_tokens_per_microbatch=s.max_tokens_per_microbatch, dtype=s.dtype,
                               forward=forward, ranks=ranks, teacher_weights=s.teacher_weights)
        self._stale = False  # rank 0's plain copy is behind the sharded weights
        self._last = time.monotonic()
        if ranks.distributed:
            log.info("learner rank %d of %d: the student on %s (%s, %s)", ranks.rank, ranks.world, ranks.device,
                     ranks.backend, type(forward).__name__)

    def step(self, batch: list[ScoredTrajectory]) -> dict[str, float]:
        """One optimizer step on the batch (over N ranks: all of them, each on its shard)."""
        if self.ranks.distributed:
            from shared.wire import encode

            self._command("step", [encode(m) for m in batch])
            self._stale = True
        return self.trainer.step(batch)

    def probe(self, batch: list[ScoredTrajectory]) -> list[float]:
        """The loss of these trajectories without training (one process only)."""
        return self.trainer.probe(batch)

    def weights(self) -> torch.nn.Module:
        """The plain student with the current weights (rank 0)."""
        if self._stale:
            self._command("weights")
            self.plain.load_state_dict(sharding.full_model_state(self.trainer.forward))
            self._stale = False
        return self.plain

    @contextmanager
    def evaluated(self) -> Iterator[torch.nn.Module]:
        """The current weights for a held-out evaluation, on this rank's device: over N GPU
        ranks rank 0's CPU copy visits its GPU for the evaluation (greedy generation on the
        CPU would be slow, and the other ranks wait in a collective meanwhile)."""
        model = self.weights()
        if not self.ranks.distributed or self.ranks.device == "cpu":
            yield model
            return
        self._command("idle")  # the others' collective timeout starts now, not at the last step
        model.to(self.ranks.device)
        try:
            yield model
        finally:
            model.to("cpu")
            self._command("idle")

    def optimizer_state(self) -> dict[str, Any]:
        """AdamW's state_dict as one process has it (rank 0; over N ranks gathered)."""
        if not self.ranks.distributed:
            return self.trainer.optimizer.state_dict()
        self._command("optimizer")
        return sharding.full_optimizer_state(self.trainer.forward, self.trainer.optimizer, self.names)

    def restore(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint (written by any number of ranks); returns its saved state."""
        if not self.ranks.distributed:
            state = checkpoint.load(path, self.model, self.trainer.optimizer)
        else:
            from shared.weights import load_version

            load_version(self.plain, path)
            optimizer_state, state = checkpoint.read(path)
            fresh = not optimizer_state["state"]  # before the first step: nothing to load
            self._command("restore", state["version"], fresh)
            self._restore(self.plain.state_dict(), None if fresh else optimizer_state)
            self._stale = False
        self.trainer.steps = state["version"]  # the warm-up continues where it was
        return state

    def _restore(self, model_state: dict[str, Any] | None, optimizer_state: dict[str, Any] | None) -> None:
        t = self.trainer
        sharding.load_full_state(t.forward, t.optimizer, self.names, model_state, optimizer_state, self.ranks.leader)

    def keepalive(self) -> None:
        """Rank 0, waiting for data: tell the other ranks now and then."""
        if self.ranks.distributed and time.monotonic() - self._last > KEEPALIVE_S:
            self._command("idle")

    def close(self) -> None:
        """Rank 0: the run is over; the other ranks exit."""
        if self.ranks.distributed:
            self._command("stop")

    def _command(self, name: str, *args: Any) -> None:
        self.ranks.broadcast((name, args))
        self._last = time.monotonic()

    def serve(self) -> None:
        """Ranks 1..N-1: do rank 0's commands until it says stop."""
        from shared.wire import ScoredTrajectory, decode

        while True:
            name, args = self.ranks.broadcast()
            if name == "stop":
                return
            if name == "step":
                self.trainer.step([decode(p, ScoredTrajectory) for p in args[0]])
            elif name == "weights":
                sharding.full_model_state(self.trainer.forward)
            elif name == "optimizer":
                sharding.full_optimizer_state(self.trainer.forward, self.trainer.optimizer, self.names)
            elif name == "restore":
                version, fresh = args
                self._restore(None, None if fresh else {})
                self.trainer.steps = version
            elif name != "idle":
                raise RuntimeError(f"unknown command {name!r} from rank 0")
