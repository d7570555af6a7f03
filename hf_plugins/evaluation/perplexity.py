"""Corpus perplexity of a causal LM over sliding windows, and the loader of its ``evaluate`` metric.

Window semantics (one document of ``n`` tokens, tokenized without special tokens):

- ``window`` is the model input length of one forward pass, the BOS token included when one is prepended, so
  ``window`` may equal the model's context size. A window holds ``span = window - 1`` document tokens with BOS and
  ``span = window`` without.
- Windows start at document offsets ``0, stride, 2 * stride, ...`` and hold ``span`` tokens each (the last one
  fewer); the first window ending at the document's end is the last (the Hugging Face "perplexity of fixed-length
  models" scheme). ``stride=None`` means ``stride = span``: non-overlapping windows.
- A window scores only the tokens that no earlier window scored: all of the first window, the last ``stride``
  tokens of later ones (fewer in a document's last window); the overlap before them is context (label ``-100``).
  Every token is thus scored at most once, and those of later windows with at least ``span - stride`` document
  tokens of context.
- With BOS, every document token is scored (``n`` per document): the first token of a window is predicted from
  BOS. Without BOS, the first token of a window has nothing to be predicted from: ``n - 1`` tokens are scored per
  document when ``stride < span``, ``n - ceil(n / span)`` when ``stride == span``.
- Documents never share a window, and padding in a batch is masked out, so no document sees another one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import evaluate
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.cache_utils import Cache

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

PERPLEXITY_METRIC_PATH = str(Path(__file__).with_name("perplexity_metric.py"))
"""Path of the ``evaluate`` metric script: ``evaluate.load(PERPLEXITY_METRIC_PATH)`` needs no hub."""


@dataclass(frozen=True)
class PerplexityResult:
    """Corpus perplexity: ``perplexity = exp(nll_sum / n_tokens)``.

    Args:
        perplexity (float): exp of the mean NLL per scored token.
        nll_sum (float): summed negative log-likelihood (nats) of the scored tokens.
        n_tokens (int): number of scored tokens.
        n_windows (int): number of forward windows (each scores at least one token).
    """

    perplexity: float
    nll_sum: float
    n_tokens: int
    n_windows: int


@dataclass(frozen=True)
class _Window:
    """One model input: ``input_ids`` ``[L]`` (BOS first when used); its last ``n_scored`` tokens are targets."""

    input_ids: list[int]
    n_scored: int


def _check_args(texts: Sequence[str], window: int, max_chars: int | None, batch_size: int) -> None:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of documents, got a single str; wrap it as [text].")
    if len(texts) == 0:
        raise ValueError("texts is empty; pass at least one document.")
    if window < 2:
        raise ValueError(f"window={window} is too small: a window needs a context and a target; pass window >= 2.")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars={max_chars} must be >= 1; pass None to keep whole documents.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")


def _resolve_stride(stride: int | None, window: int, span: int) -> int:
    """``stride`` in document tokens; None means non-overlapping windows (``span``)."""
    if stride is None:
        return span
    if not 0 < stride <= span:
        bos_note = " after the BOS token" if span < window else ""
        raise ValueError(
            f"stride={stride} must be in [1, {span}]: window={window} holds {span} document tokens{bos_note}; "
            f"pass a stride in that range, or stride=None for non-overlapping windows."
        )
    return stride


def _prefix_token_id(tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> int | None:
    """The token prepended to every window, or None.

    Tokenizers without a BOS token (e.g. Qwen2/Qwen2.5, whose ``bos_token`` is None) get their EOS token instead,
    whichever it is (``<|endoftext|>`` for Qwen2.5 base models): such families separate pretraining documents with
    EOS, so EOS is what a document start follows. lm-evaluation-harness makes the same choice.
    """
    if not add_bos:
        return None
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        logger.info("tokenizer has no BOS token; prepending EOS (id %d) to every window", tokenizer.eos_token_id)
        return tokenizer.eos_token_id
    raise ValueError(
        "add_bos=True but the tokenizer has neither bos_token_id nor eos_token_id; "
        "set one on the tokenizer or pass add_bos=False."
    )


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_chars: int | None) -> list[list[int]]:
    """Token ids of each document, truncated to ``max_chars`` characters first, without special tokens."""
    docs = [text[:max_chars] for text in texts]
    # verbose=False: documents are meant to exceed model_max_length; windowing takes care of that.
    return tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]


def _document_windows(ids: Sequence[int], span: int, stride: int, prefix: int | None) -> list[_Window]:
    """Split one document's ``ids`` ``[n]`` into windows of ``span`` tokens starting every ``stride`` tokens.

    Each window scores the tokens past the previous window's end; ``prefix`` (BOS) is prepended when not None.
    Windows that would score nothing (a lone first token without BOS) are dropped.
    """
    head = [] if prefix is None else [prefix]
    windows = []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + span, len(ids))
        input_ids = head + list(ids[begin:end])
        # Input position 0 is never a target: nothing precedes it (without BOS it is a document token).
        n_scored = min(end - prev_end, len(input_ids) - 1)
        if n_scored > 0:
            windows.append(_Window(input_ids, n_scored))
        prev_end = end
        if end == len(ids):
            break
    return windows


def _collate(windows: Sequence[_Window], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad windows into ``input_ids``, ``attention_mask`` and ``labels``, each ``[B, L]`` int64.

    Labels hold the scored tokens and ``IGNORE_INDEX`` elsewhere (context, BOS, padding).
    """
    length = max(len(w.input_ids) for w in windows)
    # Any valid id pads: padded positions are masked from attention and are never targets.
    input_ids = torch.zeros(len(windows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(windows), length, dtype=torch.long)
    labels = torch.full((len(windows), length), IGNORE_INDEX, dtype=torch.long)
    for row, w in enumerate(windows):
        size = len(w.input_ids)
        input_ids[row, :size] = torch.tensor(w.input_ids)
        attention_mask[row, :size] = 1
        labels[row, size - w.n_scored : size] = input_ids[row, size - w.n_scored : size]
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def _batch_nll(model: PreTrainedModel, windows: Sequence[_Window], device: torch.device, cache_factory) -> float:
    """Summed NLL (nats) of the scored tokens of ``windows``: per token in fp32 whatever the model dtype, summed in
    float64 so that long corpora do not lose digits."""
    input_ids, attention_mask, labels = _collate(windows, device)
    cache = {"use_cache": False} if cache_factory is None else {"cache": cache_factory(), "use_cache": True}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **cache).logits  # [B, L, V]
    # Position t predicts token t + 1; ignored labels get a zero loss.
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B * (L - 1)]
    return nll.double().sum().item()


def _corpus_nll(model: PreTrainedModel, windows: Sequence[_Window], batch_size: int, progress: bool,
                cache_factory) -> float:
    """Summed NLL (nats) over all ``windows``, ``batch_size`` per forward pass on the model's device."""
    device = next(model.parameters()).device
    # Dropout off for the measurement; the caller's mode is restored so that evaluating mid-training is harmless.
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                nll_sum += _batch_nll(model, batch, device, cache_factory)
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return nll_sum


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    window: int = 512,
    stride: int | None = None,
    max_chars: int | None = None,
    add_bos: bool = True,
    batch_size: int = 1,
    progress: bool = True,
    cache_factory: Callable[[], Cache] | None = None,
) -> PerplexityResult:
    """Corpus perplexity of a causal LM on ``texts`` with sliding windows (semantics in the module docstring).

    Args:
        model (PreTrainedModel):
            a causal LM returning ``logits [B, L, V]``; run on its own device, in eval mode (restored afterwards).
        tokenizer (PreTrainedTokenizerBase):
            its tokenizer; documents are tokenized without special tokens.
        texts (Sequence[str]):
            the documents; each is windowed on its own.
        window (int):
            model input length per forward pass, BOS included. Default: 512.
        stride (int, Optional):
            new tokens scored per window, in ``[1, window - 1]`` with BOS, ``[1, window]`` without.
            Default: None (non-overlapping windows).
        max_chars (int, Optional):
            keep only the first ``max_chars`` characters of each document. Default: None.
        add_bos (bool):
            prepend BOS (EOS when the tokenizer has no BOS) to every window. Default: True.
        batch_size (int):
            windows per forward pass, right-padded. Default: 1.
        progress (bool):
            show a tqdm bar over windows. Default: True.
        cache_factory (Callable[[], Cache], Optional):
            a fresh cache per forward pass, which the window's attention then reads its keys and values from (e.g.
            ``lambda: KV4Cache(model.config)`` scores text as a 4-bit KV cache would see it). Default: None (no
            cache).

    Returns:
        PerplexityResult: ``exp(nll_sum / n_tokens)``; per-token NLL in fp32, summed in float64.

    >>> result = perplexity(model, tokenizer, docs, window=512, max_chars=6000)
    >>> result.perplexity, result.n_tokens
    """
    _check_args(texts, window, max_chars, batch_size)
    prefix = _prefix_token_id(tokenizer, add_bos)
    span = window - (prefix is not None)
    stride = _resolve_stride(stride, window, span)
    docs = _tokenize(tokenizer, texts, max_chars)
    windows = [w for ids in docs for w in _document_windows(ids, span, stride, prefix)]
    if not windows:
        raise ValueError(
            "no token to score: every document is empty or a single token without BOS; "
            "pass longer texts or add_bos=True."
        )
    nll_sum = _corpus_nll(model, windows, batch_size, progress, cache_factory)
    n_tokens = sum(w.n_scored for w in windows)
    return PerplexityResult(math.exp(nll_sum / n_tokens), nll_sum, n_tokens, len(windows))


def load_perplexity_metric(*, keep_in_memory: bool = True, **load_kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the shipped perplexity metric script, from its local path (no hub access).

    ``keep_in_memory`` (default True) keeps the predictions out of evaluate's on-disk Arrow cache; pass False for
    multi-process evaluation. Other keyword arguments go to ``evaluate.load`` (``cache_dir``, ``experiment_id``, ...).
    """
    # Imported here: evaluate pulls in datasets and pyarrow, seconds of import time.
    import evaluate

    return evaluate.load(PERPLEXITY_METRIC_PATH, keep_in_memory=keep_in_memory, **load_kwargs)
