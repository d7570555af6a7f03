"""The gated linear attention (GLA) token mixer of Yang et al. (ICML 2024), a drop-in for softmax attention.

Per head, ``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t`` and ``o_t = q_t S_t``, with a data-dependent forget gate
``alpha_t = sigmoid(x_t W_1 W_2) ^ (1 / tau)`` from a low-rank projection (``log alpha = logsigmoid(.) / tau``,
the paper's normaliser ``tau = 16``). The output is normalised per head (RMSNorm) and gated by
``swish(x W_r)`` before the output projection; optional short causal convolutions on q, k, v.

Modes: ``chunk`` (the chunkwise-parallel kernel; training and prefill), ``recurrent`` (token by token; decoding),
``auto`` (recurrent for at most :data:`RECURRENT_MAX_TOKENS` tokens outside training, else chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.gla import chunk_gla, fused_recurrent_gla
from .cache_layers import own_layer
from .gla_cache import GLAStateLayer, conv_tail

MODES = ("auto", "chunk", "recurrent")
RECURRENT_MAX_TOKENS = 64
"""Tokens per call up to which ``auto`` runs the recurrence (decoding, speculative verification)."""


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dimension (one head's values), with a learned gain ``[dim]``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time, then SiLU: ``[batch, seq, channels]`` -> the same."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
        """``x [batch, seq, channels]``; ``tail [batch, channels, kernel_size - 1]``: the inputs before ``x``
        (None: zeros)."""
        inputs = x.transpose(1, 2)
        width = self.conv.kernel_size[0] - 1
        history = inputs.new_zeros(*inputs.shape[:-1], width) if tail is None else tail.to(inputs.dtype)
        return F.silu(self.conv(torch.cat([history, inputs], dim=-1))).transpose(1, 2)


def _check_layer_args(hidden_size: int, num_heads: int, key_dim: int, value_dim: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"GatedLinearAttention mode must be one of {MODES}, got {mode!r}.")
    for name, dim in (("key dimension hidden_size * expand_k", key_dim), ("value dimension hidden_size * expand_v",
                                                                           value_dim)):
        if dim <= 0 or dim % num_heads:
            raise ValueError(f"GatedLinearAttention: the {name} ({dim}) must be a positive multiple of num_heads "
                             f"({num_heads}); change expand_k / expand_v or num_heads.")


class GatedLinearAttention(nn.Module):
    """GLA token mixer: ``[batch, seq, hidden_size]`` -> ``[batch, seq, hidden_size]``.

    Args:
        hidden_size: model width.
        num_heads: heads; key and value dimensions split evenly among them.
        expand_k, expand_v: key / value dimension over ``hidden_size`` (paper: 0.5 and 1).
        gate_low_rank_dim: rank of the forget-gate projection (16).
        gate_logit_normalizer: the paper's ``tau`` (16): ``log alpha = logsigmoid(.) / tau``.
        use_short_conv, conv_size: short causal convolutions on q, k, v (off by default).
        use_output_gate: the swish output gate (on).
        norm_eps: epsilon of the per-head RMSNorm.
        mode: ``auto``, ``chunk`` or ``recurrent`` (module docstring).
        layer_idx: the layer's index in a model's cache.
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, use_short_conv: bool = False,
                 conv_size: int = 4, use_output_gate: bool = True, norm_eps: float = 1e-5, mode: str = "auto",
                 layer_idx: int | None = None) -> None:
        super().__init__()
        self.key_dim, self.value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        _check_layer_args(hidden_size, num_heads, self.key_dim, self.value_dim, mode)
        self.num_heads, self.mode, self.layer_idx = num_heads, mode, layer_idx
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, self.key_dim, bias=True))
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False) if use_output_gate else None
        self.short_conv = ShortConvolution(2 * self.key_dim + self.value_dim, conv_size) if use_short_conv else None
        self.g_norm = HeadRMSNorm(self.head_v_dim, norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def _mode(self, tokens: int) -> str:
        if self.mode != "auto":
            return self.mode
        return "recurrent" if not self.training and tokens <= RECURRENT_MAX_TOKENS else "chunk"

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """
        Args:
            hidden_states: ``[batch, seq, hidden_size]``.
            attention_mask: ``[batch, past + seq]`` with 1 for tokens and 0 for (left) padding, or None. Padded
                positions neither write to nor decay the state.
            cache: a ``GLACache`` (this layer's :class:`GLAStateLayer` at ``layer_idx``) or None.
        """
        batch, tokens, _ = hidden_states.shape
        layer = own_layer(cache, self.layer_idx, GLAStateLayer, "GLACache")
        state, tail = layer.read() if layer is not None else (None, None)
        qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        keep = None if attention_mask is None else attention_mask[:, -tokens:, None].to(qkv.dtype)
        conv_inputs = None
        if self.short_conv is not None:
            if keep is not None:
                qkv = qkv * keep
            conv_inputs = qkv.transpose(1, 2)
            qkv = self.short_conv(qkv, tail)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        gk = F.logsigmoid(self.gk_proj(hidden_states).float()) / self.gate_logit_normalizer
        if keep is not None:
            k, gk = k * keep, gk * keep
        q, k, gk = (t.reshape(batch, tokens, self.num_heads, self.head_k_dim) for t in (q, k, gk))
        v = v.reshape(batch, tokens, self.num_heads, self.head_v_dim)
        gk = gk.to(q.dtype)
        run = fused_recurrent_gla if self._mode(tokens) == "recurrent" else chunk_gla
        scale = self.head_k_dim ** -0.5
        o, final = run(q, k, v, gk, scale, initial_state=state, output_final_state=layer is not None)
        if layer is not None:
            width = 0 if conv_inputs is None else self.short_conv.conv.kernel_size[0] - 1
            new_tail = None if conv_inputs is None else conv_tail(tail, conv_inputs, width)
            layer.commit(final, new_tail, k, v, gk, conv_inputs, scale)
        o = self.g_norm(o)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(hidden_states)).reshape_as(o)
        return self.o_proj(o.reshape(batch, tokens, self.value_dim))
