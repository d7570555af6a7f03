"""Gated linear attention (GLA): chunkwise-parallel training/prefill and a step recurrence for decoding.

Per head, ``S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t`` and ``o_t = (scale * q_t) S_t`` (see :mod:`.reference`
for the layout). Backends (picked by :func:`hf_plugins.kernels._dispatch.choose_backend`):

- ``reference``: :func:`~.reference.gla_recurrence_reference`, one token at a time, the test oracle.
- ``cpu``: :func:`~.cpu.chunk_gla_cpu`, the chunkwise form in torch (autograd through torch ops); decoding runs the
  reference recurrence, which is what a few tokens need.
- ``triton``: :func:`~.triton.chunk_gla_triton` (forward and backward kernels) and
  :func:`~.triton.fused_recurrent_gla_triton` (a forward kernel; calls that need gradients take the chunk
  kernels), imported on first use.
"""

from __future__ import annotations

import torch

from .._dispatch import choose_backend
from .cpu import chunk_gla_cpu
from .reference import check_inputs, gla_recurrence_reference

__all__ = ["check_inputs", "chunk_gla", "chunk_gla_cpu", "fused_recurrent_gla", "gla_recurrence_reference"]

GLAResult = tuple[torch.Tensor, torch.Tensor | None]


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float | None = None,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              cu_seqlens: torch.Tensor | None = None, backend: str | None = None) -> GLAResult:
    """GLA over whole sequences in the chunkwise-parallel form (training and prefill).

    Args:
        q, k: ``[batch, seq, heads, key_dim]``; v: ``[batch, seq, heads, value_dim]``; one float dtype.
        gk: ``[batch, seq, heads, key_dim]`` log forget gate (``<= 0``, e.g. ``logsigmoid(x) / 16``).
        scale: query scale, default ``key_dim ** -0.5``.
        initial_state: ``[n, heads, key_dim, value_dim]`` or None (zeros); ``n`` is batch, or num_sequences with
            ``cu_seqlens``.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: int64 ``[num_sequences + 1]`` offsets of sequences packed along ``seq`` (batch must be 1).
        backend: ``reference``, ``cpu``, ``triton`` or None (the device decides).

    Returns ``(o [batch, seq, heads, value_dim] in q's dtype, final state [n, heads, key_dim, value_dim] float32
    (float64 for float64 inputs) or None)``. Differentiable in q, k, v, gk and initial_state.
    """
    scale = check_inputs(q, k, v, gk, scale, initial_state, cu_seqlens)
    chosen = choose_backend("gla", q.device, backend)
    if chosen == "reference":
        return gla_recurrence_reference(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)
    if chosen == "cpu":
        return chunk_gla_cpu(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)
    from .triton import chunk_gla_triton

    return chunk_gla_triton(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        backend: str | None = None) -> GLAResult:
    """GLA one token at a time, for decoding a few tokens from a cached state; arguments and results as
    :func:`chunk_gla`. On triton a fused kernel (forward only: calls that need gradients run the chunk kernels);
    on cpu and reference the differentiable torch recurrence."""
    scale = check_inputs(q, k, v, gk, scale, initial_state, cu_seqlens)
    chosen = choose_backend("gla", q.device, backend)
    if chosen != "triton":
        return gla_recurrence_reference(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)
    from .triton import fused_recurrent_gla_triton

    return fused_recurrent_gla_triton(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)
