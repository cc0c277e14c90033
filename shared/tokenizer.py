"""A real, offline-trained tokenizer for the built-in task, wrapped for ``transformers``.

BPE trained with the ``tokenizers`` library; numbers are pre-split into single digits so
every digit is its own token (digit-level arithmetic is what the tiny models can learn).
Special tokens are ``<pad>``, ``<bos>``, ``<eos>``. Layout conventions used everywhere:

* prompt ids     = ``<bos>`` + prompt tokens   (``tokenizer(prompt)`` adds the ``<bos>``)
* completion ids = answer tokens + ``<eos>``   (see ``encode_completion``)

Decoding concatenates tokens with no separator, so ``decode(encode(text)) == text``.
The result saves/loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.

Usage::

    from shared.tokenizer import train_tokenizer
    tok = train_tokenizer(["123+45=168"])
    tok.save_pretrained("some/dir")
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
# Always in the alphabet, even if the training texts happen to miss some, so any
# problem of the task (and any model answer) is encodable without an unknown token.
BASE_ALPHABET = list("0123456789+=")


def _build_backend(texts: Iterable[str], vocab_size: int) -> "object":
    """Train the raw ``tokenizers.Tokenizer`` (BPE, digit-split, fused decoding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Digits individually, then every other punctuation char alone: merges can then only
    # form inside non-digit, non-punctuation runs (e.g. words), never across numbers.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation("isolated")]
    )
    # Fuse joins tokens with no separator; the default would insert spaces.
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=BASE_ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prompts always start with <bos>; doing it in the post-processor means plain
    # ``tokenizer(prompt)`` calls in every service get the same layout.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 64) -> "PreTrainedTokenizerFast":
    """Train the task tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    backend = _build_backend(texts, vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def encode_prompt(tokenizer: "PreTrainedTokenizerFast", prompt: str) -> list[int]:
    """``<bos>`` + prompt tokens."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_completion(tokenizer: "PreTrainedTokenizerFast", answer: str) -> list[int]:
    """Answer tokens + ``<eos>`` (no ``<bos>``): the target a model should generate."""
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return ids + [int(tokenizer.eos_token_id)]
