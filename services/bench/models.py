"""Random-initialised checkpoints at realistic sizes for the GPU benchmark preset.

Throughput does not depend on what the weights know, so the GPU preset builds Qwen2-style
models of ~0.5B (student) and ~1.5B (teacher) parameters from config, with random
weights, next to the built-in tokenizer (its ids are valid in the larger vocabulary).
No hub access needed.
"""

from __future__ import annotations

from pathlib import Path

SIZES = {
    # Qwen2.5-0.5B / -1.5B shapes
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    # a small stand-in with the same code path, for trying the preset on a CPU
    "test": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def random_model(size: str, vocab_size: int = 151936, dtype: str = "bfloat16", *, pad_id: int = 0,
                 bos_id: int = 1, eos_id: int = 2, max_positions: int = 4096):
    """A random-init Qwen2 causal LM at one of SIZES (seeded, tied embeddings like Qwen2.5-0.5B)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=True,
                         pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, **SIZES[size])
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(getattr(torch, dtype))


def random_checkpoint(size: str, out: str | Path, vocab_size: int = 151936, dtype: str = "bfloat16") -> str:
    """Write a random-init Qwen2 checkpoint (+ the built-in tokenizer) to `out`; returns it."""
    from transformers.utils import logging as hf_logging

    from shared.models import builtin_path, load_tokenizer

    tok = load_tokenizer(builtin_path("student"))
    hf_logging.disable_progress_bar()
    model = random_model(size, vocab_size, dtype, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                         eos_id=tok.eos_token_id)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
