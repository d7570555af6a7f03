"""Pure-torch gated linear attention (GLA, Yang et al. 2024): the step-by-step recurrence, the test oracle.

Per head, with ``q, k, gk`` rows of ``key_dim`` and ``v`` rows of ``value_dim``:

    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t        (S: [key_dim, value_dim], S_0 = the initial state or 0)
    o_t = (scale * q_t) S_t

``gk`` is the log forget gate (``<= 0``). Layout (shared by every backend): ``q, k, gk [batch, seq, heads, key_dim]``,
``v [batch, seq, heads, value_dim]``; states ``[n, heads, key_dim, value_dim]`` where ``n`` is ``batch``, or the
number of packed sequences when ``cu_seqlens`` (int64 ``[n + 1]`` offsets into ``seq``, ``batch == 1``) is given.
Each packed sequence starts from its own row of the initial state (or zeros) and ends in its own final state.
"""

from __future__ import annotations

import torch

__all__ = ["check_inputs", "compute_dtype", "gla_recurrence_reference", "key_dim_scale", "sequence_bounds"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math dtype for inputs of ``dtype``: float32 for half types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _check_tensor(name: str, value, shape_hint: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_hint}, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}; cast it with .float().")
    if value.dim() != 4:
        raise ValueError(f"{name} must be 4-D {shape_hint}, got shape {tuple(value.shape)}; GLA takes the "
                         "sequence-first layout (transpose head-first tensors with .transpose(1, 2)).")


def _check_cu_seqlens(cu_seqlens, batch: int, seq_len: int, device: torch.device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        found = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"cu_seqlens must be an int64 tensor [num_sequences + 1], got {found}; build it with "
                        "torch.tensor(offsets, dtype=torch.int64).")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [num_sequences + 1] with at least 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}; it is [0, len_0, len_0 + len_1, ..., seq].")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch == 1 (sequences packed along seq), got batch={batch}; pack them "
                         "with x.reshape(1, -1, heads, dim) and offsets, or drop cu_seqlens.")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}; move it with .to(q.device).")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != seq_len or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to seq={seq_len} without decreasing, got {offsets}; it holds "
                         "the start offset of each packed sequence, then the total length.")


def _check_state(initial_state, expected: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
        found = initial_state.dtype if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
        raise TypeError(f"initial_state must be a float tensor {list(expected)}, got {found}.")
    if tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must have shape [batch or num_sequences, heads, key_dim, value_dim] = "
                         f"{list(expected)}, got {list(initial_state.shape)}; pass the final_state of the previous "
                         "call, or None for zeros.")
    if initial_state.device != device:
        raise ValueError(f"initial_state is on {initial_state.device} but q is on {device}; move it with "
                         ".to(q.device).")


def check_inputs(q, k, v, gk, scale=None, initial_state=None, cu_seqlens=None) -> float:
    """Validate a GLA call's arguments (``TypeError``/``ValueError`` naming the constraint, the value and the fix).

    Returns the scale to use: ``scale``, or ``key_dim ** -0.5`` when it is None.
    """
    _check_tensor("q", q, "[batch, seq, heads, key_dim]")
    _check_tensor("k", k, "[batch, seq, heads, key_dim]")
    _check_tensor("v", v, "[batch, seq, heads, value_dim]")
    _check_tensor("gk", gk, "[batch, seq, heads, key_dim]")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [batch, seq, heads, key_dim] = {list(q.shape)}, got {list(k.shape)}.")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [batch, seq, heads, value_dim] with q's first three sizes {list(q.shape[:3])}, "
                         f"got {list(v.shape)}.")
    if gk.shape != k.shape:
        raise ValueError(f"gk (the log forget gate, one per key channel) must have k's shape {list(k.shape)}, got "
                         f"{list(gk.shape)}; expand a per-head gate with gk.expand_as(k).")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}; cast them to one.")
    if len({t.device for t in (q, k, v, gk)}) != 1:
        raise ValueError(f"q, k, v and gk must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{gk.device}; move them with .to(q.device).")
    batch, seq_len, heads, key_dim = q.shape
    sequences = batch
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, batch, seq_len, q.device)
        sequences = cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_state(initial_state, (sequences, heads, key_dim, v.shape[-1]), q.device)
    if scale is None:
        return key_dim_scale(q)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number or None (key_dim ** -0.5), got {type(scale).__name__}.")
    return float(scale)


def sequence_bounds(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """``[(row, start, end)]`` per sequence: batch rows, or the packed sequences of row 0."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)]
    offsets = cu_seqlens.tolist()
    return [(0, start, end) for start, end in zip(offsets, offsets[1:])]


def _recurrence(q, k, v, gk, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, all heads: ``q, k, gk [T, H, K]``, ``v [T, H, V]``, ``state [H, K, V]`` (already scaled q)
    -> ``(o [T, H, V], final state [H, K, V])``."""
    outputs = []
    for t in range(q.shape[0]):
        state = torch.exp(gk[t])[..., None] * state + k[t][..., None] * v[t][:, None, :]
        outputs.append(torch.einsum("hk,hkv->hv", q[t], state))
    out = torch.stack(outputs) if outputs else v.new_zeros(v.shape)
    return out, state


def gla_recurrence_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor,
                             scale: float | None = None, initial_state: torch.Tensor | None = None,
                             output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GLA recurrence, one token at a time, in float32 (float64 for float64 inputs); differentiable.

    Args:
        q, k, gk: ``[batch, seq, heads, key_dim]``; v: ``[batch, seq, heads, value_dim]``.
        scale: query scale, default ``key_dim ** -0.5``.
        initial_state: ``[n, heads, key_dim, value_dim]`` or None (zeros); ``n`` is batch or num_sequences.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: int64 ``[n + 1]`` packed-sequence offsets (batch must be 1), or None.

    Returns ``(o [batch, seq, heads, value_dim] in q's dtype, final state [n, heads, key_dim, value_dim] in the
    math dtype, or None)``.
    """
    scale = key_dim_scale(q) if scale is None else scale
    dtype = compute_dtype(q.dtype)
    heads, key_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
    outputs, finals = [], []
    for index, (row, start, end) in enumerate(sequence_bounds(q.shape[0], q.shape[1], cu_seqlens)):
        if initial_state is None:
            state = q.new_zeros((heads, key_dim, value_dim), dtype=dtype)
        else:
            state = initial_state[index].to(dtype)
        span = slice(start, end)
        out, state = _recurrence(q[row, span].to(dtype) * scale, k[row, span].to(dtype), v[row, span].to(dtype),
                                 gk[row, span].to(dtype), state)
        outputs.append(out)
        finals.append(state)
    if cu_seqlens is None:
        o = torch.stack(outputs)
    else:
        o = torch.cat(outputs)[None]
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)


def key_dim_scale(q: torch.Tensor) -> float:
    """The default query scale, ``key_dim ** -0.5``."""
    return q.shape[-1] ** -0.5
