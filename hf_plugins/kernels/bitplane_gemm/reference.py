"""Bipolar-INT numbers and the bit-plane matmul, in plain integer torch: the oracle of the fast paths.

An n-bit bipolar-INT has bits ``b_{n-1} .. b_0``, each standing for -1 (bit 0) or +1 (bit 1), so its value is
``sum_i (2 b_i - 1) 2^i``: the odd integers in ``[-(2^n - 1), 2^n - 1]``, symmetric, with no zero and no wasted
code (Ma et al., "Efficient Arbitrary Precision Acceleration for Large Language Models on GPU Tensor Cores").
The bits of a value ``v`` are those of the unsigned code ``u = (v + 2^n - 1) / 2``.

A product of an activation matrix ``X`` (p bits) and a weight matrix ``W`` (q bits) decomposes over their
+-1 bit planes ``X_i``, ``W_j``: ``X W^T = sum_ij 2^(i+j) X_i W_j^T``, where each plane product is a binary
dot product (``K - 2 popcount(x xor w)`` on packed bits).
"""

from __future__ import annotations

import torch

MAX_BITS = 8


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
        raise ValueError(f"bipolar-INT takes 1 to {MAX_BITS} bits, got {bits!r}.")


def bipolar_limit(bits: int) -> int:
    """The largest bipolar-INT value of ``bits`` bits, ``2^bits - 1`` (the smallest is its negative)."""
    _check_bits(bits)
    return (1 << bits) - 1


def codes_to_bipolar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``u`` in ``[0, 2^bits)`` -> bipolar values ``2u - (2^bits - 1)`` (int32)."""
    return 2 * codes.to(torch.int32) - bipolar_limit(bits)


def bipolar_to_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Bipolar values (odd, within the range) -> unsigned codes ``(v + 2^bits - 1) / 2`` (uint8)."""
    limit = bipolar_limit(bits)
    values = values.to(torch.int32)
    if bool(((values & 1) == 0).any()) or bool((values.abs() > limit).any()):
        raise ValueError(f"bipolar-INT{bits} values are the odd integers in [-{limit}, {limit}].")
    return ((values + limit) // 2).to(torch.uint8)


def signed_to_bipolar(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Lossless: signed INT ``x`` in ``[-2^(bits-1), 2^(bits-1))`` -> bipolar ``2x + 1``.

    An affine signed quantizer ``w = s x + z`` is the same set of numbers as ``w = (s/2) (2x + 1) + (z - s/2)``:
    see :func:`affine_to_bipolar`.
    """
    _check_bits(bits)
    return 2 * values.to(torch.int32) + 1


def affine_to_bipolar(scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite an unsigned affine quantizer ``w = scale (u - zero_point)``, ``u`` in ``[0, 2^bits)``, as
    ``w = scale' v + offset`` with ``v = 2u - (2^bits - 1)`` bipolar: ``scale' = scale / 2`` and
    ``offset = scale ((2^bits - 1) / 2 - zero_point)``. Exact: every representable weight is unchanged."""
    limit = bipolar_limit(bits)
    return scale / 2, scale * (limit / 2 - zero_point.to(scale.dtype))


def round_to_bipolar(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest bipolar-INT value of each element of ``x`` (already divided by its scale), as int32.

    The midpoints between odd integers are the even integers; a tie goes away from zero (0 goes to +1), so the
    rounding is symmetric.
    """
    limit = bipolar_limit(bits)
    magnitude = torch.floor(x.abs() / 2) * 2 + 1
    return torch.where(x < 0, -magnitude, magnitude).clamp(-limit, limit).to(torch.int32)


def bit_planes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., K]`` bipolar values -> ``[bits, ..., K]`` +-1 planes (int8), least significant first."""
    codes = bipolar_to_codes(values, bits).to(torch.int32)
    shifts = torch.arange(bits, device=values.device, dtype=torch.int32).view(-1, *([1] * values.dim()))
    return (2 * ((codes.unsqueeze(0) >> shifts) & 1) - 1).to(torch.int8)


def planes_to_bipolar(planes: torch.Tensor) -> torch.Tensor:
    """``[bits, ..., K]`` +-1 planes -> bipolar values ``sum_i 2^i planes[i]`` (int32)."""
    weights = torch.pow(2, torch.arange(planes.shape[0], device=planes.device, dtype=torch.int32))
    return (planes.to(torch.int32) * weights.view(-1, *([1] * (planes.dim() - 1)))).sum(0)


def bitplane_matmul_reference(x_planes: torch.Tensor, w_planes: torch.Tensor) -> torch.Tensor:
    """Decomposition and recovery: ``sum_ij 2^(i+j) X_i W_j^T`` over +-1 planes ``x_planes [p, M, K]`` and
    ``w_planes [q, N, K]``, each plane product in exact int64 -> ``[M, N]`` int64."""
    out = torch.zeros(x_planes.shape[1], w_planes.shape[1], dtype=torch.int64, device=x_planes.device)
    for i in range(x_planes.shape[0]):
        for j in range(w_planes.shape[0]):
            out += (x_planes[i].to(torch.int64) @ w_planes[j].to(torch.int64).t()) << (i + j)
    return out


def pack_planes(planes: torch.Tensor) -> torch.Tensor:
    """``[bits, N, K]`` +-1 planes -> ``[bits, N, ceil(K/8)]`` uint8, bit ``k % 8`` of byte ``k // 8`` set for +1
    (padding bits are 0, i.e. -1, and must be matched by the other operand's padding)."""
    bits, rows, k = planes.shape
    padded = torch.nn.functional.pad((planes > 0).to(torch.uint8), (0, (-k) % 8))
    grouped = padded.view(bits, rows, -1, 8).to(torch.int32)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int32, device=planes.device)
    return (grouped * weights).sum(-1).to(torch.uint8)


def unpack_planes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: ``[bits, N, ceil(K/8)]`` uint8 -> ``[bits, N, K]`` +-1 int8."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return (2 * bits.flatten(-2)[..., :k] - 1).to(torch.int8)


def pack_code_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[N, K]`` (``0 .. 2^bits - 1``) -> packed planes ``[bits, N, ceil(K/8)]`` uint8, equal to
    ``pack_planes(bit_planes(codes_to_bipolar(codes, bits), bits))`` (plane ``i`` is +1 where bit ``i`` of the code
    is set) without building the ``[bits, N, K]`` planes: one uint8 pass per plane, for loading whole models."""
    _check_bits(bits)
    rows, k = codes.shape
    grouped = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-k) % 8)).view(rows, -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    packed = torch.empty(bits, rows, grouped.shape[1], dtype=torch.uint8, device=codes.device)
    for plane in range(bits):
        torch.sum(((grouped >> plane) & 1) << shifts, dim=-1, dtype=torch.uint8, out=packed[plane])
    return packed


def unpack_code_planes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_code_planes`: ``[bits, N, ceil(K/8)]`` uint8 -> unsigned codes ``[N, K]`` int32
    (``(v + 2^bits - 1) / 2`` of the bipolar values the planes hold)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    codes = torch.zeros(packed.shape[1], packed.shape[2] * 8, dtype=torch.int32, device=packed.device)
    for plane in range(packed.shape[0]):
        codes |= ((packed[plane].unsqueeze(-1) >> shifts) & 1).flatten(-2).to(torch.int32) << plane
    return codes[:, :k]


def pack_for_triton(planes: torch.Tensor) -> torch.Tensor:
    """``[bits, N, ceil(K/8)]`` uint8 planes (:func:`pack_planes`) -> the Triton kernels' int32 words
    ``[bits, ceil(K/32), N]``: bit ``j`` of word ``(i, w, n)`` is plane ``i`` at input ``32 w + j`` (padding 0)."""
    padded = torch.nn.functional.pad(planes, (0, (-planes.shape[-1]) % 4)).contiguous()
    # Little-endian: byte b of a row is bits 8 (b % 4) .. 8 (b % 4) + 7 of word b // 4.
    return padded.view(torch.int32).transpose(1, 2).contiguous()


def popcount_matmul_reference(x_packed: torch.Tensor, w_packed: torch.Tensor, k: int) -> torch.Tensor:
    """The binary-tensor-core formulation on packed planes: each plane product is ``K - 2 popcount(x xor w)``
    (equal padding bits xor to 0 and count as matches, removed by using the padded length). ``[M, N]`` int64."""
    padded_k = x_packed.shape[-1] * 8
    popcount = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int64, device=x_packed.device)
    out = torch.zeros(x_packed.shape[1], w_packed.shape[1], dtype=torch.int64, device=x_packed.device)
    for i in range(x_packed.shape[0]):
        for j in range(w_packed.shape[0]):
            differing = popcount[(x_packed[i].unsqueeze(1) ^ w_packed[j].unsqueeze(0)).long()].sum(-1)
            out += (padded_k - 2 * differing) << (i + j)
    return out - _padding_correction(x_packed, w_packed, k, padded_k)


def _padding_correction(x_packed, w_packed, k: int, padded_k: int) -> torch.Tensor:
    """Padding bits (0 = -1 in both operands) add +1 per padded position to every plane product."""
    p, q = x_packed.shape[0], w_packed.shape[0]
    scale = sum(1 << (i + j) for i in range(p) for j in range(q))
    return torch.full((x_packed.shape[1], w_packed.shape[1]), (padded_k - k) * scale, dtype=torch.int64,
                      device=x_packed.device)


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., K]`` -> ``[..., groups, g]`` with a zero-padded partial last group (``group_size=-1``: one group)."""
    k = x.shape[-1]
    group = k if group_size == -1 else group_size
    groups = -(-k // group)
    return torch.nn.functional.pad(x, (0, groups * group - k)).unflatten(-1, (groups, group))


def quantize_activations(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic symmetric bipolar quantization: ``x [..., K]`` -> ``(values int32 [..., K], scale
    [..., 1])`` with ``x ~ scale * values`` and ``|values| <= 2^bits - 1``."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / bipolar_limit(bits)
    return round_to_bipolar(x.float() / scale, bits), scale


def bipolar_linear_reference(
    x: torch.Tensor,
    weight_planes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    in_features: int,
    group_size: int,
    act_bits: int | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + b`` with ``W = scales * V + offsets`` per group of ``V``'s bipolar values.

    Args:
        x: ``[..., in_features]`` activations.
        weight_planes: ``[w_bits, out, ceil(in/8)]`` packed +-1 planes of ``V`` (see :func:`pack_planes`).
        scales, offsets: ``[groups, out]`` float32.
        act_bits: None keeps activations in floating point (weight-only); else they are quantized per token to
            ``act_bits``-bit bipolar and the integer products ``V_x V^T`` are exact per group (float64 holds every
            partial sum: ``|v| <= 255`` and groups of at most 65,536 inputs).

    Returns:
        ``[..., out]`` in ``x``'s dtype.
    """
    values = planes_to_bipolar(unpack_planes(weight_planes, in_features))  # [out, in]
    grouped_w = group_view(values.double(), group_size)  # [out, groups, g]
    if act_bits is None:
        weight = grouped_w * scales.t().double()[..., None] + offsets.t().double()[..., None]
        return torch.nn.functional.linear(x, weight.flatten(1)[:, :in_features].to(x.dtype),
                                          None if bias is None else bias.to(x.dtype))
    x_values, x_scale = quantize_activations(x, act_bits)
    grouped_x = group_view(x_values.double(), group_size)  # [..., groups, g]
    products = torch.einsum("...gk,ogk->...go", grouped_x, grouped_w)  # exact integers
    y = (products * scales.double()).sum(-2) + grouped_x.sum(-1) @ offsets.double()
    y = y * x_scale.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
