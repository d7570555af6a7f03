"""Tiny random fp32 decoder-only models of several architectures, for fast architecture-coverage tests.

Every factory builds a 2-layer ``*ForCausalLM`` from a config (nothing is downloaded). Dimensions are chosen so
that group sizes 32 and 64 divide every ``in_features`` (hidden 64, attention width 64, intermediate 128).
Norm weights and linear biases are pushed away from their init (ones / zeros) and a few hidden channels get large
norm gains, like the activation outliers of real LLMs: folding bugs then change the logits, and activation-aware
scaling has salient channels to protect.

Attention layout per architecture (what tests may expect):

| arch      | heads / kv heads | tied embeddings | notable                                               |
|-----------|------------------|-----------------|-------------------------------------------------------|
| llama     | 4 / 2 (GQA)      | yes             |                                                       |
| qwen2     | 4 / 2 (GQA)      | yes             | q/k/v biases                                          |
| mistral   | 4 / 4            | no              |                                                       |
| phi3      | 4 / 4            | no              | fused ``qkv_proj`` and ``gate_up_proj``               |
| gemma     | 4 / 1 (MQA)      | yes             | RMSNorm ``x * (1 + w)``, GELU-tanh, scaled embeddings |
| gemma2    | 4 / 2 (GQA)      | yes             | + pre/post feed-forward norms, soft-capping           |
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB_SIZE = 256
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_HEADS = 4
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
NUM_LAYERS = 2

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    intermediate_size=INTERMEDIATE_SIZE,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=NUM_HEADS,
    max_position_embeddings=512,
    initializer_range=0.05,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=2, head_dim=HEAD_DIM, tie_word_embeddings=True),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mistral": (
        transformers.MistralConfig,
        dict(num_key_value_heads=NUM_HEADS, head_dim=HEAD_DIM, tie_word_embeddings=False, sliding_window=None),
    ),
    "phi3": (
        transformers.Phi3Config,
        dict(num_key_value_heads=NUM_HEADS, tie_word_embeddings=False),
    ),
    "gemma": (
        transformers.GemmaConfig,
        dict(num_key_value_heads=1, head_dim=HEAD_DIM, tie_word_embeddings=True),
    ),
    # The sliding window exceeds every test sequence, so its per-layer mask equals the full causal mask.
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=512,
            tie_word_embeddings=True,
        ),
    ),
}

TINY_ARCHS: tuple[str, ...] = tuple(_CONFIGS)


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """The config of the tiny ``arch`` model (eager attention, so hooks see every op on CPU)."""
    if arch not in _CONFIGS:
        raise ValueError(f"arch={arch!r} is not a tiny architecture; pick one of {', '.join(TINY_ARCHS)}.")
    config_class, overrides = _CONFIGS[arch]
    config = config_class(**_COMMON, **overrides)
    config._attn_implementation = "eager"
    return config


def tiny_model(arch: str, seed: int = 0) -> tuple[transformers.PreTrainedModel, int]:
    """A tiny random fp32 ``*ForCausalLM`` of ``arch`` in eval mode, and its vocabulary size.

    The same ``(arch, seed)`` always gives the same weights.
    """
    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _perturb_norms_and_biases(model, torch.Generator().manual_seed(seed + 1))
    return model, VOCAB_SIZE


def random_token_ids(n_samples: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    """Uniform random token ids ``[n_samples, seq_len]`` in ``[0, VOCAB_SIZE)``."""
    return torch.randint(0, VOCAB_SIZE, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))


def _perturb_norms_and_biases(model: nn.Module, generator: torch.Generator) -> None:
    """Randomise 1-D norm weights (with a few outlier gains) and linear biases in place.

    A norm's "neutral" weight is 1 for ``x * w`` norms and 0 for Gemma's ``x * (1 + w)`` norms; both get a
    multiplicative gain ``g`` around 1 (``w = g`` or ``w = g - 1``), so either family ends up with similar scales.
    """
    outlier_channels = torch.randperm(HIDDEN_SIZE, generator=generator)[:4]
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear):
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1, generator=generator)
            elif isinstance(weight, nn.Parameter) and weight.dim() == 1 and not isinstance(module, nn.Embedding):
                gain = torch.empty_like(weight).uniform_(0.5, 1.5, generator=generator)
                if weight.numel() == HIDDEN_SIZE:
                    gain[outlier_channels] *= 8.0
                neutral = weight.detach().mean().round()
                weight.copy_(gain - 1.0 + neutral)
                bias = getattr(module, "bias", None)
                if isinstance(bias, nn.Parameter):
                    bias.normal_(0.0, 0.1, generator=generator)
