"""Drafts derived from the target itself: a low-bit copy and/or a layer-skip subset, sharing embeddings and head."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..quantizers import AwqLinear
from .enable import enable_speculative

logger = logging.getLogger(__name__)


def self_draft(
    target: PreTrainedModel,
    bits: int | None = 4,
    group_size: int = 128,
    layers: int | Sequence[int] | None = None,
    quantize_head: bool = True,
) -> PreTrainedModel:
    """A draft model built from ``target``'s own weights; no second checkpoint.

    The draft keeps the chosen decoder layers (all by default) and shares the target's embedding, final norm and
    rotary tables. With ``bits`` its linear layers become our packed AWQ linears, quantized round-to-nearest per
    group of ``group_size`` inputs (the int4 CPU/Triton kernels then read a quarter of the bytes). Layers that are
    already quantized are shared as they are. Float weights the draft keeps are shared with the target, so a
    layer-skip draft costs no memory for them. ``target`` is enabled for our speculative decoding.

    Args:
        target: a decoder-only causal LM whose base model has a ``layers`` list (Llama, Qwen2, Mistral, Gemma ...).
        bits: weight bits of the draft's linears (2..8), or None to keep them as they are.
        group_size: quantization group along the input features (falls back to per-channel where it does not
            divide a layer).
        layers: how many decoder layers to keep (evenly spaced, first and last included) or their indices;
            None keeps all.
        quantize_head: quantize the LM head too (with ``bits``); it is a large share of a small model's bytes.

    Returns:
        The draft, in eval mode on the target's device: pass it as ``generate(assistant_model=...)``.
    """
    if not isinstance(target, PreTrainedModel):
        raise TypeError(f"self_draft takes a transformers PreTrainedModel, got {type(target).__name__}.")
    decoder = target.base_model
    source_layers = getattr(decoder, "layers", None)
    if not isinstance(source_layers, nn.ModuleList):
        raise ValueError(f"self_draft needs a decoder with a `layers` ModuleList; {type(target).__name__} has none.")
    keep = _kept_layers(layers, len(source_layers))
    if bits is None and len(keep) == len(source_layers):
        raise ValueError("self_draft with bits=None and all layers would be the target itself; set bits or layers.")
    if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 8):
        raise ValueError(f"bits must be an int in 2..8 or None, got {bits!r}.")

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        draft = type(target)._from_config(config)
    # Everything the draft does not rebuild is shared: embedding, final norm, rotary tables, other buffers.
    for name, child in decoder.named_children():
        if name != "layers":
            draft.base_model.set_submodule(name, child)
    draft.base_model.layers = nn.ModuleList(_shared_clone(source_layers[i]) for i in keep)
    for new_index, layer in enumerate(draft.base_model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    head = target.get_output_embeddings()
    draft.set_output_embeddings(head)
    if bits is not None:
        _quantize_linears(draft.base_model.layers, bits, group_size)
        if quantize_head and type(head) is nn.Linear:
            draft.set_output_embeddings(_quantized(head, bits, group_size))
    draft.generation_config = copy.deepcopy(target.generation_config)
    leftover = [name for name, tensor in [*draft.named_parameters(), *draft.named_buffers()] if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"self_draft left tensors unset for {type(target).__name__}: {leftover[:5]}")
    logger.info("self-draft: %d of %d layers, bits=%s", len(keep), len(source_layers), bits)
    enable_speculative(target)
    return draft.eval()


def _kept_layers(layers: int | Sequence[int] | None, total: int) -> list[int]:
    if layers is None:
        return list(range(total))
    if isinstance(layers, int):
        if not 1 <= layers <= total:
            raise ValueError(f"layers must be in 1..{total} (the target's layer count), got {layers}.")
        if layers == 1:
            return [0]
        return sorted({round(i * (total - 1) / (layers - 1)) for i in range(layers)})
    indices = sorted(set(int(i) for i in layers))
    if not indices or indices[0] < 0 or indices[-1] >= total:
        raise ValueError(f"layer indices must be distinct values in 0..{total - 1}, got {list(layers)}.")
    return indices


def _shared_clone(module: nn.Module) -> nn.Module:
    """A new module tree holding the same parameter and buffer tensors (so edits to the tree leave the source)."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: _shared_clone(child) if child is not None else None for name, child in module._modules.items()}
    return clone


def _quantized(linear: nn.Linear, bits: int, group_size: int) -> AwqLinear:
    group = group_size if linear.in_features % group_size == 0 else -1
    return AwqLinear.from_linear(linear, bits, group)


def _quantize_linears(root: nn.Module, bits: int, group_size: int) -> None:
    linears = [(name, module) for name, module in root.named_modules() if type(module) is nn.Linear]
    for name, module in tqdm(linears, desc=f"self-draft: {bits}-bit linears", unit="layer", leave=False):
        root.set_submodule(name, _quantized(module, bits, group_size))
