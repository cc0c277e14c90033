"""Tiny Llama configs for the built-in student/teachers, and loading of any checkpoint.

The built-in checkpoints live in ``shared/assets/<role>/`` as ordinary Hugging Face model
dirs (config.json, model.safetensors, tokenizer files), produced by ``shared.pretrain``
(its docstring has the commands). Anywhere a model name is accepted, ``"builtin:<role>"``
names them; any other string is passed to ``from_pretrained`` unchanged (a local path or a
hub id), so a real checkpoint drops in. The roles, all with one shared tokenizer:

* ``student``: the small student init, weak on addition (``shared.task``)
* ``teacher``: the addition teacher
* ``list-teacher``: the list-manipulation teacher (``shared.list_task``), same size

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

Role = Literal["student", "teacher", "list-teacher"]
BUILTIN_PREFIX = "builtin:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# Sizes chosen so the teacher learns addition to >0.95 in a few CPU minutes while the
# student (half the width) is cheap to sample from and still has room to improve.
_TEACHER_SIZE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                 "num_attention_heads": 4}
_SIZES: dict[str, dict[str, int]] = {
    "teacher": _TEACHER_SIZE,
    # 32-dim attention heads in all: the smallest head size vLLM's CPU and GPU attention accept
    "student": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 2},
    "list-teacher": _TEACHER_SIZE,
}
ROLES = tuple(_SIZES)


def _check_role(role: str) -> None:
    if role not in _SIZES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


def tiny_config(role: Role, vocab_size: int, pad_id: int, bos_id: int,
                eos_id: int) -> "LlamaConfig":
    """A small Llama config for the given role and tokenizer special ids."""
    from transformers import LlamaConfig

    _check_role(role)
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
    _check_role(role)
    return str(ASSETS_DIR / role)


def resolve_model(name: str) -> str:
    """Map ``builtin:<role>`` (student, teacher, list-teacher) to its path; others as is."""
    if name.startswith(BUILTIN_PREFIX):
        role = name[len(BUILTIN_PREFIX):]
        if role not in _SIZES:
            raise ValueError(f"unknown built-in model {name!r}; valid: "
                             + ", ".join(BUILTIN_PREFIX + r for r in ROLES))
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
