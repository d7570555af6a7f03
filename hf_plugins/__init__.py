"""hf-plugins: recent LLM-systems research as plugins for the Hugging Face stack.

``import hf_plugins`` registers every plugin with transformers once; it initialises no GPU.
"""

from __future__ import annotations

import importlib

from ._registry import register_all
from .attention.fftconv import FFTConv
from .attention.gla import GatedLinearAttention
from .attention.gla_cache import GLACache
from .attention.hyena_cache import HyenaCache
from .generation import (
    KV4Cache,
    SpeculativeConfig,
    disable_speculative,
    enable_speculative,
    self_draft,
)
from .models import GLAConfig, GLAForCausalLM, GLAModel, HyenaConfig, HyenaForCausalLM, HyenaModel
from .quantizers import (
    AwqConfig,
    AwqLinear,
    BipolarIntConfig,
    BipolarIntLinear,
    W4A4KV4Config,
    W4AxLinear,
    quantize,
)

__version__ = "0.1.0"
__all__ = [
    "AwqConfig",
    "AwqLinear",
    "BipolarIntConfig",
    "BipolarIntLinear",
    "FFTConv",
    "GLACache",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "GatedLinearAttention",
    "HyenaCache",
    "HyenaConfig",
    "HyenaForCausalLM",
    "HyenaModel",
    "KV4Cache",
    "SpeculativeConfig",
    "W4A4KV4Config",
    "W4AxLinear",
    "assets",
    "disable_speculative",
    "enable_speculative",
    "evaluation",
    "hardware",
    "parallel",
    "quantize",
    "register_lora",
    "self_draft",
    "__version__",
]

register_all()

_LAZY_SUBMODULES = ("assets", "evaluation", "hardware", "parallel")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "register_lora":
        from .peft_support import register_lora

        return register_lora
    raise AttributeError(f"module 'hf_plugins' has no attribute {name!r}")
