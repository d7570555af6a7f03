"""The Hyena operator (Poli et al., 2023): gated long convolutions with implicitly parametrised filters.

For order ``N`` (2 by default), an input projection gives ``N + 1`` signals of width ``d`` (after a short causal
depthwise convolution): gates ``x_0 .. x_{N-1}`` and a value ``v``. For ``i = N-1 .. 1``: ``v = h_i * (x_i v) +
b_i (x_i v)`` (a causal long convolution with a filter as long as the context, run by
:func:`hf_plugins.kernels.fftconv.fft_conv`, plus a per-channel skip); the output is ``out_proj(x_0 v)``. The
filters ``h`` are not parameters but the output of a small network of the position (sinusoidal features -> MLP
with sine activations), times an exponentially decaying window: the parameter count does not grow with the
context.

Decoding keeps each long convolution's input history: a new token costs O(context) per channel (one dot product
with the filter), never a full re-convolution (:class:`HyenaStateLayer`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.fftconv import fft_conv
from .cache_layers import own_layer
from .hyena_cache import HyenaStateLayer


class Sin(nn.Module):
    """``sin(w x)`` with a learned per-feature frequency ``w`` (Hyena's filter activation)."""

    def __init__(self, dim: int, w: float = 1.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Filters ``[count, d, length]`` from positions: ``MLP(features(t)) * exp(-|decay| t)``, plus a per-channel
    skip ``bias [count, d]``.

    Args:
        d: channels; count: filters; length: taps (the context the model is built for).
        emb_dim: positional features (odd: ``t`` plus sine/cosine pairs); filter_dim: MLP width.
        fast_decay, slow_decay: the window's decay range in units of ``length`` (channels spread between them).
    """

    def __init__(self, d: int, count: int, length: int, emb_dim: int = 33, filter_dim: int = 64,
                 fast_decay: float = 0.3, slow_decay: float = 1.5) -> None:
        super().__init__()
        self.d, self.count, self.length, self.emb_dim = d, count, length, emb_dim
        self.mlp = nn.Sequential(nn.Linear(emb_dim, filter_dim), Sin(filter_dim), nn.Linear(filter_dim, filter_dim),
                                 Sin(filter_dim), nn.Linear(filter_dim, count * d, bias=False))
        for layer in self.mlp:
            layer.keeps_torch_init = True  # read by HyenaPreTrainedModel._init_weights
        max_decay, min_decay = math.log(1e-2) / fast_decay, math.log(1e-2) / slow_decay
        self.decay = nn.Parameter(torch.linspace(min_decay, max_decay, d).repeat(count, 1))
        self.bias = nn.Parameter(torch.randn(count, d))

    def features(self, length: int, device, dtype) -> torch.Tensor:
        """``[length, emb_dim]``: normalised time and sine/cosine bands of it."""
        t = torch.linspace(0, 1, self.length, device=device, dtype=dtype)[:length, None]
        bands = (self.emb_dim - 1) // 2
        freqs = torch.linspace(1e-4, bands - 1, bands, device=device, dtype=dtype)[None]
        angle = 2 * math.pi * freqs * torch.arange(length, device=device, dtype=dtype)[:, None] / self.length
        return torch.cat([t, torch.cos(angle), torch.sin(angle)], dim=-1)

    def forward(self, length: int) -> torch.Tensor:
        """Filters ``[count, d, length]`` (``length <= self.length``)."""
        if length > self.length:
            raise ValueError(f"ImplicitFilter was built for {self.length} taps, asked for {length}.")
        weight = self.decay
        z = self.features(length, weight.device, weight.dtype)
        h = self.mlp(z).T.reshape(self.count, self.d, length)
        t = torch.linspace(0, 1, self.length, device=weight.device, dtype=weight.dtype)[:length]
        return h * torch.exp(self.decay.abs().neg()[..., None] * t)


class HyenaOperator(nn.Module):
    """Hyena token mixer: ``[batch, seq, d]`` -> ``[batch, seq, d]``.

    Args:
        d: model width; max_len: longest context (filter taps); order: gates, one more than the long
            convolutions (2).
        short_conv: taps of the short depthwise convolution on the projections (3).
        filter_dim, emb_dim: the implicit filter network's widths.
        keep_frequencies: frequency-sparse convolutions (None: dense).
        layer_idx: the operator's index in a model's cache.
    """

    def __init__(self, d: int, max_len: int, order: int = 2, short_conv: int = 3, filter_dim: int = 64,
                 emb_dim: int = 33, keep_frequencies: float | None = None, layer_idx: int | None = None) -> None:
        super().__init__()
        if order < 2:
            raise ValueError(f"HyenaOperator order must be >= 2 (order - 1 long convolutions), got {order}.")
        self.d, self.order, self.max_len, self.layer_idx = d, order, max_len, layer_idx
        self.keep_frequencies = keep_frequencies
        self.in_proj = nn.Linear(d, (order + 1) * d)
        self.short = nn.Conv1d((order + 1) * d, (order + 1) * d, short_conv, groups=(order + 1) * d)
        self.filter = ImplicitFilter(d, order - 1, max_len, emb_dim, filter_dim)
        self.out_proj = nn.Linear(d, d)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """
        Args:
            hidden_states: ``[batch, seq, d]``.
            attention_mask: ``[batch, past + seq]``, 0 for (left) padding: padded positions feed zeros into every
                convolution, so the real tokens' outputs do not change.
            cache: a ``HyenaCache`` (this operator's :class:`HyenaStateLayer` at ``layer_idx``) or None.
        """
        batch, tokens, _ = hidden_states.shape
        layer = own_layer(cache, self.layer_idx, HyenaStateLayer, "HyenaCache")
        projected = self.in_proj(hidden_states).transpose(1, 2)  # [batch, (order + 1) d, seq]
        if attention_mask is not None:
            projected = projected * attention_mask[:, None, -tokens:].to(projected.dtype)
        width = self.short.kernel_size[0] - 1
        tail = layer.short_tail(projected, width) if layer is not None else projected.new_zeros(batch,
                                                                                               projected.shape[1],
                                                                                               width)
        signals = self.short(torch.cat([tail, projected], dim=-1))
        *gates, v = signals.split(self.d, dim=1)
        past = layer.get_seq_length() if layer is not None else 0
        taps = min(past + tokens, self.max_len)
        # A cache computes the filters once per generation (decoding would otherwise rerun the filter network over
        # the whole context for every token); without one they follow the parameters, as training needs.
        filters = self.filter(taps) if layer is None else layer.filters(lambda: self.filter(self.max_len))[..., :taps]
        if layer is None and self.keep_frequencies is None:
            y = self._gated_convolutions(v, gates, filters)
        else:
            for step, gate in enumerate(reversed(gates[1:])):
                v = self._long_conv(v * gate, filters[step], self.filter.bias[step], layer, step)
            y = v * gates[0]
        if layer is not None:
            layer.commit_short(projected, width)
        return self.out_proj(y.transpose(1, 2))

    def _gated_convolutions(self, v: torch.Tensor, gates: list[torch.Tensor], filters: torch.Tensor) -> torch.Tensor:
        """The gated long convolutions of a whole sequence, each one ``fft_conv`` call: the skip ``bias * w`` is
        tap 0 of the filter and the gates go in as ``pre_gate``/``post_gate`` (multiplied in the kernel's
        registers on GPU: no gated copies in memory). ``v``, gates ``[batch, d, seq]``; ``filters [order - 1, d,
        taps]`` -> ``[batch, d, seq]``."""
        steps = list(reversed(gates[1:]))
        for step, gate in enumerate(steps):
            h = filters[step]
            h = torch.cat([h[:, :1] + self.filter.bias[step][:, None].to(h.dtype), h[:, 1:]], dim=1)
            v = fft_conv(v, h, pre_gate=gate, post_gate=gates[0] if step == len(steps) - 1 else None)
        return v

    def _long_conv(self, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, layer, index: int) -> torch.Tensor:
        """``h * v + bias v`` over the whole history: ``v [batch, d, new]``, ``h [d, taps]``; in ``v``'s dtype (the
        filter network may be fp32 under bf16 activations)."""
        skip = v * bias[:, None].to(v.dtype)
        if layer is None:
            return fft_conv(v, h, keep_frequencies=self.keep_frequencies) + skip
        history = layer.extend(index, v)  # [batch, d, past + new]
        new = v.shape[-1]
        if history.shape[-1] == new:  # prefill: one FFT convolution
            out = fft_conv(v, h, keep_frequencies=self.keep_frequencies)
        else:  # decoding: each new output is one dot product with the filter over the history
            out = _causal_tail(history, h, new)
        return out + skip


def _causal_tail(history: torch.Tensor, h: torch.Tensor, new: int) -> torch.Tensor:
    """The last ``new`` outputs of the causal convolution of ``history [batch, d, T]`` with ``h [d, taps]``:
    ``out[.., j] = sum_s h[:, s] history[.., T - new + j - s]`` -> ``[batch, d, new]``, O(taps) per output."""
    total = history.shape[-1]
    taps = min(h.shape[-1], total)
    outputs = []
    for j in range(total - new, total):
        window = history[..., max(0, j - taps + 1) : j + 1].flip(-1)  # u[t], u[t-1], ...
        outputs.append((window * h[:, : window.shape[-1]]).sum(-1))
    return torch.stack(outputs, dim=-1).to(history.dtype)

