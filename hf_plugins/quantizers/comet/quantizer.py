"""The transformers quantizer for ``W4A4KV4Config`` and its in-place quantize path (FMPQ, then packing)."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..awq.quantizer import (
    PackedLinearQuantizer,
    calibration_ids,
    linears_to_quantize,
    resolve_skipped_modules,
    resolved_config,
)
from .config import W4A4KV4Config
from .fmpq import collect_input_stats, plan_layer
from .modules import W4AxLinear


def quantize_w4a4kv4_(model, config: W4A4KV4Config, calibration_data=None,
                      tokenizer=None) -> tuple[W4A4KV4Config, dict[str, dict]]:
    """FMPQ on calibration activations (unless the layout is fixed), then every converted linear becomes a
    ``W4AxLinear``, in place.

    Returns the resolved config (exact skipped-module list, no tokenizer or inline text) and a report: per linear,
    its outlier block count and, for ``outlier_blocks="auto"``, the relative output error of each count tried.
    """
    skip = resolve_skipped_modules(model, config)
    names = linears_to_quantize(model, skip)
    stats = {}
    if config.needs_calibration:
        ids, _ = calibration_ids(model, config, calibration_data, tokenizer)
        stats = collect_input_stats(model, ids, names)
    report = {}
    for name in tqdm(names, desc=f"Packing W4A4 g{config.group_size}", unit="linear", leave=False):
        linear = model.get_submodule(name)
        plan = plan_layer(linear.weight.detach(), stats.get(name), config.outlier_blocks, config.group_size)
        model.set_submodule(name, W4AxLinear.from_linear(linear, plan, config.group_size))
        report[name] = {"outlier_blocks": plan.outlier_blocks, "errors": plan.errors}
    return resolved_config(config, skip), report


class W4A4KV4HfQuantizer(PackedLinearQuantizer):
    """The transformers quantizer of ``W4A4KV4Config``."""

    module_cls = W4AxLinear
    quantize_fn = staticmethod(quantize_w4a4kv4_)
    method_name = "W4A4KV4"
