"""LoRA adapters on top of our quantized linears, through PEFT's custom-module extension point.

PEFT only wraps layer classes it knows; ``register_lora(lora_config)`` tells a ``LoraConfig`` how to wrap ours.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraLayer

from .quantizers import AwqLinear, BipolarIntLinear, W4AxLinear

QUANTIZED_LINEAR_CLASSES = (AwqLinear, BipolarIntLinear, W4AxLinear)


class QuantizedLoraLinear(torch.nn.Module, LoraLayer):
    """``y = base(x) + scaling * B(A(dropout(x)))`` with a frozen quantized ``base``; merging is not offered
    because the base weights are integers."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        if config.use_dora:
            raise ValueError("LoRA on hf-plugins quantized layers does not support DoRA; set use_dora=False.")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            update = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora(lora_config):
    """Let ``lora_config`` (a ``peft.LoraConfig``) wrap hf-plugins quantized linears; returns the same config.

    >>> config = hf_plugins.register_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    >>> peft_model = get_peft_model(quantized_model, config)
    """
    lora_config._register_custom_module({cls: QuantizedLoraLinear for cls in QUANTIZED_LINEAR_CLASSES})
    return lora_config
