"""The transformers quantizer for ``BipolarIntConfig`` and its in-place quantize path."""

from __future__ import annotations

from ..awq.quantizer import PackedLinearQuantizer, search_and_pack_
from .config import BipolarIntConfig
from .modules import BipolarIntLinear


def quantize_bipolar_(model, config: BipolarIntConfig, calibration_data=None,
                      tokenizer=None) -> tuple[BipolarIntConfig, object]:
    """AWQ's searches when asked (on the integer grid), then every converted linear becomes a
    ``BipolarIntLinear``, in place. Returns the resolved config and the AWQ report (None for RTN)."""
    label = f"Packing bipolar W{config.w_bits}" + (f"A{config.a_bits}" if config.a_bits else "")
    return search_and_pack_(
        model, config,
        lambda linear: BipolarIntLinear.from_linear(linear, config.w_bits, config.a_bits, config.group_size),
        label, config.awq_search(), calibration_data, tokenizer,
    )


class BipolarIntHfQuantizer(PackedLinearQuantizer):
    """The transformers quantizer of ``BipolarIntConfig``."""

    module_cls = BipolarIntLinear
    quantize_fn = staticmethod(quantize_bipolar_)
    method_name = "bipolar-INT"
