"""``FFTConv``: the long causal convolution of Hyena-style models as a module (FlashFFTConv's
``FlashFFTConv(fft_size, dtype)`` object, with partial and frequency-sparse convolution as call options).

    conv = FFTConv(seq_len=16384, channels=768)
    y = conv(u, k)                             # u [batch, 768, seq <= 16384], k [768, taps]
    y = conv(u, k, kernel_len=1024)            # partial: the first 1024 taps
    y = conv(u, k, keep_frequencies=0.25)      # frequency-sparse: the lowest quarter of the filter spectrum
    y = conv(u, k, pre_gate=x1, post_gate=x0)  # Hyena gating, x0 * conv(x1 * u, k), fused in the GPU kernel

It holds no parameters (the filter comes in per call, e.g. from an implicit filter network), so one instance
can serve every layer of a model. The op is :func:`hf_plugins.kernels.fftconv.fft_conv` (dispatch by device;
on CPU the filter spectrum of an unchanged ``k`` is cached in eval / ``no_grad``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.fftconv import fft_conv


class FFTConv(nn.Module):
    """Causal depthwise long convolution: ``u [batch, channels, seq]``, ``k [channels, taps]`` -> ``y`` like u.

    Args:
        seq_len: the longest sequence a call may pass (``u.shape[-1] <= seq_len``).
        channels: the channel count of ``u`` and ``k``.
        backend: ``reference``, ``cpu``, ``triton`` or None (the device decides), for every call.
    """

    def __init__(self, seq_len: int, channels: int, backend: str | None = None) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FFTConv: {name} must be a positive int, got {value!r}.")
        self.seq_len = seq_len
        self.channels = channels
        self.backend = backend

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, channels={self.channels}"

    def forward(self, u: torch.Tensor, k: torch.Tensor, kernel_len: int | None = None,
                keep_frequencies: float | None = None, pre_gate: torch.Tensor | None = None,
                post_gate: torch.Tensor | None = None) -> torch.Tensor:
        """``u [batch, channels, seq]`` (seq <= seq_len), ``k [channels, taps]`` -> ``y [batch, channels, seq]``
        in u's dtype; ``kernel_len``, ``keep_frequencies`` and the gates (like u) as in
        :func:`~hf_plugins.kernels.fftconv.fft_conv`."""
        if isinstance(u, torch.Tensor) and u.dim() == 3:
            if u.shape[-1] > self.seq_len:
                raise ValueError(f"FFTConv: u has {u.shape[-1]} positions but this module was built for "
                                 f"seq_len={self.seq_len}; build FFTConv(seq_len={u.shape[-1]}, ...) or split "
                                 "the sequence.")
            if u.shape[1] != self.channels:
                raise ValueError(f"FFTConv: u must be [batch, channels={self.channels}, seq], got shape "
                                 f"{tuple(u.shape)}; a [batch, seq, channels] input needs .transpose(1, 2).")
        return fft_conv(u, k, kernel_len=kernel_len, keep_frequencies=keep_frequencies, backend=self.backend,
                        pre_gate=pre_gate, post_gate=post_gate)
