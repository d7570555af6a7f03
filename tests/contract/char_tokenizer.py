"""A character-level tokenizer for the tiny contract models (vocabulary 256, built offline)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII characters map to ids 4.. (all below 256); other characters to ``<unk>``."""
    vocab = dict(_SPECIALS)
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


CALIBRATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Quantization maps real weights to a few integer levels per group. " * 5,
    "def add(a, b):\n    return a + b\n" * 8,
]
