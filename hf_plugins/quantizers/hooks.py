"""Callbacks run on a model once one of our quantizers is done with it; ``hf_plugins._registry`` fills the list.

Quantizers must not import the packages that use them (generation, parallel), so those register here instead.
"""

from __future__ import annotations

from collections.abc import Callable

ON_QUANTIZED_MODEL: list[Callable] = []


def run_on_quantized_model(model) -> None:
    """Call every registered callback with the freshly quantized (or reloaded) ``model``."""
    for callback in ON_QUANTIZED_MODEL:
        callback(model)
