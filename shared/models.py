"""Tiny Llama configs for the built-in student/teacher, and loading of any checkpoint.

The built-in checkpoints live in ``shared/assets/<role>/`` as ordinary Hugging Face model
dirs (config.json, model.safetensors, tokenizer files), produced by
``python -m shared.pretrain --out shared/assets``. Anywhere a model name is accepted,
``"builtin:student"`` / ``"builtin:teacher"`` name them; any other string is passed to
``from_pretrained`` unchanged (a local path or a hub id), so a real checkpoint drops in.

Usage::

    from shared.models import load_model, load_tokenizer, resolve_model
    path = resolve_model("builtin:teacher")
    model, tok = load_model(path), load_tokenizer(path)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

Role = Literal["student", "teacher"]
BUILTIN_PREFIX = "builtin:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# Sizes chosen so the teacher learns addition to >0.95 in a few CPU minutes while the
# student (half the width) is cheap to sample from and still has room to improve.
_SIZES: dict[str, dict[str, int]] = {
    "teacher": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                "num_attention_heads": 4},
    # 32-dim attention heads in both: the smallest head size vLLM's CPU and GPU attention accept
    "student": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 2},
}


def tiny_config(role: Role, vocab_size: int, pad_id: int, bos_id: int,
                eos_id: int) -> "LlamaConfig":
    """A small Llama config for the given role and tokenizer special ids."""
    from transformers import LlamaConfig

    if role not in _SIZES:
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=64,  # prompts+completions are < 20 tokens
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,  # halves the tiny models' embedding parameters
        attention_dropout=0.0,
        **_SIZES[role],
    )


def builtin_path(role: Role) -> str:
    """Absolute path of the shipped checkpoint dir ``shared/assets/<role>/``."""
    if role not in _SIZES:
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    return str(ASSETS_DIR / role)


def resolve_model(name: str) -> str:
    """Map ``builtin:student`` / ``builtin:teacher`` to their paths; return others as is."""
    if name.startswith(BUILTIN_PREFIX):
        role = name[len(BUILTIN_PREFIX):]
        if role not in _SIZES:
            raise ValueError(f"unknown built-in model {name!r}")
        return builtin_path(role)  # type: ignore[arg-type]
    return name


def load_model(name_or_path: str, *, device: str = "cpu",
               dtype: str = "float32") -> "PreTrainedModel":
    """Load a causal LM (``builtin:`` names accepted) onto ``device`` in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name_or_path), dtype=getattr(torch, dtype)
    )
    return model.to(device).eval()


def load_tokenizer(name_or_path: str) -> "PreTrainedTokenizerBase":
    """Load the tokenizer saved next to a model (``builtin:`` names accepted)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def enable_activation_checkpointing(model: "PreTrainedModel") -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant);
    transformers' newer name for gradient checkpointing where it exists."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
