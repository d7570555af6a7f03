"""Calibration blocks: one per document first, short documents concatenated, further blocks only when needed."""

from __future__ import annotations

import logging

import pytest

from hf_plugins.quantizers.calibration_data import calibration_blocks
from tests.contract.char_tokenizer import char_tokenizer


def _decode(tokenizer, row) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(row.tolist()))


def test_each_long_document_gives_its_first_block_before_any_gives_a_second():
    tokenizer = char_tokenizer()
    texts = ["a" * 25, "b" * 12, "c" * 30]
    blocks = calibration_blocks(texts, tokenizer, n_samples=5, seq_len=10)
    assert [_decode(tokenizer, row) for row in blocks] == ["a" * 10, "b" * 10, "c" * 10, "a" * 10, "c" * 10]


def test_short_documents_are_concatenated_in_order():
    tokenizer = char_tokenizer()
    texts = ["abcd", "efgh", "x" * 10, "ijkl"]
    blocks = calibration_blocks(texts, tokenizer, n_samples=2, seq_len=6)
    assert [_decode(tokenizer, row) for row in blocks] == ["abcdef", "x" * 6]


def test_stops_reading_documents_once_enough_blocks(monkeypatch):
    tokenizer = char_tokenizer()
    seen = []
    original = type(tokenizer).__call__

    def counting_call(self, text, *args, **kwargs):
        seen.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting_call)
    calibration_blocks(["a" * 8, "b" * 8, "c" * 8, "d" * 8], tokenizer, n_samples=2, seq_len=8)
    assert seen == ["a" * 8, "b" * 8]


def test_short_text_gives_fewer_blocks_with_a_warning(caplog):
    tokenizer = char_tokenizer()
    with caplog.at_level(logging.WARNING):
        blocks = calibration_blocks(["a" * 15, "bcd"], tokenizer, n_samples=4, seq_len=5)
    assert [_decode(tokenizer, row) for row in blocks] == ["a" * 5, "a" * 5, "a" * 5]
    assert "gives 3 blocks of 5 tokens, fewer than the 4 asked for" in caplog.text


def test_text_shorter_than_one_block_raises():
    with pytest.raises(ValueError, match="calibration text has 7 tokens, fewer than one block of calibration_seq_len=8"):
        calibration_blocks(["abc", "defg"], char_tokenizer(), n_samples=2, seq_len=8)
