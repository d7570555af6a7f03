"""The transformers quantizer for ``AwqConfig`` and the in-place ``quantize`` path both entry points share."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from ..calibration_data import calibration_blocks, resolve_texts
from ..checkpoint import mark_config, unmark_config
from ..hooks import run_on_quantized_model
from .config import CLIP_VALIDATION_SAMPLES, AwqConfig
from .modules import AwqLinear

logger = logging.getLogger(__name__)


def linears_to_quantize(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules a config converts: all but the skipped ones."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, skip)
    ]


def resolve_skipped_modules(model, config: AwqConfig) -> list[str]:
    """The user's skips plus transformers' defaults (output embedding, tied weights, last module) and the model's
    fp32 modules, matched at any depth (``"filter"`` keeps ``model.layers.3.mixer.filter.*``)."""
    keep_fp32 = {*(getattr(model, "_keep_in_fp32_modules", None) or ()),
                 *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())}
    anywhere = [rf"(?:.*\.)?{re.escape(name)}" for name in sorted(keep_fp32)]
    return HfQuantizer.get_modules_to_not_convert(
        model, config.modules_to_not_convert, anywhere or None, add_default_skips=True
    )


def calibration_ids(
    model, config: AwqConfig, calibration_data, tokenizer
) -> tuple[torch.LongTensor, torch.LongTensor | None]:
    """Calibration ids ``[n_samples, seq_len]`` and, for ``clip="auto"`` with calibration text, validation ids from
    the text that follows (None when the text runs out, the caller passed token ids or ``config`` has no clip
    search). Any config with the calibration fields (``calibration``, ``calibration_samples``,
    ``calibration_seq_len``, ``tokenizer``) can use it."""
    data = calibration_data if calibration_data is not None else config.calibration
    if data is None or (isinstance(data, str) and data == "custom"):
        name = type(config).__name__
        raise ValueError(
            f"{name} needs calibration data for its activation-aware searches: pass calibration_data=texts, or set "
            f"{name}(calibration='wiki'), or turn the searches off for plain RTN."
        )
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.long or data.dim() != 2:
            raise ValueError(f"calibration token ids must be a LongTensor [n_samples, seq_len], got {data.dtype} {tuple(data.shape)}.")
        return data, None
    tokenizer = tokenizer or config.tokenizer
    if tokenizer is None:
        tokenizer = _tokenizer_from_model_folder(model)
    n_samples = config.calibration_samples
    n_validation = CLIP_VALIDATION_SAMPLES if getattr(config, "clip", False) == "auto" else 0
    ids = calibration_blocks(resolve_texts(data), tokenizer, n_samples + n_validation, config.calibration_seq_len)
    if ids.shape[0] <= n_samples:
        if n_validation:
            logger.warning(
                "calibration text leaves no validation sequences for clip='auto'; the symmetric clips are kept"
            )
        return ids, None
    return ids[:n_samples], ids[n_samples:]


def _tokenizer_from_model_folder(model):
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None)
    if not source:
        raise ValueError("AWQ calibration text needs a tokenizer: pass tokenizer=... (or AwqConfig(tokenizer=...)).")
    return AutoTokenizer.from_pretrained(source)


def quantize_awq_(model, config: AwqConfig, calibration_data=None, tokenizer=None) -> tuple[AwqConfig, Any]:
    """Calibrate (when asked), then replace every converted linear by an ``AwqLinear``, in place.

    Returns the resolved config (exact skipped-module list, no tokenizer or inline text) and the AWQ report
    (None for RTN).
    """
    search = None
    if config.needs_calibration:
        search = dict(bits=config.bits, group_size=config.group_size, scale_search=config.scale_search,
                      n_grid=config.n_grid, duo_scaling=config.duo_scaling, clip=config.clip,
                      quantized_inputs=config.quantized_inputs)
    return search_and_pack_(
        model, config, lambda linear: AwqLinear.from_linear(linear, config.bits, config.group_size),
        f"Packing W{config.bits} g{config.group_size}", search, calibration_data, tokenizer,
    )


def search_and_pack_(model, config, pack, label: str, search: dict | None, calibration_data=None,
                     tokenizer=None) -> tuple[Any, Any]:
    """Run AWQ's activation-aware searches with ``search`` (``apply_awq`` keyword arguments; None: plain RTN),
    then replace every converted linear by ``pack(linear)``, in place. Any method whose grid is AWQ's integer
    grid (or a lossless rewrite of it) reuses the searches this way.

    ``config`` needs ``modules_to_not_convert``, the calibration fields (``calibration``, ``calibration_samples``,
    ``calibration_seq_len``, ``clip``, ``tokenizer``) and ``with_skipped_modules``. Returns the resolved config
    and the AWQ report (None without a search).
    """
    skip = resolve_skipped_modules(model, config)
    report = None
    if search is not None:
        from .algorithm import apply_awq

        ids, validation_ids = calibration_ids(model, config, calibration_data, tokenizer)
        report = apply_awq(model, ids.to(model.device), validation_ids=validation_ids,
                           modules_to_not_convert=frozenset(skip), **search)
    names = linears_to_quantize(model, skip)
    for name in tqdm(names, desc=label, unit="linear", leave=False):
        model.set_submodule(name, pack(model.get_submodule(name)))
    return resolved_config(config, skip), report


def resolved_config(config, skip: list[str]):
    """What a quantized model records: ``config`` with the exact skipped-module list, no tokenizer and inline
    calibration text recorded as ``"custom"`` (the user's config is not mutated)."""
    resolved = config.with_skipped_modules(skip)
    resolved.tokenizer = None
    if isinstance(resolved.calibration, list):
        resolved.calibration = "custom"
    return resolved


def attach_quantizer(model, config, quantizer_cls: type | None = None) -> None:
    """Make an in-place quantized model look exactly like one loaded from a quantized checkpoint."""
    model.hf_quantizer = (quantizer_cls or AwqHfQuantizer)(config, pre_quantized=True)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config._is_quantized = True
    mark_config(model.config)
    run_on_quantized_model(model)


class PackedLinearQuantizer(HfQuantizer):
    """Shared transformers quantizer of our packed-linear methods: loads their checkpoints (modules built on meta,
    packed tensors loaded as they are) and quantizes float checkpoints inside ``from_pretrained`` after the float
    weights load. A method names its ``module_cls`` (with ``empty_for(linear, config, dtype)``, the module for a
    checkpoint) and its in-place ``quantize_fn(model, config) -> (resolved config, report)``."""

    requires_calibration = False
    module_cls: type
    quantize_fn: Any
    method_name: str

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                f"{self.method_name} models cannot be offloaded to disk (device_map has 'disk'); give the layers "
                "cpu or cuda devices."
            )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        if not self.pre_quantized:
            return model
        skip = self.quantization_config.modules_to_not_convert or []
        for name in linears_to_quantize(model, skip):
            linear = model.get_submodule(name)
            with torch.device("meta"):
                module = self.module_cls.empty_for(linear, self.quantization_config, dtype or linear.weight.dtype)
            model.set_submodule(name, module)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if (getattr(model, "_tp_size", None) or 1) > 1:
            # transformers' styles shard parameters; our modules keep packed codes in buffers with group constraints.
            raise ValueError(
                f"{self.method_name} does not load through from_pretrained(distributed_config=...) tensor "
                "parallelism: load the model on every rank without distributed_config, then call "
                "hf_plugins.parallel.tensor_parallel(model), which shards AWQ layers along whole quantization groups."
            )
        if not self.pre_quantized:
            resolved, _ = type(self).quantize_fn(model, self.quantization_config)
            self.quantization_config = resolved
            model.config.quantization_config = resolved
        mark_config(model.config)
        run_on_quantized_model(model)
        return model

    def _dequantize(self, model, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, self.module_cls):
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                   device=module.scales.device, dtype=dtype or torch.float32)
                with torch.no_grad():
                    linear.weight.copy_(module.dequantized_weight())
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
                model.set_submodule(name, linear)
        unmark_config(model.config)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (LoRA) train on top of the frozen quantized weights."""
        return True


class AwqHfQuantizer(PackedLinearQuantizer):
    """The transformers quantizer of ``AwqConfig``."""

    module_cls = AwqLinear
    quantize_fn = staticmethod(quantize_awq_)
    method_name = "AWQ"
