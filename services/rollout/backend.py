"""Rollout backends: what the rollout loop needs from a generation engine.

A backend loads published weight versions in place and samples completions, returning
`Sample`s with behaviour log-probs (and MC draws). `transformers` is the embedded default
(CPU, or CUDA when present); `vllm` (services/rollout/vllm_backend.py) is the production
engine. Both emit the same wire messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from services.rollout.sampler import Sample
    from services.rollout.settings import RolloutSettings


class RolloutBackend(Protocol):
    eos_id: int
    pad_id: int
    vocab_size: int  # prompt ids must be below this

    def load_weights(self, path: str) -> None:
        """Load a published version directory (model.safetensors) without restarting."""

    def generate(self, prompts: Sequence[np.ndarray]) -> list[Sample]:
        """One completion per prompt, with the settings' sampling parameters."""


class TransformersRollout:
    """HF transformers model + the KV-cache sampler in services/rollout/sampler.py."""

    def __init__(self, settings: RolloutSettings, device: str, seed: int) -> None:
        import torch

        from shared.models import load_model, load_tokenizer, resolve_model

        path = resolve_model(settings.model)
        self.model = load_model(path, device=device)
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        tok = load_tokenizer(path)
        self.eos_id, self.pad_id = int(tok.eos_token_id), int(tok.pad_token_id)
        self.s = settings
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def load_weights(self, path: str) -> None:
        from shared.weights import load_version

        load_version(self.model, path)

    def generate(self, prompts: Sequence[np.ndarray]) -> list[Sample]:
        from services.rollout.sampler import sample

        return sample(self.model, prompts, eos_id=self.eos_id, pad_id=self.pad_id,
                      max_new_tokens=self.s.max_new_tokens, mc_samples=self.s.mc_samples,
                      temperature=self.s.temperature, top_p=self.s.top_p, generator=self.generator)


def make_backend(settings: RolloutSettings, device: str, seed: int) -> RolloutBackend:
    if settings.backend == "transformers":
        return TransformersRollout(settings, device, seed)
    if settings.backend == "vllm":
        from services.rollout.vllm_backend import VLLMRollout

        return VLLMRollout(settings, device, seed)
    raise ValueError(f"unknown rollout backend {settings.backend!r}; use transformers or vllm")
