"""Triton GLA: chunkwise forward and backward kernels, and a fused recurrent decode kernel.

The chunkwise form (see :mod:`.cpu` for the algebra): chunks of ``BT`` tokens (64, or 16/32 for short inputs),
secondary sub-chunks of ``BC = 16`` tokens. Every exponent is a sum of gates over a run of tokens, summed
directly inside the kernel from ``gk`` (prefix sums from the chunk start, suffix sums to the chunk end, sums up
to a sub-chunk's first token), never as a difference of two long cumulative sums: with gates near -20 those
sums reach -1000 and their difference would keep only ~1e-5 of relative precision in fp32. Each factor that
multiplies ``q`` or ``k`` is ``exp`` of a non-positive number, so nothing overflows.

Forward (:func:`chunk_gla_triton`), all sequences (batch rows or ``cu_seqlens`` pieces) as one packed list:

1. ``_fwd_state_kernel``: per sequence, head and ``[BK, BV]`` state tile, walk the chunks and store the state
   entering each one (``h [chunks, H, K, V]`` fp32) and the final state.
2. ``_fwd_intra_kernel``: the intra-chunk scores ``A [T, H, BT]`` per ``(query, key)`` sub-chunk pair: earlier
   key sub-chunks through one ``tl.dot`` around the query sub-chunk's first token, the diagonal sub-chunk pair
   by pair, with each pair's exponent summed over its own tokens.
3. ``_fwd_output_kernel``: ``o = (scale q * exp(g)) h + A v``.

Backward (a ``torch.autograd.Function``): ``_bwd_state_kernel`` (state gradients, chunks in reverse, and the
initial state's), ``_bwd_score_kernel`` (``dA = tril(do v^T)``), ``_bwd_intra_kernel`` (intra-chunk dq, dk by
sub-chunks), ``_bwd_value_kernel`` (dv) and ``_bwd_query_key_kernel`` (the inter-chunk dq, dk, and the gate
gradient: ``dg = q dq - k dk`` plus the chunk's last-token terms, summed in reverse along the chunk).

Decode (:func:`fused_recurrent_gla_triton`): one program per sequence, head and value block keeps the
``[K, BV]`` state in registers over the tokens; it has no backward (calls that need gradients take the chunk
kernels).

fp32 inputs take an exact route (fp32 ``ieee`` dots, which run on FMA units); fp16/bf16 inputs feed the dots
in their own dtype (fp32 under the interpreter for bf16) and accumulate in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hf_plugins._env import triton_interpreter

from .._tiles import dot_dtype

__all__ = ["chunk_gla_triton", "fused_recurrent_gla_triton"]

SUB_CHUNK = 16  # the tl.dot minimum on NVIDIA GPUs
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER = triton_interpreter()
# launch options of the kernels holding [64, 64] fp32 tiles: at 4 warps they spill 0.4-3 KB per thread on sm_90
# (ptxas -v), at 8 warps at most 0.25 KB; the interpreter takes no GPU options
_BIG_TILES = {} if _INTERPRETER else {"num_warps": 8}


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    """fp32-accumulated ``a @ b`` with both operands in ``DT``; fp32 operands stay exact (no tf32)."""
    return tl.dot(a.to(DT), b.to(DT), input_precision="ieee")


@triton.jit
def _rows(x, rows, lo, hi, cols, D, H, i_h):
    """fp32 ``[R, C]`` block ``x[rows, i_h, cols]`` of a ``[T, H, D]`` tensor; 0 outside ``lo <= row < hi``,
    ``col < D``."""
    mask = ((rows >= lo) & (rows < hi))[:, None] & (cols < D)[None, :]
    return tl.load(x + (rows[:, None] * H + i_h) * D + cols[None, :], mask=mask, other=0.).to(tl.float32)


@triton.jit
def _row(x, r, end, cols, D, H, i_h):
    """fp32 ``[C]`` row ``x[r, i_h, cols]`` of a ``[T, H, D]`` tensor; 0 when ``r >= end`` or ``col >= D``."""
    mask = (cols < D) & ((cols * 0 + r) < end)  # the row test broadcast to the block: masks must be blocks
    return tl.load(x + (r * H + i_h) * D + cols, mask=mask, other=0.).to(tl.float32)


@triton.jit
def _chunk(chunk_indices, cu_seqlens, i_t, BT: tl.constexpr):
    """``(chunk's first token, its sequence's end)`` for global chunk ``i_t`` (int64)."""
    i_n = tl.load(chunk_indices + 2 * i_t)
    i_c = tl.load(chunk_indices + 2 * i_t + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return bos + i_c * BT, eos


@triton.jit
def _state_tile(x, i_c, i_h, o_k, o_v, H, K, V):
    """Offsets and mask of the ``[BK, BV]`` tile of ``x [chunks, H, K, V]``."""
    offsets = ((i_c.to(tl.int64) * H + i_h) * K + o_k[:, None]) * V + o_v[None, :]
    return x + offsets, (o_k < K)[:, None] & (o_v < V)[None, :]


@triton.jit
def _suffix_sums(gk, t0, end, o_k, K, H, i_h, BT: tl.constexpr):
    """``[BT, BK]``: row ``t`` holds ``sum_{t < u < end} gk_u`` (the decay from token ``t`` to the chunk's end),
    from the gates shifted up one row."""
    rows = t0 + tl.arange(0, BT)
    return tl.cumsum(_rows(gk, rows + 1, t0, end, o_k, K, H, i_h), axis=0, reverse=True)


@triton.jit
def _from_anchor(gk, ta, end, o_k, K, H, i_h, BC: tl.constexpr):
    """``[BC, BK]``: row ``t = ta + r`` holds ``sum_{ta < u <= t} gk_u`` (0 on row ``ta`` itself)."""
    rows = ta + tl.arange(0, BC)
    return tl.cumsum(_rows(gk, rows, ta + 1, end, o_k, K, H, i_h), axis=0)


@triton.jit
def _to_anchor(gk, tj, ta, t0, end, o_k, K, H, i_h, BC: tl.constexpr, BT: tl.constexpr):
    """``[BC, BK]``: row ``s = tj + r`` holds ``sum_{s < u <= ta} gk_u`` for an anchor ``ta`` after the
    sub-chunk: the rest of the sub-chunk (suffix sums) plus the tokens ``tj + BC .. ta``."""
    rows = tj + tl.arange(0, BC)
    inside = tl.cumsum(_rows(gk, rows + 1, t0, tl.minimum(tj + BC, end), o_k, K, H, i_h), axis=0, reverse=True)
    between = _rows(gk, tj + BC + tl.arange(0, BT), t0, tl.minimum(ta + 1, end), o_k, K, H, i_h)
    return inside + tl.sum(between, axis=0)[None, :]


@triton.jit
def _fwd_state_kernel(k, v, gk, h, h0, ht, cu_seqlens, chunk_offsets, H, K, V, HAS_H0: tl.constexpr,
                      STORE_FINAL: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr):
    """Sequence and head ``program_id(2)``, state tile ``(program_id(0), program_id(1))``: ``h[c]`` = the state
    entering chunk ``c``; ``ht`` = the state after the sequence."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first = tl.load(chunk_offsets + i_n)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        p_h0, m_h = _state_tile(h0, i_n, i_h, o_k, o_v, H, K, V)
        b_h += tl.load(p_h0, mask=m_h, other=0.).to(tl.float32)
    for i_c in range(0, tl.cdiv(eos - bos, BT)):
        p_h, m_h = _state_tile(h, first + i_c, i_h, o_k, o_v, H, K, V)
        tl.store(p_h, b_h, mask=m_h)
        t0 = bos + i_c * BT
        end = tl.minimum(t0 + BT, eos)
        rows = t0 + tl.arange(0, BT)
        b_k = _rows(k, rows, t0, end, o_k, K, H, i_h)
        b_v = _rows(v, rows, t0, end, o_v, V, H, i_h)
        b_total = tl.sum(_rows(gk, rows, t0, end, o_k, K, H, i_h), axis=0)
        b_kg = b_k * tl.exp(_suffix_sums(gk, t0, end, o_k, K, H, i_h, BT))
        b_h = b_h * tl.exp(b_total)[:, None] + _dot(tl.trans(b_kg), b_v, DT)
    if STORE_FINAL:
        p_ht, m_h = _state_tile(ht, i_n, i_h, o_k, o_v, H, K, V)
        tl.store(p_ht, b_h, mask=m_h)


@triton.jit
def _diagonal_weights(gk, ti, end, o_k, K, H, i_h, BC: tl.constexpr):
    """``[BC, BC, BK]`` pair weights of sub-chunk ``ti .. ti + BC`` with itself: ``W[t, s] = exp(sum_{s < u <= t}
    gk_u)`` for ``t >= s`` (each pair's gates summed along ``t``), 0 above the diagonal."""
    rows = ti + tl.arange(0, BC)
    b_gk = _rows(gk, rows, ti, end, o_k, K, H, i_h)
    after = (rows[:, None] > rows[None, :])[:, :, None]  # (u, s): u > s
    b_sums = tl.cumsum(tl.where(after, b_gk[:, None, :], 0.), axis=0)
    return tl.where((rows[:, None] >= rows[None, :])[:, :, None], tl.exp(b_sums), 0.)


@triton.jit
def _fwd_intra_kernel(q, k, gk, A, cu_seqlens, chunk_indices, scale, H, K, DT: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr, BK: tl.constexpr):
    """``A[t, h, s - chunk start]`` for query sub-chunk ``i`` and key sub-chunk ``j`` (``program_id(0) = i * NC +
    j``) of chunk ``program_id(1)``, head ``program_id(2)``; ``j > i`` stores zeros."""
    NC: tl.constexpr = BT // BC
    i_ij, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_i, i_j = i_ij // NC, i_ij % NC
    t0, eos = _chunk(chunk_indices, cu_seqlens, i_t, BT)
    end = tl.minimum(t0 + BT, eos)
    ti, tj = t0 + i_i * BC, t0 + i_j * BC
    rows_i, rows_j = ti + tl.arange(0, BC), tj + tl.arange(0, BC)
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    if i_i > i_j:
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_qg = _rows(q, rows_i, t0, end, o_k, K, H, i_h) * tl.exp(_from_anchor(gk, ti, end, o_k, K, H, i_h, BC))
            b_kg = _rows(k, rows_j, t0, end, o_k, K, H, i_h) * tl.exp(
                _to_anchor(gk, tj, ti, t0, end, o_k, K, H, i_h, BC, BT))
            b_A += _dot(b_qg, tl.trans(b_kg), DT)
        b_A *= scale
    elif i_i == i_j:
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_q = _rows(q, rows_i, t0, end, o_k, K, H, i_h)
            b_k = _rows(k, rows_i, t0, end, o_k, K, H, i_h)
            b_w = _diagonal_weights(gk, ti, end, o_k, K, H, i_h, BC)
            b_A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * b_w, axis=2)
        b_A *= scale
    cols = i_j * BC + tl.arange(0, BC)
    m_A = (rows_i < end)[:, None] & (cols < BT)[None, :]
    tl.store(A + (rows_i[:, None] * H + i_h) * BT + cols[None, :], b_A, mask=m_A)


@triton.jit
def _fwd_output_kernel(q, v, gk, h, A, o, cu_seqlens, chunk_indices, scale, H, K, V, DT: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``o = (scale q * exp(g)) h + A v`` for value block ``program_id(0)`` of chunk ``program_id(1)``, head
    ``program_id(2)``."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk(chunk_indices, cu_seqlens, i_t, BT)
    end = tl.minimum(t0 + BT, eos)
    rows = t0 + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_g = tl.cumsum(_rows(gk, rows, t0, end, o_k, K, H, i_h), axis=0)
        b_qg = _rows(q, rows, t0, end, o_k, K, H, i_h) * tl.exp(b_g) * scale
        p_h, m_h = _state_tile(h, i_t, i_h, o_k, o_v, H, K, V)
        b_o += _dot(b_qg, tl.load(p_h, mask=m_h, other=0.), DT)
    b_A = _rows(A, rows, t0, end, tl.arange(0, BT), BT, H, i_h)
    b_o += _dot(b_A, _rows(v, rows, t0, end, o_v, V, H, i_h), DT)
    m_o = (rows < end)[:, None] & (o_v < V)[None, :]
    tl.store(o + (rows[:, None] * H + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_o)


@triton.jit
def _bwd_state_kernel(q, gk, do, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, H, K, V,
                      HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DT: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr):
    """Chunks in reverse: ``dh[c]`` = the loss gradient of the state leaving chunk ``c``; ``dh0`` that of the
    initial state."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    first = tl.load(chunk_offsets + i_n)
    chunks = tl.cdiv(eos - bos, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        p_dht, m_h = _state_tile(dht, i_n, i_h, o_k, o_v, H, K, V)
        b_dh += tl.load(p_dht, mask=m_h, other=0.).to(tl.float32)
    for i_s in range(0, chunks):
        i_c = chunks - 1 - i_s
        p_dh, m_h = _state_tile(dh, first + i_c, i_h, o_k, o_v, H, K, V)
        tl.store(p_dh, b_dh, mask=m_h)
        t0 = bos + i_c * BT
        end = tl.minimum(t0 + BT, eos)
        rows = t0 + tl.arange(0, BT)
        b_gk = _rows(gk, rows, t0, end, o_k, K, H, i_h)
        b_qg = _rows(q, rows, t0, end, o_k, K, H, i_h) * tl.exp(tl.cumsum(b_gk, axis=0)) * scale
        b_do = _rows(do, rows, t0, end, o_v, V, H, i_h)
        b_dh = b_dh * tl.exp(tl.sum(b_gk, axis=0))[:, None] + _dot(tl.trans(b_qg), b_do, DT)
    if STORE_DH0:
        p_dh0, m_h = _state_tile(dh0, i_n, i_h, o_k, o_v, H, K, V)
        tl.store(p_dh0, b_dh, mask=m_h)


@triton.jit
def _bwd_score_kernel(v, do, dA, cu_seqlens, chunk_indices, H, V, DT: tl.constexpr, BT: tl.constexpr,
                      BV: tl.constexpr):
    """``dA[t, h, s] = do_t . v_s`` for ``s <= t`` (0 above the diagonal), chunk ``program_id(0)``, head
    ``program_id(1)``."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _chunk(chunk_indices, cu_seqlens, i_t, BT)
    end = tl.minimum(t0 + BT, eos)
    rows = t0 + tl.arange(0, BT)
    cols = tl.arange(0, BT)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_dA += _dot(_rows(do, rows, t0, end, o_v, V, H, i_h), tl.trans(_rows(v, rows, t0, end, o_v, V, H, i_h)),
                     DT)
    b_dA = tl.where(cols[:, None] >= cols[None, :], b_dA, 0.)
    m_A = (rows < end)[:, None] & (cols < BT)[None, :]
    tl.store(dA + (rows[:, None] * H + i_h) * BT + cols[None, :], b_dA, mask=m_A)


@triton.jit
def _diagonal_grads(q, k, gk, dA, ti, t0, end, scale, K, H, i_h, o_k, BT: tl.constexpr, BC: tl.constexpr):
    """The diagonal sub-chunk's share of ``(dq~, dk)``, ``[BC, BK]`` each: ``dq~_t = sum_s dA_ts k_s W_ts`` and
    ``dk_s = sum_t dA_ts scale q_t W_ts`` (:func:`_diagonal_weights`)."""
    rows = ti + tl.arange(0, BC)
    b_q = _rows(q, rows, t0, end, o_k, K, H, i_h) * scale
    b_k = _rows(k, rows, t0, end, o_k, K, H, i_h)
    b_dAw = _rows(dA, rows, t0, end, ti - t0 + tl.arange(0, BC), BT, H, i_h)[:, :, None] * _diagonal_weights(
        gk, ti, end, o_k, K, H, i_h, BC)
    return tl.sum(b_dAw * b_k[None, :, :], axis=1), tl.sum(b_dAw * b_q[:, None, :], axis=0)


@triton.jit
def _bwd_intra_kernel(q, k, gk, dA, dq, dk, cu_seqlens, chunk_indices, scale, H, K, DT: tl.constexpr,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Intra-chunk ``dq~`` (the gradient of ``scale q``) and ``dk`` of sub-chunk ``program_id(1) % NC`` of chunk
    ``program_id(1) // NC``, key block ``program_id(0)``, head ``program_id(2)``."""
    NC: tl.constexpr = BT // BC
    i_k, i_ti, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, i_i = i_ti // NC, i_ti % NC
    t0, eos = _chunk(chunk_indices, cu_seqlens, i_t, BT)
    end = tl.minimum(t0 + BT, eos)
    ti = t0 + i_i * BC
    rows = ti + tl.arange(0, BC)
    cols = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(0, i_i):  # earlier key sub-chunks, around this sub-chunk's first token
        tj = t0 + i_j * BC
        b_kg = _rows(k, tj + cols, t0, end, o_k, K, H, i_h) * tl.exp(
            _to_anchor(gk, tj, ti, t0, end, o_k, K, H, i_h, BC, BT))
        b_dq += _dot(_rows(dA, rows, t0, end, i_j * BC + cols, BT, H, i_h), b_kg, DT)
    b_dq *= tl.exp(_from_anchor(gk, ti, end, o_k, K, H, i_h, BC))
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    for i_m in range(i_i + 1, NC):  # later query sub-chunks, around their first token
        tm = t0 + i_m * BC
        b_qg = _rows(q, tm + cols, t0, end, o_k, K, H, i_h) * tl.exp(
            _from_anchor(gk, tm, end, o_k, K, H, i_h, BC)) * scale
        b_dA = _rows(dA, tm + cols, t0, end, i_i * BC + cols, BT, H, i_h)
        b_dk += tl.exp(_to_anchor(gk, ti, tm, t0, end, o_k, K, H, i_h, BC, BT)) * _dot(tl.trans(b_dA), b_qg, DT)
    b_dq_diag, b_dk_diag = _diagonal_grads(q, k, gk, dA, ti, t0, end, scale, K, H, i_h, o_k, BT, BC)
    m_out = (rows < end)[:, None] & (o_k < K)[None, :]
    p_out = (rows[:, None] * H + i_h) * K + o_k[None, :]
    tl.store(dq + p_out, b_dq + b_dq_diag, mask=m_out)
    tl.store(dk + p_out, b_dk + b_dk_diag, mask=m_out)


@triton.jit
def _bwd_value_kernel(k, gk, do, dh, A, dv, cu_seqlens, chunk_indices, H, K, V, DT: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``dv = (k * exp(g_L - g)) dh + A^T do`` for value block ``program_id(0)`` of chunk ``program_id(1)``, head
    ``program_id(2)``."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk(chunk_indices, cu_seqlens, i_t, BT)
    end = tl.minimum(t0 + BT, eos)
    rows = t0 + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_kg = _rows(k, rows, t0, end, o_k, K, H, i_h) * tl.exp(_suffix_sums(gk, t0, end, o_k, K, H, i_h, BT))
        p_dh, m_h = _state_tile(dh, i_t, i_h, o_k, o_v, H, K, V)
        b_dv += _dot(b_kg, tl.load(p_dh, mask=m_h, other=0.), DT)
    b_A = _rows(A, rows, t0, end, tl.arange(0, BT), BT, H, i_h)
    b_dv += _dot(tl.trans(b_A), _rows(do, rows, t0, end, o_v, V, H, i_h), DT)
    m_v = (rows < end)[:, None] & (o_v < V)[None, :]
    tl.store(dv + (rows[:, None] * H + i_h) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_v)


@triton.jit
def _bwd_query_key_kernel(q, k, v, gk, h, do, dh, dq_intra, dk_intra, dq, dk, dgk, cu_seqlens, chunk_indices,
                          scale, H, K, V, DT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr):
    """``dq``, ``dk`` and ``dgk`` of key block ``program_id(0)`` of chunk ``program_id(1)``, head
    ``program_id(2)``: the inter-chunk terms plus the intra-chunk ones from ``_bwd_intra_kernel``."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk(chunk_indices, cu_seqlens, i_t, BT)
    end = tl.minimum(t0 + BT, eos)
    rows = t0 + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    b_q = _rows(q, rows, t0, end, o_k, K, H, i_h)
    b_k = _rows(k, rows, t0, end, o_k, K, H, i_h)
    b_gk = _rows(gk, rows, t0, end, o_k, K, H, i_h)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dh_decay = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p_h, m_h = _state_tile(h, i_t, i_h, o_k, o_v, H, K, V)
        p_dh, m_h = _state_tile(dh, i_t, i_h, o_k, o_v, H, K, V)
        b_h = tl.load(p_h, mask=m_h, other=0.)
        b_dh = tl.load(p_dh, mask=m_h, other=0.)
        b_dq += _dot(_rows(do, rows, t0, end, o_v, V, H, i_h), tl.trans(b_h), DT)
        b_dk += _dot(_rows(v, rows, t0, end, o_v, V, H, i_h), tl.trans(b_dh), DT)
        b_dh_decay += tl.sum(b_h * b_dh, axis=1)
    m_out = (rows < end)[:, None] & (o_k < K)[None, :]
    p_out = (rows[:, None] * H + i_h) * K + o_k[None, :]
    b_dq = (b_dq * tl.exp(tl.cumsum(b_gk, axis=0)) + tl.load(dq_intra + p_out, mask=m_out, other=0.)) * scale
    b_dk_state = b_dk * tl.exp(_suffix_sums(gk, t0, end, o_k, K, H, i_h, BT))
    b_dk = b_dk_state + tl.load(dk_intra + p_out, mask=m_out, other=0.)
    # the chunk's last gate sum also scales the entering state and every key's path to the chunk's end
    b_dg_last = b_dh_decay * tl.exp(tl.sum(b_gk, axis=0)) + tl.sum(b_dk_state * b_k, axis=0)
    b_dgk = tl.cumsum(b_q * b_dq - b_k * b_dk, axis=0, reverse=True) + b_dg_last[None, :]
    tl.store(dq + p_out, b_dq.to(dq.dtype.element_ty), mask=m_out)
    tl.store(dk + p_out, b_dk.to(dk.dtype.element_ty), mask=m_out)
    tl.store(dgk + p_out, b_dgk.to(dgk.dtype.element_ty), mask=m_out)


@triton.jit
def _fused_recurrent_kernel(q, k, v, gk, o, h0, ht, cu_seqlens, scale, H, K, V, HAS_H0: tl.constexpr,
                            STORE_FINAL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Value block ``program_id(0)`` of sequence and head ``program_id(1)``: the recurrence token by token with
    the ``[BK >= K, BV]`` state in registers."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        p_h0, m_h = _state_tile(h0, i_n, i_h, o_k, o_v, H, K, V)
        b_h += tl.load(p_h0, mask=m_h, other=0.).to(tl.float32)
    for t in range(bos, eos):
        p_k = (t * H + i_h) * K + o_k
        b_q = tl.load(q + p_k, mask=m_k, other=0.).to(tl.float32) * scale
        b_k = tl.load(k + p_k, mask=m_k, other=0.).to(tl.float32)
        b_gk = tl.load(gk + p_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_h = b_h * tl.exp(b_gk)[:, None] + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        p_ht, m_h = _state_tile(ht, i_n, i_h, o_k, o_v, H, K, V)
        tl.store(p_ht, b_h, mask=m_h)


@dataclass(frozen=True)
class _Plan:
    """How one call cuts its sequences into chunks.

    ``cu_seqlens`` int32 ``[n + 1]`` token offsets in the packed ``[batch * seq]`` rows; ``chunk_indices`` int32
    ``[chunks, 2]`` (sequence, chunk within it); ``chunk_offsets`` int32 ``[n + 1]`` first global chunk of each
    sequence; ``BT`` the chunk size.
    """

    cu_seqlens: torch.Tensor
    chunk_indices: torch.Tensor
    chunk_offsets: torch.Tensor
    sequences: int
    chunks: int
    BT: int


def _plan_of(offsets: torch.Tensor, device: torch.device) -> _Plan:
    """The chunking of the sequences ``[offsets[i], offsets[i + 1])`` (int64 on CPU)."""
    lengths = offsets[1:] - offsets[:-1]
    longest = int(lengths.max()) if lengths.numel() else 0
    block = min(64, max(SUB_CHUNK, triton.next_power_of_2(max(longest, 1))))
    counts = (lengths + block - 1) // block
    chunk_offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    sequence = torch.repeat_interleave(torch.arange(len(counts)), counts)
    within = torch.arange(int(counts.sum())) - chunk_offsets[sequence]
    indices = torch.stack([sequence, within], 1)
    to_device = dict(device=device, dtype=torch.int32)
    return _Plan(offsets.to(**to_device), indices.to(**to_device).contiguous(), chunk_offsets.to(**to_device),
                 len(counts), len(indices), block)


@functools.lru_cache(maxsize=64)
def _rows_plan(batch: int, seq_len: int, device: torch.device) -> _Plan:
    """The plan of ``batch`` rows of ``seq_len`` tokens, kept: decoding repeats it every layer and token, and each
    plan costs three host-to-device copies."""
    return _plan_of(torch.arange(batch + 1, dtype=torch.int64) * seq_len, device)


def _plan(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> _Plan:
    """The chunking of ``batch`` rows of ``seq_len`` tokens, or of the ``cu_seqlens`` pieces of one row."""
    if cu_seqlens is None:
        return _rows_plan(batch, seq_len, device)
    return _plan_of(cu_seqlens.to("cpu", torch.int64), device)


def _blocks(key_dim: int, value_dim: int) -> tuple[int, int]:
    """``(BK, BV)``: powers of two in 16..64 (the ``tl.dot`` minimum, and the register budget)."""
    return min(64, max(16, triton.next_power_of_2(key_dim))), min(64, max(16, triton.next_power_of_2(value_dim)))


def _intra_block(block_k: int) -> int:
    """Key block of the intra-chunk kernels, whose diagonal sub-chunk holds a ``[16, 16, block]`` tensor: 16 keeps
    it in GPU registers; the interpreter, whose cost is per operation, takes the whole ``block_k`` at once."""
    return block_k if _INTERPRETER else SUB_CHUNK


def _check_triton_inputs(q: torch.Tensor, gk: torch.Tensor) -> None:
    for name, tensor in (("q, k, v", q), ("gk", gk)):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"the triton GLA kernels take fp16, bf16 or fp32 {name}, got {tensor.dtype}; cast "
                            "them, or use backend='cpu' or 'reference' for float64.")


def _forward(q, k, v, gk, scale, initial_state, output_final_state, plan):
    """Forward kernels on contiguous inputs -> ``(o, final state or None, h, A)``."""
    _, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    BK, BV = _blocks(key_dim, value_dim)
    DT = dot_dtype(q.dtype)
    h = _new_output((plan.chunks, heads, key_dim, value_dim), torch.float32, q.device)
    A = _new_output((*q.shape[:3], plan.BT), torch.float32, q.device)
    o = _new_output(v.shape, q.dtype, q.device)
    ht = _new_output((plan.sequences, heads, key_dim, value_dim), torch.float32, q.device) \
        if output_final_state else None
    grid_state = (triton.cdiv(key_dim, BK), triton.cdiv(value_dim, BV), plan.sequences * heads)
    _fwd_state_kernel[grid_state](k, v, gk, h, initial_state, ht, plan.cu_seqlens, plan.chunk_offsets, heads,
                                  key_dim, value_dim, HAS_H0=initial_state is not None,
                                  STORE_FINAL=output_final_state, DT=DT, BT=plan.BT, BK=BK, BV=BV, **_BIG_TILES)
    if plan.chunks:
        NC = plan.BT // SUB_CHUNK
        _fwd_intra_kernel[(NC * NC, plan.chunks, heads)](q, k, gk, A, plan.cu_seqlens, plan.chunk_indices, scale,
                                                          heads, key_dim, DT=DT, BT=plan.BT, BC=SUB_CHUNK,
                                                          BK=_intra_block(BK))
        _fwd_output_kernel[(triton.cdiv(value_dim, BV), plan.chunks, heads)](
            q, v, gk, h, A, o, plan.cu_seqlens, plan.chunk_indices, scale, heads, key_dim, value_dim, DT=DT,
            BT=plan.BT, BK=BK, BV=BV, **_BIG_TILES)
    return o, ht, h, A


def _backward(q, k, v, gk, h, A, do, dht, scale, need_dh0, plan):
    """Backward kernels -> ``(dq, dk, dv, dgk, d initial state fp32 or None)``."""
    _, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    BK, BV = _blocks(key_dim, value_dim)
    DT = dot_dtype(q.dtype)
    device = q.device
    dh = _new_output(h.shape, torch.float32, device)
    dh0 = _new_output((plan.sequences, heads, key_dim, value_dim), torch.float32, device) if need_dh0 else None
    grid_state = (triton.cdiv(key_dim, BK), triton.cdiv(value_dim, BV), plan.sequences * heads)
    _bwd_state_kernel[grid_state](q, gk, do, dh, dht, dh0, plan.cu_seqlens, plan.chunk_offsets, scale, heads,
                                  key_dim, value_dim, HAS_DHT=dht is not None, STORE_DH0=need_dh0, DT=DT,
                                  BT=plan.BT, BK=BK, BV=BV, **_BIG_TILES)
    dq, dk = _new_output(q.shape, q.dtype, device), _new_output(k.shape, k.dtype, device)
    dv, dgk = _new_output(v.shape, v.dtype, device), _new_output(gk.shape, gk.dtype, device)
    if plan.chunks:
        dA = _new_output(A.shape, torch.float32, device)
        dq_intra = _new_output(q.shape, torch.float32, device)
        dk_intra = _new_output(k.shape, torch.float32, device)
        NC, NK, NV = plan.BT // SUB_CHUNK, triton.cdiv(key_dim, BK), triton.cdiv(value_dim, BV)
        common = (plan.cu_seqlens, plan.chunk_indices)
        _bwd_score_kernel[(plan.chunks, heads)](v, do, dA, *common, heads, value_dim, DT=DT, BT=plan.BT, BV=BV,
                                                **_BIG_TILES)
        BKI = _intra_block(BK)
        _bwd_intra_kernel[(triton.cdiv(key_dim, BKI), plan.chunks * NC, heads)](
            q, k, gk, dA, dq_intra, dk_intra, *common, scale, heads, key_dim, DT=DT, BT=plan.BT, BC=SUB_CHUNK, BK=BKI)
        _bwd_value_kernel[(NV, plan.chunks, heads)](k, gk, do, dh, A, dv, *common, heads, key_dim, value_dim, DT=DT,
                                                    BT=plan.BT, BK=BK, BV=BV, **_BIG_TILES)
        _bwd_query_key_kernel[(NK, plan.chunks, heads)](q, k, v, gk, h, do, dh, dq_intra, dk_intra, dq, dk, dgk,
                                                        *common, scale, heads, key_dim, value_dim, DT=DT,
                                                        BT=plan.BT, BK=BK, BV=BV, **_BIG_TILES)
    return dq, dk, dv, dgk, dh0


class _ChunkGLA(torch.autograd.Function):
    """Chunkwise GLA with Triton forward and backward kernels (inputs flattened to one packed row)."""

    @staticmethod
    def forward(ctx, q, k, v, gk, initial_state, scale, output_final_state, plan):
        o, ht, h, A = _forward(q, k, v, gk, scale, initial_state, output_final_state, plan)
        ctx.save_for_backward(q, k, v, gk, h, A)
        ctx.scale, ctx.plan = scale, plan
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return o, ht

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dht):
        q, k, v, gk, h, A = ctx.saved_tensors
        need_dh0 = ctx.initial_dtype is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dgk, dh0 = _backward(q, k, v, gk, h, A, do.contiguous(),
                                         None if dht is None else dht.contiguous(), ctx.scale, need_dh0, ctx.plan)
        dh0 = None if dh0 is None else dh0.to(ctx.initial_dtype)
        return dq, dk, dv, dgk, dh0, None, None, None


def _packed(x: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, H, D]`` -> contiguous ``[1, batch * seq, H, D]`` (batch rows become packed sequences)."""
    return x.reshape(1, -1, *x.shape[2:]).contiguous()


def chunk_gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                     cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GLA on Triton kernels, differentiable (inputs checked by :func:`~.reference.check_inputs`).

    Args:
        q, k, gk: ``[batch, seq, heads, key_dim]``; v: ``[batch, seq, heads, value_dim]``; fp16, bf16 or fp32.
        scale: query scale.
        initial_state: ``[n, heads, key_dim, value_dim]`` or None; ``n`` is batch or num_sequences.
        output_final_state: also return each sequence's final state.
        cu_seqlens: int64 ``[n + 1]`` packed-sequence offsets (batch 1), or None.

    Returns ``(o [batch, seq, heads, value_dim] in q's dtype, final state [n, heads, key_dim, value_dim] fp32 or
    None)``.
    """
    _check_triton_inputs(q, gk)
    batch, seq_len = q.shape[:2]
    plan = _plan(batch, seq_len, cu_seqlens, q.device)
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _ChunkGLA.apply(_packed(q), _packed(k), _packed(v), _packed(gk), h0, scale, output_final_state, plan)
    return o.reshape(v.shape), ht


def fused_recurrent_gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float,
                               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA token by token in one kernel (decoding); arguments and results as :func:`chunk_gla_triton`.

    The kernel has no backward: when autograd needs gradients (an input requires grad, e.g. a model in eval mode
    outside ``torch.no_grad``), the call runs :func:`chunk_gla_triton`, the same function with backward kernels.
    """
    _check_triton_inputs(q, gk)
    tensors = (q, k, v, gk) if initial_state is None else (q, k, v, gk, initial_state)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return chunk_gla_triton(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    plan = _plan(batch, seq_len, cu_seqlens, q.device)
    BK = triton.next_power_of_2(key_dim)
    BV = min(triton.next_power_of_2(value_dim), max(1, 4096 // BK))  # the [BK, BV] state stays in registers
    o = _new_output(v.shape, q.dtype, q.device)
    ht = _new_output((plan.sequences, heads, key_dim, value_dim), torch.float32, q.device) \
        if output_final_state else None
    h0 = None if initial_state is None else initial_state.contiguous()
    _fused_recurrent_kernel[(triton.cdiv(value_dim, BV), plan.sequences * heads)](
        _packed(q), _packed(k), _packed(v), _packed(gk), o, h0, ht, plan.cu_seqlens, scale, heads, key_dim,
        value_dim, HAS_H0=h0 is not None, STORE_FINAL=output_final_state, BK=BK, BV=BV)
    return o, ht
