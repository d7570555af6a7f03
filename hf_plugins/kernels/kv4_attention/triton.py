"""Triton attention that reads a 4-bit packed KV cache directly (decoding and speculative verification).

Split-KV ("flash decoding"): program ``(b * kv_heads + h, split)`` takes every query row of kv head ``h`` (the
``heads / kv_heads`` query heads that share it, times the query tokens: one ``tl.dot`` block, so grouped-query
attention reads each packed key once) against one slice of the cached tokens. Per block of ``BLOCK_N`` tokens it
loads the nibbles and their fp16 scales, dequantizes in registers into even and odd channels (the two nibbles of
a byte; the query is split the same way, so no interleave is needed), and runs an online softmax in base 2. Each
split writes its normalised partial output and log-sum-exp; a second kernel combines them exactly into ``[batch,
queries, heads, head_dim]``. The cache's HBM traffic is the packed bytes: 4.5-5 bits per element instead of 16.

Under the Triton interpreter (``TRITON_INTERPRET=1`` before import) the same kernel runs on CPU tensors; bf16
operands then go to ``tl.dot`` as fp32 (the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hf_plugins._env import triton_interpreter

from .reference import PackedKV, visible_keys

_INTERPRETER = triton_interpreter()
_LOG2E = 1.4426950408889634
_TARGET_PROGRAMS = 264
"""Programs to aim for when splitting the tokens: two waves of an H100's 132 SMs."""


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _dequantize(codes, scale, minimum, SYMMETRIC: tl.constexpr):
    """Nibbles (as floats) -> values: ``(code - 8) * scale`` or ``code * scale + minimum``."""
    if SYMMETRIC:
        values = (codes - 8.0) * scale
    else:
        values = codes * scale + minimum
    return values


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    if DT == tl.float32:
        # "ieee" keeps fp32 exact on GPUs (the default rounds both operands to tf32).
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a.to(DT), b.to(DT))
    return out


@triton.jit
def _kv4_attention_kernel(
    q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, mask, o_part, lse_part,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kt, s_ksb, s_ksh, s_kst,
    s_vb, s_vh, s_vt, s_vsb, s_vsh, s_vst,
    s_mb, s_mh, s_mq,
    KV_HEADS, GROUPS, T_Q, T_K, SPLIT_LEN, qk_scale,
    HALF_D: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, K_SYM: tl.constexpr, V_SYM: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    DT: tl.constexpr,
):
    """Partial attention of kv head ``h``'s query rows to tokens ``[split * SPLIT_LEN, ..)``.

    Row ``m`` of the block is query head ``h * GROUPS + m // T_Q`` at query token ``m % T_Q``. Writes
    ``o_part [B * KV_HEADS, splits, BLOCK_M, 2 * HALF_D]`` (normalised) and ``lse_part [.., splits, BLOCK_M]``
    (base-2 log-sum-exp of the scaled scores; -inf where a row saw no token).
    """
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // KV_HEADS, i_bh % KV_HEADS
    o_m = tl.arange(0, BLOCK_M)
    o_j = tl.arange(0, BLOCK_J).to(tl.int64)
    m_m, m_j = o_m < GROUPS * T_Q, o_j < HALF_D
    head, token = i_h * GROUPS + o_m // T_Q, o_m % T_Q
    p_q = q + i_b * s_qb + head[:, None].to(tl.int64) * s_qh + token[:, None].to(tl.int64) * s_qt + 2 * o_j[None, :]
    m_q = m_m[:, None] & m_j[None, :]
    # The softmax runs in base 2: the scores carry log2(e) with the scale.
    b_qe = (tl.load(p_q, mask=m_q, other=0.).to(tl.float32) * qk_scale).to(DT)
    b_qo = (tl.load(p_q + 1, mask=m_q, other=0.).to(tl.float32) * qk_scale).to(DT)

    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    b_oe = tl.zeros([BLOCK_M, BLOCK_J], tl.float32)
    b_oo = tl.zeros([BLOCK_M, BLOCK_J], tl.float32)
    start = i_s * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, T_K)
    last_visible = T_K - T_Q + token  # causal limit when no mask is given
    k_base, v_base = k_codes + i_b * s_kb + i_h * s_kh, v_codes + i_b * s_vb + i_h * s_vh
    ks_base, vs_base = i_b * s_ksb + i_h * s_ksh, i_b * s_vsb + i_h * s_vsh
    ks_col_e, ks_col_o = (2 * o_j) // K_GROUP, (2 * o_j + 1) // K_GROUP
    vs_col_e, vs_col_o = (2 * o_j) // V_GROUP, (2 * o_j + 1) // V_GROUP
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < end
        # Keys transposed, [BLOCK_J, BLOCK_N]: the dot wants K^T.
        m_kt = m_j[:, None] & m_n[None, :]
        b_kc = tl.load(k_base + o_n[None, :] * s_kt + o_j[:, None], mask=m_kt, other=0)
        p_ks = ks_base + o_n[None, :] * s_kst
        b_kse = tl.load(k_scale + p_ks + ks_col_e[:, None], mask=m_kt, other=0.).to(tl.float32)
        b_kso = tl.load(k_scale + p_ks + ks_col_o[:, None], mask=m_kt, other=0.).to(tl.float32)
        b_kme = b_kse
        b_kmo = b_kso
        if not K_SYM:
            b_kme = tl.load(k_min + p_ks + ks_col_e[:, None], mask=m_kt, other=0.).to(tl.float32)
            b_kmo = tl.load(k_min + p_ks + ks_col_o[:, None], mask=m_kt, other=0.).to(tl.float32)
        b_ke = _dequantize((b_kc & 15).to(tl.float32), b_kse, b_kme, K_SYM)
        b_ko = _dequantize((b_kc >> 4).to(tl.float32), b_kso, b_kmo, K_SYM)
        b_s = _dot(b_qe, b_ke, DT) + _dot(b_qo, b_ko, DT)

        visible = m_m[:, None] & m_n[None, :]
        if HAS_MASK:
            p_mask = mask + i_b * s_mb + head[:, None].to(tl.int64) * s_mh + token[:, None].to(tl.int64) * s_mq
            visible = visible & (tl.load(p_mask + o_n[None, :], mask=visible, other=0) != 0)
        else:
            visible = visible & (o_n[None, :] <= last_visible[:, None])
        b_s = tl.where(visible, b_s, float("-inf"))

        b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
        # Rows that have seen no visible token yet keep a finite reference point (exp2(-inf - 0) = 0).
        b_ref = tl.where(b_new == float("-inf"), 0., b_new)
        b_p = tl.exp2(b_s - b_ref[:, None])
        b_alpha = tl.exp2(b_max - b_ref)
        b_sum = b_sum * b_alpha + tl.sum(b_p, axis=1)
        b_max = b_new

        m_v = m_n[:, None] & m_j[None, :]
        b_vc = tl.load(v_base + o_n[:, None] * s_vt + o_j[None, :], mask=m_v, other=0)
        p_vs = vs_base + o_n[:, None] * s_vst
        b_vse = tl.load(v_scale + p_vs + vs_col_e[None, :], mask=m_v, other=0.).to(tl.float32)
        b_vso = tl.load(v_scale + p_vs + vs_col_o[None, :], mask=m_v, other=0.).to(tl.float32)
        b_vme = b_vse
        b_vmo = b_vso
        if not V_SYM:
            b_vme = tl.load(v_min + p_vs + vs_col_e[None, :], mask=m_v, other=0.).to(tl.float32)
            b_vmo = tl.load(v_min + p_vs + vs_col_o[None, :], mask=m_v, other=0.).to(tl.float32)
        b_ve = _dequantize((b_vc & 15).to(tl.float32), b_vse, b_vme, V_SYM)
        b_vo = _dequantize((b_vc >> 4).to(tl.float32), b_vso, b_vmo, V_SYM)
        b_oe = b_oe * b_alpha[:, None] + _dot(b_p, b_ve, DT)
        b_oo = b_oo * b_alpha[:, None] + _dot(b_p, b_vo, DT)

    b_seen = b_sum > 0
    b_safe = tl.where(b_seen, b_sum, 1.)
    b_norm = tl.where(b_seen, 1 / b_safe, 0.)
    o_row = (i_bh * tl.num_programs(1) + i_s).to(tl.int64) * BLOCK_M + o_m
    p_o = o_part + o_row[:, None] * (2 * HALF_D) + 2 * o_j[None, :]
    m_o = m_m[:, None] & m_j[None, :]
    tl.store(p_o, b_oe * b_norm[:, None], mask=m_o)
    tl.store(p_o + 1, b_oo * b_norm[:, None], mask=m_o)
    b_lse = tl.where(b_seen, b_max + tl.log2(b_safe), float("-inf"))
    tl.store(lse_part + o_row, b_lse, mask=m_m)


@triton.jit
def _merge_splits_kernel(o_part, lse_part, out, SPLITS, KV_HEADS, GROUPS, T_Q, HEADS,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine one query row's split partials by their log-sum-exp into ``out [B, T_Q, HEADS, D]``; a row that saw
    no token in any split gets zeros. Grid ``(B * KV_HEADS, GROUPS * T_Q)``."""
    i_bh, i_m = tl.program_id(0), tl.program_id(1)
    o_s, o_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    m_s, m_d = o_s < SPLITS, o_d < D
    rows = (i_bh * SPLITS + o_s).to(tl.int64) * BLOCK_M + i_m
    b_lse = tl.load(lse_part + rows, mask=m_s, other=float("-inf"))
    b_top = tl.max(b_lse, axis=0)
    b_w = tl.exp2(b_lse - tl.where(b_top == float("-inf"), 0., b_top))
    b_total = tl.sum(b_w, axis=0)
    b_w = b_w / tl.where(b_total > 0, b_total, 1.)
    b_o = tl.load(o_part + rows[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.)
    b_out = tl.sum(b_o * b_w[:, None], axis=0)
    i_b, i_h = i_bh // KV_HEADS, i_bh % KV_HEADS
    head, token = i_h * GROUPS + i_m // T_Q, i_m % T_Q
    p_out = out + ((i_b * T_Q + token) * HEADS + head).to(tl.int64) * D + o_d
    tl.store(p_out, b_out.to(out.dtype.element_ty), mask=m_d)


def _scale_strides(scale: torch.Tensor, tokens: int) -> tuple[int, int, int]:
    """Strides ``(batch, head, token)`` of a scale tensor; one shared by every token gets token stride 0."""
    return scale.stride(0), scale.stride(1), 0 if scale.shape[2] == 1 else scale.stride(2)


def _check(query: torch.Tensor, key: PackedKV, value: PackedKV) -> None:
    if key.shape[:3] != value.shape[:3] or key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
        raise ValueError(f"kv4_attention needs keys and values [batch, kv_heads, tokens, {query.shape[-1]}], got "
                         f"keys {tuple(key.shape)} and values {tuple(value.shape)} for queries {tuple(query.shape)}.")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"kv4_attention: query heads ({query.shape[1]}) must be a multiple of kv heads "
                         f"({key.shape[1]}).")
    for packed in (key, value):
        if packed.codes.stride(-1) != 1 or packed.scale.stride(-1) != 1:
            raise ValueError("kv4_attention needs codes and scales contiguous along the head dimension; call "
                             ".contiguous() on them.")


def kv4_attention_triton(query: torch.Tensor, key: PackedKV, value: PackedKV, mask: torch.Tensor | None = None,
                         scale: float | None = None, num_splits: int | None = None, block_n: int = 64) -> torch.Tensor:
    """Attention of ``query [batch, heads, queries, head_dim]`` to packed ``key``/``value`` -> ``[batch, queries,
    heads, head_dim]`` in ``query.dtype``; same contract as
    :func:`~hf_plugins.kernels.kv4_attention.reference.kv4_attention_reference`.

    Args:
        num_splits: slices of the cached tokens run by separate programs (default: enough programs for two
            waves of SMs).
        block_n: cached tokens per step, a power of two >= 16.
    """
    _check(query, key, value)
    batch, heads, queries, head_dim = query.shape
    kv_heads, tokens = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rows = groups * queries
    block_m = max(16, triton.next_power_of_2(rows))
    if tokens == 0:
        return query.new_zeros(batch, queries, heads, head_dim)
    splits = num_splits or max(1, min(triton.cdiv(tokens, block_n), _TARGET_PROGRAMS // (batch * kv_heads)))
    split_len = triton.cdiv(triton.cdiv(tokens, splits), block_n) * block_n
    splits = triton.cdiv(tokens, split_len)

    if mask is not None:
        mask = visible_keys(mask, queries, tokens, query.device)
        mask = mask.expand(batch, mask.shape[1], queries, tokens).view(torch.uint8)
        mask_strides = (mask.stride(0), 0 if mask.shape[1] == 1 else mask.stride(1), mask.stride(2))
    else:
        mask_strides = (0, 0, 0)
    dt = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(query.dtype, tl.float32)
    if _INTERPRETER and dt == tl.bfloat16:
        dt = tl.float32

    o_part = _new_output((batch * kv_heads, splits, block_m, head_dim), torch.float32, query.device)
    lse_part = _new_output((batch * kv_heads, splits, block_m), torch.float32, query.device)
    qk_scale = (scale if scale is not None else 1 / math.sqrt(head_dim)) * _LOG2E
    _kv4_attention_kernel[(batch * kv_heads, splits)](
        query, key.codes, key.scale, key.minimum if key.minimum is not None else key.scale,
        value.codes, value.scale, value.minimum if value.minimum is not None else value.scale,
        mask if mask is not None else key.codes, o_part, lse_part,
        query.stride(0), query.stride(1), query.stride(2),
        key.codes.stride(0), key.codes.stride(1), key.codes.stride(2), *_scale_strides(key.scale, tokens),
        value.codes.stride(0), value.codes.stride(1), value.codes.stride(2), *_scale_strides(value.scale, tokens),
        *mask_strides,
        kv_heads, groups, queries, tokens, split_len, qk_scale,
        HALF_D=head_dim // 2, K_GROUP=key.group_size, V_GROUP=value.group_size,
        K_SYM=key.minimum is None, V_SYM=value.minimum is None, HAS_MASK=mask is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_J=max(16, triton.next_power_of_2(head_dim // 2)), DT=dt,
    )
    out = _new_output((batch, queries, heads, head_dim), query.dtype, query.device)
    _merge_splits_kernel[(batch * kv_heads, rows)](
        o_part, lse_part, out, splits, kv_heads, groups, queries, heads,
        D=head_dim, BLOCK_M=block_m, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
