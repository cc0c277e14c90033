"""Teacher settings (env prefix OPD_TEACHER_; shared fields in shared/settings.py).

    opd-teacher --help
"""

from __future__ import annotations

from pydantic import field_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ScoringSettings


class TeacherSettings(ScoringSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_TEACHER_", cli_prog_name="opd-teacher")

    model: str = "builtin:teacher"
    """Teacher checkpoint: a local HF checkpoint dir, hub id, or builtin:teacher."""
    teacher_id: str = ""
    """Which prompts' teacher this pool is: it scores only trajectories whose prompt carries
    this teacher_id (stream `trajectories:<teacher_id>`); empty: prompts without one."""
    backend: str = "transformers"
    """Scoring engine: transformers (embedded default, CPU or CUDA) or vllm."""
    gpu_memory_utilization: float = 0.85
    """vllm backend: fraction of GPU memory for weights + KV cache."""
    http_port: int = 8002
    """Port of the /healthz and /metrics server (0: pick a free one)."""
    top_k: int = 64
    """Teacher top-k cached per position (capped at the vocabulary size)."""
    draws: int = 0
    """Tokens drawn from the teacher per position (for fkl_teacher_sampled); 0: none."""
    seed: int = 0
    """Seed for the teacher draws."""
    batch_size: int = 64
    """Trajectories read and scored per batch (in micro-batches of max_tokens_per_microbatch)."""
    max_backlog: int = 256
    """Backpressure: wait while the scored stream holds this many unconsumed entries."""

    @field_validator("teacher_id")
    @classmethod
    def _teacher_id(cls, value: str) -> str:
        from shared.keys import check_teacher_id

        return check_teacher_id(value)
