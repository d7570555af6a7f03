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
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ...attention.gla import GatedLinearAttention, HeadRMSNorm
from ...attention.gla_cache import GLACache
from .._own_cache import OwnCacheMixin
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


class GLAModel(GLAPreTrainedModel):
    def __init__(self, config: GLAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(GLABlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = GLARMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: GLACache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        """``input_ids [batch, seq]`` (or ``inputs_embeds [batch, seq, hidden]``) -> hidden states; ``attention_mask
        [batch, past + seq]`` marks left padding with 0."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("GLAModel needs exactly one of input_ids and inputs_embeds.")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = GLACache(self.config)
        if cache is not None and not isinstance(cache, GLACache):
            raise TypeError(f"a GLA model needs a GLACache, got {type(cache).__name__}; let generate create it or "
                            "pass hf_plugins.GLACache(model.config).")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: the kernels skip the masking work
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + hidden_states.shape[1], device=hidden_states.device)[None]
            position_ids = position_ids.expand(hidden_states.shape[0], -1)
        all_hidden = [] if output_hidden_states else None
        for block in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = block(hidden_states, attention_mask=attention_mask, cache=cache, positions=position_ids)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None,
                                       hidden_states=None if all_hidden is None else tuple(all_hidden))


class GLAForCausalLM(OwnCacheMixin, GLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GLAConfig) -> None:
        super().__init__(config)
        self.model = GLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: GLACache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits ``[batch, seq or logits_to_keep, vocab]``; with ``labels [batch, seq]`` also the next-token loss
        (labels -100 are ignored)."""
        out = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                         output_hidden_states)
        hidden = out.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, kept])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def new_cache(self) -> GLACache:
        """An empty cache for this model (also what our speculative decoding gives a GLA draft)."""
        return GLACache(self.config)
