"""Cache and mask helpers shared by the draft and the verification loop."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache


def new_cache(model) -> Cache:
    """An empty cache for ``model``: its own kind when it makes one (``model.new_cache()``: recurrent-state models
    such as GLA), else a ``DynamicCache``."""
    make = getattr(model, "new_cache", None)
    return make() if callable(make) else DynamicCache(config=model.config)


def crop_to(cache: Cache, length: int) -> None:
    """Keep the first ``length`` positions of every layer of ``cache``."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def can_select_rows(cache: Cache) -> bool:
    """Whether every layer of ``cache`` can drop batch rows (``batch_select_indices``)."""
    return all(hasattr(layer, "batch_select_indices") for layer in getattr(cache, "layers", [None]))


def check_croppable(cache: Cache, who: str) -> None:
    """ValueError unless every layer of ``cache`` can be cropped (speculation rolls rejected tokens back)."""
    stuck = [type(layer).__name__ for layer in getattr(cache, "layers", []) if not getattr(layer, "is_croppable", True)]
    if stuck:
        raise ValueError(
            f"Speculative decoding rolls the {who} cache back after each verification, but its layers "
            f"{sorted(set(stuck))} cannot be cropped. Use a croppable cache (DynamicCache, the default) for the {who}."
        )


def check_maskable(cache: Cache, who: str, batch: int) -> None:
    """ValueError when a batch's rejected drafts cannot be masked out of ``cache``: batched verification leaves them
    as masked slots, which layers with ``masks_past_slots = False`` (recurrent states, convolution histories)
    cannot skip."""
    stuck = [type(layer).__name__ for layer in getattr(cache, "layers", []) if not getattr(layer, "masks_past_slots",
                                                                                            True)]
    if batch > 1 and stuck:
        raise ValueError(
            f"Batched speculative decoding masks each row's rejected drafts out of the {who} cache, but its layers "
            f"{sorted(set(stuck))} cannot skip masked slots (a recurrent state has already absorbed them; a "
            f"convolution's input history would shift every later token). Generate one row at a time (batch 1 "
            f"rolls rejected drafts back exactly), got batch {batch}."
        )


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, slots]`` 0/1 mask -> position ids as ``generate`` makes them: real tokens before each slot, 0 on
    masked slots. (A prompt ending in a masked token thus continues from position 1, as ``generate`` does.)"""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


def mask_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    """``generate`` drops an all-ones mask (a faster causal path); doing the same keeps logits bit-identical."""
    return None if bool(mask.all()) else mask
