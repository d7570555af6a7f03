"""Quantization methods. Each method package has config.py, quantizer.py, its algorithm and modules.py."""

from __future__ import annotations

from .awq.config import AwqConfig
from .awq.modules import AwqLinear
from .awq.quantizer import AwqHfQuantizer, attach_quantizer, quantize_awq_
from .bipolar.config import BipolarIntConfig
from .bipolar.modules import BipolarIntLinear
from .bipolar.quantizer import BipolarIntHfQuantizer, quantize_bipolar_
from .comet.config import W4A4KV4Config
from .comet.modules import W4AxLinear
from .comet.quantizer import W4A4KV4HfQuantizer, quantize_w4a4kv4_

__all__ = ["AwqConfig", "AwqHfQuantizer", "AwqLinear", "BipolarIntConfig", "BipolarIntHfQuantizer",
           "BipolarIntLinear", "W4A4KV4Config", "W4A4KV4HfQuantizer", "W4AxLinear", "quantize"]

# Config type -> (in-place quantize function, transformers quantizer).
_METHODS = {
    AwqConfig: (quantize_awq_, AwqHfQuantizer),
    BipolarIntConfig: (quantize_bipolar_, BipolarIntHfQuantizer),
    W4A4KV4Config: (quantize_w4a4kv4_, W4A4KV4HfQuantizer),
}


def quantize(model, config, calibration_data=None, tokenizer=None):
    """Quantize a loaded ``PreTrainedModel`` in place, as ``from_pretrained(..., quantization_config=config)`` would.

    Args:
        model: a float ``PreTrainedModel`` (not yet quantized).
        config: a quantization config of ours, e.g. ``AwqConfig(bits=4, group_size=128)``.
        calibration_data: a list of documents, a packaged text name (``"wiki"``), or token ids
            ``[n_samples, seq_len]``; defaults to ``config.calibration``.
        tokenizer: tokenizer for text calibration data (default: ``config.tokenizer`` or the model folder's).

    Returns:
        The method's calibration report (None when nothing was calibrated). Afterwards ``model.save_pretrained``
        writes a checkpoint that ``AutoModelForCausalLM.from_pretrained`` reloads bit-identically.
    """
    if type(config) not in _METHODS:
        supported = ", ".join(cls.__name__ for cls in _METHODS)
        raise TypeError(f"hf_plugins.quantize supports {supported}; got {type(config).__name__}.")
    if getattr(model, "is_quantized", False):
        raise ValueError(
            f"the model is already quantized ({getattr(model, 'quantization_method', '?')}); quantize a float model."
        )
    quantize_fn, quantizer_cls = _METHODS[type(config)]
    resolved, report = quantize_fn(model, config, calibration_data=calibration_data, tokenizer=tokenizer)
    attach_quantizer(model, resolved, quantizer_cls)
    return report
