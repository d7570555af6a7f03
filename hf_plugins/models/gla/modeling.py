"""The GLA language model: ``GLAModel`` and ``GLAForCausalLM``, registered with the Auto classes.

Blocks are pre-norm: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``, the mixer being
:class:`~hf_plugins.attention.gla.GatedLinearAttention` or, at ``config.attn_layers``, causal softmax attention with
RoPE (hybrid models). ``generate`` gets a :class:`~hf_plugins.attention.gla_cache.GLACache` (croppable, so
speculative decoding works); with a cache each new token costs O(1) in the GLA layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from ...attention.gla import GatedLinearAttention, HeadRMSNorm
from ...attention.gla_cache import GLACache
from .._stack import BlockStackMixin, StackCausalLMMixin
from .configuration import GLAConfig


class GLARMSNorm(HeadRMSNorm):
    """The blocks' RMSNorm (named so transformers' default init recognises it)."""


class GLAMLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: GLAConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (rotate-half form) on ``x [batch, heads, seq, head_dim]`` at ``positions [batch, seq]``."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None, :, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    first, second = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


class GLASoftmaxAttention(nn.Module):
    """Causal softmax attention with RoPE and grouped-query heads, for the hybrid blocks; keys and values go to the
    cache's ``DynamicLayer``."""

    def __init__(self, config: GLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.theta = layer_idx, config.rope_theta
        self.heads, self.kv_heads = config.attn_num_heads, config.attn_num_kv_heads
        self.head_dim = config.hidden_size // self.heads
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                positions: torch.Tensor) -> torch.Tensor:
        """``hidden_states [batch, seq, hidden]``, ``attention_mask [batch, past + seq]`` (or None), ``positions
        [batch, seq]`` -> ``[batch, seq, hidden]``."""
        batch, tokens, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, positions, self.theta), _rotate(k, positions, self.theta)
        if cache is not None:
            k, v = cache.layers[self.layer_idx].update(k, v)
        past = k.shape[2] - tokens
        visible = torch.ones(tokens, k.shape[2], dtype=torch.bool, device=q.device).tril(past)[None, None]
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, -k.shape[2]:].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class GLABlock(GradientCheckpointingLayer):
    def __init__(self, config: GLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_softmax = layer_idx in config.attn_layers
        self.attn_norm = GLARMSNorm(config.hidden_size, config.norm_eps)
        if self.is_softmax:
            self.attn = GLASoftmaxAttention(config, layer_idx)
        else:
            self.attn = GatedLinearAttention(
                config.hidden_size, config.num_heads, config.expand_k, config.expand_v, config.gate_low_rank_dim,
                config.gate_logit_normalizer, config.use_short_conv, config.conv_size, config.use_output_gate,
                config.norm_eps, config.attn_mode, layer_idx)
        self.mlp_norm = GLARMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GLAMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.attn_norm(hidden_states)
        if self.is_softmax:
            mixed = self.attn(normed, attention_mask, cache, positions)
        else:
            mixed = self.attn(normed, attention_mask, cache)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class GLAPreTrainedModel(PreTrainedModel):
    config_class = GLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["GLABlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True


class GLAModel(BlockStackMixin, GLAPreTrainedModel):
    block_class = GLABlock
    norm_class = GLARMSNorm
    cache_class = GLACache

    def block_inputs(self, hidden_states: torch.Tensor, cache: GLACache | None,
                     position_ids: torch.LongTensor | None) -> dict:
        """The hybrid softmax blocks' RoPE positions (default: after the cached tokens)."""
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + hidden_states.shape[1], device=hidden_states.device)[None]
            position_ids = position_ids.expand(hidden_states.shape[0], -1)
        return {"positions": position_ids}


class GLAForCausalLM(StackCausalLMMixin, GLAPreTrainedModel, GenerationMixin):
    base_model_class = GLAModel
