"""Turn calibration text into fixed-length token blocks, as AWQ does (concatenate, then cut)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def resolve_texts(calibration) -> list[str]:
    """A packaged text name (calibration split only) or a list of documents -> list of documents."""
    if isinstance(calibration, str):
        from ..assets import load_text

        return load_text(calibration, split="calibration")
    return list(calibration)


def calibration_blocks(texts: list[str], tokenizer, n_samples: int, seq_len: int) -> torch.LongTensor:
    """Tokenize ``texts``, concatenate them and cut ``n_samples`` blocks of ``seq_len`` tokens.

    Returns ``[n_samples, seq_len]`` token ids (fewer rows, with a warning, when the text is too short).
    """
    needed = n_samples * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    available = len(ids) // seq_len
    if available == 0:
        raise ValueError(
            f"calibration text has {len(ids)} tokens, fewer than one block of calibration_seq_len={seq_len}; "
            "pass more text or lower calibration_seq_len."
        )
    if available < n_samples:
        logger.warning("calibration text gives %d blocks of %d tokens, fewer than the %d asked for", available, seq_len, n_samples)
    rows = min(available, n_samples)
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).reshape(rows, seq_len)
