"""The one place that registers our plugins with transformers. Idempotent; touches no GPU."""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface, AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .attention import KV4_ATTENTION, RING_ATTENTION, kv4_attention_forward, ring_attention_forward, ring_attention_mask
from .generation import enable_speculative, use_kv4_cache_if_configured
from .models.gla import MODEL_TYPE as GLA_MODEL_TYPE
from .models.gla import GLAConfig, GLAForCausalLM, GLAModel
from .models.hyena import MODEL_TYPE as HYENA_MODEL_TYPE
from .models.hyena import HyenaConfig, HyenaForCausalLM, HyenaModel
from .parallel.local_styles import local_styles
from .quantizers import (
    AwqConfig,
    AwqHfQuantizer,
    BipolarIntConfig,
    BipolarIntHfQuantizer,
    W4A4KV4Config,
    W4A4KV4HfQuantizer,
)
from .quantizers.awq.config import QUANT_METHOD as AWQ_METHOD
from .quantizers.bipolar.config import QUANT_METHOD as BIPOLAR_METHOD
from .quantizers.checkpoint import CHECKPOINT_MODEL_TYPE, QuantizedCheckpointConfig
from .quantizers.comet.config import QUANT_METHOD as W4A4KV4_METHOD
from .quantizers.hooks import ON_QUANTIZED_MODEL

QUANTIZATION_METHODS = {
    AWQ_METHOD: (AwqConfig, AwqHfQuantizer),
    BIPOLAR_METHOD: (BipolarIntConfig, BipolarIntHfQuantizer),
    W4A4KV4_METHOD: (W4A4KV4Config, W4A4KV4HfQuantizer),
}


def register_all() -> None:
    """Register quantization configs, quantizers, the checkpoint model type, the GLA and Hyena model families,
    speculative decoding (and the KV4 cache where configured) for every model our quantizers produce, the
    tensor-parallel styles of self-sharding linears, ring attention and the KV4 attention (safe to call
    repeatedly)."""
    for method, (config_cls, quantizer_cls) in QUANTIZATION_METHODS.items():
        if method not in AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(method)(config_cls)
        if method not in AUTO_QUANTIZER_MAPPING:
            register_quantizer(method)(quantizer_cls)
    if CHECKPOINT_MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(CHECKPOINT_MODEL_TYPE, QuantizedCheckpointConfig)
    for model_type, config_cls, model_cls, lm_cls in ((GLA_MODEL_TYPE, GLAConfig, GLAModel, GLAForCausalLM),
                                                      (HYENA_MODEL_TYPE, HyenaConfig, HyenaModel, HyenaForCausalLM)):
        if model_type not in CONFIG_MAPPING:
            AutoConfig.register(model_type, config_cls)
            AutoModel.register(config_cls, model_cls)
            AutoModelForCausalLM.register(config_cls, lm_cls)
    for callback in (enable_speculative, use_kv4_cache_if_configured):
        if callback not in ON_QUANTIZED_MODEL:
            ON_QUANTIZED_MODEL.append(callback)
    _register_tp_styles()
    # The mask function must be registered under the same name, or transformers silently passes no mask.
    AttentionInterface.register(RING_ATTENTION, ring_attention_forward)
    AttentionMaskInterface.register(RING_ATTENTION, ring_attention_mask)
    AttentionInterface.register(KV4_ATTENTION, kv4_attention_forward)
    AttentionMaskInterface.register(KV4_ATTENTION, sdpa_mask)


def _register_tp_styles() -> None:
    """Tensor-parallel styles for self-sharding (quantized) linears, next to transformers' own."""
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    for name, style in local_styles().items():
        if name not in ALL_PARALLEL_STYLES:
            ALL_PARALLEL_STYLES.register(name, style)
