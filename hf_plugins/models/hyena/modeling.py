"""The Hyena language model: ``HyenaModel`` and ``HyenaForCausalLM``, registered with the Auto classes.

Blocks are pre-norm: ``x + hyena(norm(x))`` then ``x + mlp(norm(x))``. ``generate`` gets a
:class:`~hf_plugins.attention.hyena_cache.HyenaCache` (croppable), and each new token costs O(context) per channel
in the long convolutions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from ...attention.gla import HeadRMSNorm
from ...attention.hyena import HyenaOperator
from ...attention.hyena_cache import HyenaCache
from .._stack import BlockStackMixin, StackCausalLMMixin
from .configuration import HyenaConfig


class HyenaRMSNorm(HeadRMSNorm):
    """The blocks' RMSNorm (named so transformers' default init recognises it)."""


class HyenaBlock(GradientCheckpointingLayer):
    def __init__(self, config: HyenaConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_norm = HyenaRMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = HyenaOperator(config.hidden_size, config.max_position_embeddings, config.order,
                                   config.short_conv_size, config.filter_dim, config.filter_emb_dim,
                                   config.keep_frequencies, layer_idx)
        self.mlp_norm = HyenaRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.intermediate_size), ACT2FN[config.hidden_act],
                                 nn.Linear(config.intermediate_size, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), attention_mask, cache)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class HyenaPreTrainedModel(PreTrainedModel):
    config_class = HyenaConfig
    base_model_prefix = "model"
    _no_split_modules = ["HyenaBlock"]
    # The implicit filter networks stay fp32 (also under bf16) and unquantized: sine features of positions need the
    # precision.
    _keep_in_fp32_modules_strict = ["filter"]
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        # The implicit filter network keeps torch's default init: sine networks need it (a 0.02-std init would
        # start every long filter at almost zero).
        if getattr(module, "keeps_torch_init", False):
            return
        super()._init_weights(module)


class HyenaModel(BlockStackMixin, HyenaPreTrainedModel):
    """Positions are implicit in the convolutions: ``position_ids`` are accepted and unused."""

    block_class = HyenaBlock
    norm_class = HyenaRMSNorm
    cache_class = HyenaCache


class HyenaForCausalLM(StackCausalLMMixin, HyenaPreTrainedModel, GenerationMixin):
    base_model_class = HyenaModel
