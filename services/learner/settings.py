"""Learner settings (env prefix OPD_LEARNER_; shared fields in shared/settings.py).

    opd-learner --help
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class LearnerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_LEARNER_", cli_prog_name="opd-learner")

    model: str = "builtin:student"
    """Student to train: a local HF checkpoint dir, hub id, or builtin:student."""
    http_port: int = 8003
    """Port of the /healthz and /metrics server (0: pick a free one)."""
    batch_size: int = 64
    """Trajectories per optimizer step (B); also the admission-control unit."""
    max_staleness: int = 4
    """Bound on learner version - trajectory version; 0 = strict synchronous training."""
    max_steps: int = 200
    """Optimizer steps before the learner saves the final student and exits (0: run forever)."""
    losses: dict[str, float] = Field(default_factory=lambda: {"fkl_topk": 1.0, "rkl_recompute": 1.0})
    """Estimators and their weights, JSON, e.g. '{"fkl_topk": 1, "rkl_recompute": 1}'; names in services/learner/losses.py."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    prompt_backlog: int = 512
    """The prompt feeder keeps this many prompts queued for the rollouts."""
    prompts_file: str = ""
    """JSONL with {"prompt": ..., "answer": ...} per line; empty: the built-in addition task."""
    keep_versions: int = 3
    """Published weight versions kept on disk (older ones are deleted)."""
    output_dir: str = "runs/default/student"
    """Where the final student (HF checkpoint + tokenizer) is saved when the run ends."""
    fresh: bool = True
    """Start a new run: delete this run's streams and keys in Redis first."""
    seed: int = 0
    """Seed for prompt order and torch."""
