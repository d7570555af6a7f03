"""GLA on CPU: the chunkwise-parallel form with secondary-level chunking, in torch (fp32 math), differentiable.

The sequence is cut into chunks of ``CHUNK`` tokens. With ``g`` the chunk-local cumulative sum of ``gk`` (so
``g`` falls along the chunk), ``S`` the state entering the chunk and ``L`` its last token:

    o_t    = (q_t * exp(g_t)) S + sum_{s <= t} A_ts v_s,   A_ts = sum_d q_td k_sd exp(g_td - g_sd)
    S_next = exp(g_L) * S + sum_s (k_s * exp(g_L - g_s))^T v_s

Every exponent above is ``<= 0`` except inside ``A``, where factoring ``exp(g_t - g_s)`` into ``exp(g_t)`` and
``exp(-g_s)`` would overflow once the gates have summed past about -88. So ``A`` is built from sub-chunks of
``SUB_CHUNK`` tokens (the paper's secondary level): a query sub-chunk against earlier key sub-chunks factors
around the gate at the query sub-chunk's first token, which lies between the two (both factors ``<= 1``, one
matmul); a sub-chunk against itself takes each pair's exponent, one diagonal at a time. Every exponent is a
sum of gates over its own run of tokens, never a difference of two long sums (with gates near -20, chunk sums
reach -1000 and their difference keeps ~1e-5 of relative precision in fp32), and is floored at ``LOG_FLOOR``.
The state passes from chunk to chunk in a short Python loop, vectorised over sequences.

Sequences (batch rows, or the ``cu_seqlens`` pieces of row 0) are padded to whole chunks with ``k = v = 0`` and
``gk = 0``, which leave the state unchanged, so a sequence's final state is the state after its padded end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import compute_dtype

__all__ = ["CHUNK", "LOG_FLOOR", "SUB_CHUNK", "chunk_gla_cpu"]

CHUNK = 64
SUB_CHUNK = 8  # exact pairwise scores cost ~SUB_CHUNK / 2 x the input's work; 8 balances that against the matmuls
LOG_FLOOR = -80.0  # exp(-80) ~ 2e-35 is still a normal fp32: gate sums below it are floored


@dataclass(frozen=True)
class _Layout:
    """Where the packed rows go in the padded chunk layout.

    ``index [chunks, chunk]``: the packed row of each slot (``rows`` = a zero row for padding); ``valid`` marks real
    tokens; ``chunk_seq``/``chunk_pos [chunks]``: each chunk's sequence and position in it; ``scan [sequences,
    most chunks]``: each sequence's chunks in order (``chunks`` = an identity step for shorter sequences).
    """

    index: torch.Tensor
    valid: torch.Tensor
    chunk_seq: torch.Tensor
    chunk_pos: torch.Tensor
    scan: torch.Tensor


def _chunk_size(lengths: torch.Tensor) -> int:
    """``CHUNK``, or the next power of two >= the longest sequence when that is shorter (decode-sized calls)."""
    longest = int(lengths.max()) if lengths.numel() else 1
    size = SUB_CHUNK
    while size < min(longest, CHUNK):
        size *= 2
    return size


def _layout(starts: torch.Tensor, lengths: torch.Tensor, rows: int, chunk: int) -> _Layout:
    """The padded chunk layout of sequences ``[starts, starts + lengths)`` of ``rows`` packed rows."""
    counts = (lengths + chunk - 1) // chunk
    chunks = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts
    chunk_seq = torch.repeat_interleave(torch.arange(len(counts)), counts)
    chunk_pos = torch.arange(chunks) - first[chunk_seq]
    offset = chunk_pos[:, None] * chunk + torch.arange(chunk)
    valid = offset < lengths[chunk_seq][:, None]
    index = torch.where(valid, starts[chunk_seq][:, None] + offset, rows)
    most = int(counts.max()) if counts.numel() else 0
    steps = torch.arange(most)
    scan = torch.where(steps < counts[:, None], first[:, None] + steps, chunks)
    return _Layout(index, valid, chunk_seq, chunk_pos, scan)


def _to_chunks(x: torch.Tensor, layout: _Layout, dtype: torch.dtype) -> torch.Tensor:
    """Packed ``x [rows, H, D]`` -> ``[chunks, H, chunk, D]`` in ``dtype``, zeros in the padding slots."""
    x = x.to(dtype)
    if bool(layout.valid.all()) and layout.index.numel() == x.shape[0]:
        slots = x.reshape(*layout.index.shape, *x.shape[1:])
    else:
        padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
        slots = padded[layout.index]
    return slots.transpose(1, 2)


def _pass_states(decay: torch.Tensor, update: torch.Tensor, initial: torch.Tensor,
                 layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The state entering each chunk and each sequence's final state.

    Args:
        decay: ``[chunks, H, K]`` ``exp(g_L)`` per chunk; update: ``[chunks, H, K, V]`` the chunk's own state.
        initial: ``[sequences, H, K, V]``.

    Returns ``(entering [chunks, H, K, V], final [sequences, H, K, V])``.
    """
    # gathered once and unbound: indexing inside the loop would cost a full-size zero gradient per step
    decays = torch.cat([decay, decay.new_ones(1, *decay.shape[1:])])[layout.scan].unbind(1)
    updates = torch.cat([update, update.new_zeros(1, *update.shape[1:])])[layout.scan].unbind(1)
    state, entering = initial, []
    for step_decay, step_update in zip(decays, updates):
        entering.append(state)
        state = step_decay[..., None] * state + step_update
    if not entering:
        return update[:0], state
    return torch.stack(entering)[layout.chunk_pos, layout.chunk_seq], state


def _suffix_sums(gk: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[s] = sum_{u > s} gk[u]`` along ``dim`` (exclusive suffix sums), summed directly, never as a
    difference of prefix sums."""
    shifted = torch.cat([gk.narrow(dim, 1, gk.shape[dim] - 1), torch.zeros_like(gk.narrow(dim, 0, 1))], dim)
    return shifted.flip(dim).cumsum(dim).flip(dim)


def _exp(exponent: torch.Tensor) -> torch.Tensor:
    """``exp`` of a gate sum (``<= 0``) floored at ``LOG_FLOOR``: below it a term is noise, and fp32 ``exp`` of
    -100 (a denormal) or -inf runs 3-10x slower than of -10."""
    return torch.exp(exponent.clamp_min(LOG_FLOOR))


def _diagonal_exponents(gk: torch.Tensor) -> list[torch.Tensor]:
    """``[e_0, .., e_{c-1}]`` for ``gk [..., c, K]``: ``e_d [..., c - d, K]`` holds ``sum_{s < u <= s + d} gk_u``
    for the pairs ``(s + d, s)``, each the previous diagonal's plus one more gate (no differences of sums)."""
    exponents = [torch.zeros_like(gk)]
    for d in range(1, gk.shape[-2]):
        exponents.append(exponents[-1][..., :-1, :] + gk[..., d:, :])
    return exponents


class _DiagonalScores(torch.autograd.Function):
    """Exact scores inside each sub-chunk: ``q, k, gk [..., c, K]`` -> ``[..., c, c]`` lower-triangular, one
    diagonal ``d`` (the pairs ``(s + d, s)``) at a time. The backward is written out: autograd through the
    per-diagonal slices would zero-fill a full-size gradient for every slice."""

    @staticmethod
    def forward(ctx, q, k, gk):
        ctx.save_for_backward(q, k, gk)
        size = q.shape[-2]
        scores = q.new_zeros(*q.shape[:-1], size)
        for d, exponent in enumerate(_diagonal_exponents(gk)):
            pairs = (q[..., d:, :] * k[..., :size - d, :] * _exp(exponent)).sum(-1)
            scores += torch.diag_embed(pairs, offset=-d)
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_scores):
        q, k, gk = ctx.saved_tensors
        size = q.shape[-2]
        dq, dk, dgk = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(gk)
        carry = None  # gradient of diagonal d + 1's exponent, which extends diagonal d's
        for d, exponent in reversed(list(enumerate(_diagonal_exponents(gk)))):
            d_pairs = torch.diagonal(d_scores, offset=-d, dim1=-2, dim2=-1)[..., None] * _exp(exponent)
            d_query = d_pairs * k[..., :size - d, :]
            dq[..., d:, :] += d_query
            dk[..., :size - d, :] += d_pairs * q[..., d:, :]
            # exp's own derivative, also below the floor (where it is < 2e-35 instead of 0): no mask pass
            d_exponent = d_query * q[..., d:, :]
            if carry is not None:
                d_exponent[..., :-1, :] += carry
            if d:
                dgk[..., d:, :] += d_exponent
            carry = d_exponent
        return dq, dk, dgk


def _intra_scores(q: torch.Tensor, k: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
    """``A [chunks, H, C, C]`` (lower-triangular) from scaled ``q``, ``k`` and ``gk``, each ``[chunks, H, C, K]``.

    Query sub-chunk ``i`` meets the keys ``s`` of an earlier sub-chunk ``j`` through the gate sum up to its first
    token ``a``: ``exp(sum_(s, t]) = exp(sum_(a, t]) * exp(sum_(s, a])``, both factors ``<= 1``, and
    ``sum_(s, a]`` = the rest of sub-chunk ``j`` + the sub-chunks strictly between + ``gk_a``. Sub-chunks are
    unbound rather than sliced: a slice's gradient is a full-size zero fill.
    """
    chunks, heads, size, key_dim = q.shape
    sub = min(SUB_CHUNK, size)
    parts = size // sub
    shape = (chunks, heads, parts, sub, key_dim)
    q_sub, k_sub, gk_sub = q.reshape(shape), k.reshape(shape), gk.reshape(shape)
    after_first = torch.cat([torch.zeros_like(gk_sub[:, :, :, :1]), gk_sub[:, :, :, 1:]], 3)
    queries = (q_sub * _exp(torch.cumsum(after_first, 3))).unbind(2)  # relative to the sub-chunk's first token
    keys = (k_sub * _exp(_suffix_sums(gk_sub, 3))).unbind(2)  # relative to the sub-chunk's last token
    totals, firsts = gk_sub.sum(3).unbind(2), gk_sub[:, :, :, 0].unbind(2)
    diagonals = _DiagonalScores.apply(q_sub, k_sub, gk_sub).unbind(2)
    rows = []
    for i in range(parts):
        between, earlier = firsts[i], []
        for j in reversed(range(i)):
            earlier.insert(0, keys[j] * _exp(between)[:, :, None])
            between = between + totals[j]
        blocks = [queries[i] @ torch.cat(earlier, 2).mT] if earlier else []
        blocks.append(diagonals[i])
        if i + 1 < parts:
            blocks.append(q.new_zeros(chunks, heads, sub, size - (i + 1) * sub))
        rows.append(torch.cat(blocks, -1))
    return torch.cat(rows, -2)


def _sequences(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts, lengths)`` int64 on CPU of every sequence in the packed ``[batch * seq]`` rows."""
    if cu_seqlens is None:
        return torch.arange(batch) * seq_len, torch.full((batch,), seq_len)
    offsets = cu_seqlens.to("cpu", torch.int64)
    return offsets[:-1], offsets[1:] - offsets[:-1]


def chunk_gla_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float,
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GLA (see the module docstring); inputs checked by :func:`~.reference.check_inputs`.

    Args:
        q, k, gk: ``[batch, seq, heads, key_dim]``; v: ``[batch, seq, heads, value_dim]``; any float dtype.
        scale: query scale.
        initial_state: ``[n, heads, key_dim, value_dim]`` or None; ``n`` is batch or num_sequences.
        output_final_state: also return each sequence's final state.
        cu_seqlens: int64 ``[n + 1]`` packed-sequence offsets (batch 1), or None.

    Returns ``(o [batch, seq, heads, value_dim] in q's dtype, final state [n, heads, key_dim, value_dim] float32
    (float64 for float64 inputs) or None)``. Autograd flows to q, k, v, gk and initial_state.
    """
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    starts, lengths = _sequences(batch, seq_len, cu_seqlens)
    layout = _layout(starts, lengths, batch * seq_len, _chunk_size(lengths))
    q_c, k_c, v_c, gk_c = (_to_chunks(x.reshape(batch * seq_len, heads, x.shape[-1]), layout, dtype)
                           for x in (q, k, v, gk))
    g = torch.cumsum(gk_c, dim=2)
    update = (k_c * _exp(_suffix_sums(gk_c, 2))).transpose(-1, -2) @ v_c
    if initial_state is None:
        initial = q.new_zeros((len(lengths), heads, key_dim, value_dim), dtype=dtype)
    else:
        initial = initial_state.to(dtype)
    entering, final = _pass_states(_exp(g[:, :, -1]), update, initial, layout)
    q_c = q_c * scale
    o = (q_c * _exp(g)) @ entering + _intra_scores(q_c, k_c, gk_c) @ v_c
    o = o.transpose(1, 2).reshape(-1, heads, value_dim)[layout.valid.reshape(-1)]
    return o.reshape(batch, seq_len, heads, value_dim).to(q.dtype), (final if output_final_state else None)
