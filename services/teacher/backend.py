"""Teacher backends: what the teacher loop needs from a scoring engine.

`score` turns trajectories into the finite teacher-score cache (TeacherScores). The
`transformers` backend is the embedded default; `vllm` (services/teacher/vllm_backend.py)
is the production engine. Both emit the same wire messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from services.teacher.settings import TeacherSettings
    from shared.wire import TeacherScores, Trajectory


class TeacherBackend(Protocol):
    vocab_size: int

    def score(self, trajectories: list[Trajectory]) -> list[TeacherScores]:
        """Top-k ids + log-probs, tail mass, log p of sampled/MC tokens (and draws) per position."""


class TransformersTeacher:
    def __init__(self, settings: TeacherSettings, device: str) -> None:
        import torch

        from shared.models import load_model, load_tokenizer, resolve_model

        path = resolve_model(settings.model)
        self.model = load_model(path, device=device, dtype=settings.dtype)
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.pad_id = int(load_tokenizer(path).pad_token_id)
        self.s = settings
        self.generator = torch.Generator(device=device).manual_seed(settings.seed)

    def score(self, trajectories: list[Trajectory]) -> list[TeacherScores]:
        from services.teacher.scorer import score

        return score(self.model, trajectories, top_k=self.s.top_k, pad_id=self.pad_id,
                     draws=self.s.draws, generator=self.generator, name=self.s.model,
                     replica=self.s.replica, chunk_tokens=self.s.logprob_chunk_tokens,
                     max_tokens_per_microbatch=self.s.max_tokens_per_microbatch)


def make_backend(settings: TeacherSettings, device: str) -> TeacherBackend:
    if settings.backend == "transformers":
        return TransformersTeacher(settings, device)
    if settings.backend == "vllm":
        from services.teacher.vllm_backend import VLLMTeacher

        return VLLMTeacher(settings, device)
    raise ValueError(f"unknown teacher backend {settings.backend!r}; use transformers or vllm")
