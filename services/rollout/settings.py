"""Rollout settings (env prefix OPD_ROLLOUT_; shared fields in shared/settings.py).

    opd-rollout --help
"""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class RolloutSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_ROLLOUT_", cli_prog_name="opd-rollout")

    model: str = "builtin:student"
    """Student architecture + initial weights: a local HF checkpoint dir, hub id, or builtin:student."""
    backend: str = "transformers"
    """Generation engine: transformers (embedded default, CPU or CUDA) or vllm."""
    gpu_memory_utilization: float = 0.85
    """vllm backend: fraction of GPU memory for weights + KV cache."""
    http_port: int = 8001
    """Port of the /healthz and /metrics server (0: pick a free one)."""
    batch_size: int = 32
    """Prompts generated together in one batch."""
    max_new_tokens: int = 8
    """Completion length cap (tokens, EOS included)."""
    temperature: float = 1.0
    """Sampling temperature (OPD samples at 1.0: behaviour log-probs are then the raw ones)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    mc_samples: int = 1
    """Tokens recorded per position: the sampled one plus mc_samples-1 extra draws from mu."""
    max_backlog: int = 256
    """Backpressure: wait while the trajectories stream holds this many unconsumed entries."""
    seed: int = 0
    """Sampling seed (each replica adds a hash of its name)."""
