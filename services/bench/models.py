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


def random_checkpoint(size: str, out: str | Path, vocab_size: int = 151936, dtype: str = "bfloat16") -> str:
    """Write a random-init Qwen2 checkpoint (+ the built-in tokenizer) to `out`; returns it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from shared.models import builtin_path, load_tokenizer

    tok = load_tokenizer(builtin_path("student"))
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **SIZES[size])
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
