"""Settings every service shares (Redis, run name, HTTP port, health), as a pydantic-settings base.

Each service subclasses `ServiceSettings` with its own env prefix (`OPD_ROLLOUT_`,
`OPD_TEACHER_`, `OPD_LEARNER_`); the shared fields default to the unprefixed `REDIS_URL`,
`OPD_RUN` and `OPD_WEIGHTS_DIR` so one environment configures a whole deployment. Every
field is documented once, by the docstring under it, which `--help` prints.
Settings are built in `main()` (`parse(...)`) and passed down: nothing reads them at import.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Literal, TypeVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)


# Unprefixed variables every service reads, and the setting each one provides the default of.
SHARED_ENV = {"REDIS_URL": "redis_url", "OPD_RUN": "run", "OPD_WEIGHTS_DIR": "weights_dir"}


def _env(name: str, default: str) -> Callable[[], str]:
    """Default read from an unprefixed variable shared by all services (REDIS_URL, ...);
    the prefixed one (OPD_LEARNER_RUN) and the flag still take precedence."""
    def read() -> str:
        return os.environ.get(name, default)
    read.__name__ = f"${name}"
    return read


def _replica_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        use_attribute_docstrings=True, cli_kebab_case=True, cli_implicit_flags=True,
        extra="ignore",
    )

    redis_url: str = Field(default_factory=_env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    """Redis server URL, `redis://[:password@]host:port/db` (also env REDIS_URL)."""
    run: str = Field(default_factory=_env("OPD_RUN", "default"))
    """Run name: namespaces every stream and key, so runs can share one Redis (also env OPD_RUN);
    letters, digits, '_', '.', '-'."""
    weights_dir: str = Field(default_factory=_env("OPD_WEIGHTS_DIR", "runs/default/weights"))
    """Directory shared by learner and rollouts holding published weight versions (also env OPD_WEIGHTS_DIR)."""
    replica: str = Field(default_factory=_replica_name)
    """Name of this replica in metrics and consumer groups (default host-pid)."""
    http_host: str = "0.0.0.0"
    """Address the /healthz and /metrics server binds to."""
    http_port: int = 8000
    """Port of the /healthz and /metrics server (0: pick a free one)."""
    health_max_age_s: float = 120.0
    """/healthz fails when the service loop made no progress for this long."""
    reclaim_idle_s: float = 60.0
    """Entries pending this long with a consumer are presumed lost and reclaimed."""
    max_deliveries: int = Field(default=5, ge=0)
    """An entry delivered this many times without being handed off (it keeps failing or killing
    its consumers) is dead-lettered when next reclaimed (0: no cap)."""
    dead_letter_max_entries: int = Field(default=10_000, ge=1)
    """The dead-letter stream keeps about this many newest entries (totals stay in the run's
    `produced` hash and opd_errors_total)."""
    dead_letter_max_payload_bytes: int = Field(default=65_536, ge=0)
    """Bytes of each dead-lettered message kept with its reason (its full size is recorded)."""
    device: str = "auto"
    """Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1..."""
    torch_threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    gpu_memory_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Cap on this process's CUDA memory as a fraction of its GPU (torch's caching allocator;
    0: no cap), so services sharing one GPU fit; vLLM engines use gpu_memory_utilization."""

    @field_validator("run")
    @classmethod
    def _run(cls, value: str) -> str:
        from shared.keys import check_run_name

        return check_run_name(value)


class ScoringSettings(ServiceSettings):
    """Memory and precision of the services that run a model over whole trajectories (teacher, learner)."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Model precision. Teacher: weights in this dtype. Learner: bfloat16 runs forward and backward
    under autocast while weights and AdamW state stay float32. Log-prob and loss maths are float32."""
    logprob_chunk_tokens: int = Field(default=1024, ge=0)
    """Positions per [chunk, V] block of the chunked log-prob kernel (shared/logprobs.py): peak
    logits memory ~ 2 x chunk x V x 4 bytes; 0: the dense path, a full [B, T, V] log_softmax."""
    max_tokens_per_microbatch: int = Field(default=8192, ge=0)
    """Padded tokens (rows x longest prompt+completion) per forward pass; a step's or a teacher
    batch's trajectories are split by this budget (0: all in one pass)."""


def parse(cls: type[S], argv: list[str] | None) -> S:
    """Build settings from defaults < environment < command-line flags."""
    return CliApp.run(cls, cli_args=argv if argv is not None else [])


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
