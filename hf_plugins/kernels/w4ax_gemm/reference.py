"""Pure-torch W4Ax: 4-bit weights times mixed 4-/8-bit activations (COMET's FMPQ format), the test oracle.

The layout, shared by every backend:

- Input channels are permuted once (``perm``), so the outlier channels come first; the first ``a8_channels``
  permuted channels (whole blocks of ``BLOCK``) are 8-bit, the rest 4-bit.
- Activations are quantized at run time per token and per block of ``BLOCK`` channels, symmetric: codes in
  ``[-127, 127]`` for 8-bit blocks and ``[-7, 7]`` for 4-bit blocks, scale ``absmax / qmax``, rounding half away
  from zero (what a GPU kernel reproduces exactly).
- Weights are 4-bit symmetric codes in ``[-7, 7]`` per output channel and group of ``group_size`` permuted input
  channels (``-1``: one group), scale ``absmax / 7``.
- The product is summed in *steps* of ``step_size(group_size)`` channels (each inside one activation block and one
  weight group): integer dot products per step, scaled by the step's activation and weight scales, then summed.
"""

from __future__ import annotations

import torch

BLOCK = 128  # activation block: COMET's INT4 MMA K multiple, one scale per token and block
A4_MAX, A8_MAX, W4_MAX = 7, 127, 7
ALLOWED_GROUP_SIZES = (64, 128, -1)


def step_size(group_size: int) -> int:
    """Channels per scaled integer partial sum: inside one activation block and one weight group."""
    return BLOCK if group_size == -1 else min(group_size, BLOCK)


def num_blocks(in_features: int) -> int:
    return -(-in_features // BLOCK)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def round_half_away(values: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (``floor(|r| + 0.5)`` is exact for ``|r| < 2^22``)."""
    return torch.sign(values) * torch.floor(values.abs() + 0.5)


def check_layout(in_features: int, a8_channels: int, group_size: int) -> None:
    """``ValueError`` unless ``a8_channels`` covers whole blocks (or all channels) and ``group_size`` is allowed."""
    if group_size not in ALLOWED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {ALLOWED_GROUP_SIZES}, got {group_size!r}.")
    if not (0 <= a8_channels <= in_features) or (a8_channels % BLOCK and a8_channels != in_features):
        raise ValueError(
            f"a8_channels must be a multiple of {BLOCK} in 0..{in_features} (or all {in_features} channels), got "
            f"{a8_channels}; it is outlier_blocks * {BLOCK}."
        )


def block_limits(in_features: int, a8_channels: int) -> torch.Tensor:
    """``[blocks]`` float32 code limit of each activation block: 127 for 8-bit blocks, 7 for 4-bit ones."""
    starts = torch.arange(num_blocks(in_features)) * BLOCK
    return torch.where(starts < a8_channels, float(A8_MAX), float(A4_MAX))


def quantize_activations(x: torch.Tensor, a8_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permuted activations ``x [M, K]`` -> ``(codes int8 [M, K], scales float32 [M, blocks])``, per token and
    block; ``x ~ codes * scales`` blockwise."""
    rows, in_features = x.shape
    blocks = num_blocks(in_features)
    padded = x.float().new_zeros(rows, blocks * BLOCK)
    padded[:, :in_features] = x.float()
    grouped = padded.view(rows, blocks, BLOCK)
    limits = block_limits(in_features, a8_channels).to(x.device)
    scales = grouped.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / limits
    codes = round_half_away(grouped / scales[..., None]).clamp(-limits[:, None], limits[:, None])
    return codes.view(rows, -1)[:, :in_features].to(torch.int8), scales


def quantize_weight(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permuted ``weight [N, K]`` -> ``(codes int8 [N, K] in [-7, 7], scales float32 [N, groups])``, symmetric
    round-to-nearest per output channel and group."""
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    groups = num_groups(in_features, group_size)
    padded = weight.float().new_zeros(out_features, groups * group)
    padded[:, :in_features] = weight.float()
    grouped = padded.view(out_features, groups, group)
    scales = grouped.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / W4_MAX
    codes = round_half_away(grouped / scales[..., None]).clamp(-W4_MAX, W4_MAX)
    return codes.view(out_features, -1)[:, :in_features].to(torch.int8), scales


def dequantize_activations(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes ``[M, K]`` times their block scales ``[M, blocks]`` -> ``[M, K]`` in the scales' float dtype."""
    return codes.to(scales.dtype) * scales.repeat_interleave(BLOCK, dim=1)[:, : codes.shape[1]]


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes ``[N, K]`` times their group scales ``[N, groups]`` -> ``[N, K]`` in the scales' float dtype."""
    in_features = codes.shape[1]
    group = in_features if group_size == -1 else group_size
    return codes.to(scales.dtype) * scales.repeat_interleave(group, dim=1)[:, :in_features]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit ``codes [..., K]`` (in ``[-8, 7]``) -> ``uint8 [..., ceil(K/2)]``, offset binary ``code + 8``,
    channel ``2j`` in the low nibble of byte ``j`` and ``2j + 1`` in the high one (an odd tail pads with code 0)."""
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    if unsigned.shape[-1] % 2:
        unsigned = torch.cat([unsigned, unsigned.new_full((*unsigned.shape[:-1], 1), 8)], dim=-1)
    return unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [..., ceil(K/2)]`` -> int8 ``[..., K]``."""
    low = (packed & 15).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :in_features]


def w4ax_matmul_reference(x_codes: torch.Tensor, x_scales: torch.Tensor, w_codes: torch.Tensor,
                          w_scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``sum_steps x_scales[:, block] * w_scales[:, group] * (x_codes_step @ w_codes_step^T)`` -> float32 ``[M, N]``.

    Args:
        x_codes: ``[M, K]`` integer activation codes (permuted channel order).
        x_scales: ``[M, blocks]`` per token and block.
        w_codes: ``[N, K]`` integer weight codes.
        w_scales: ``[N, groups]``.
        group_size: the weight group (64, 128 or -1).
    Integer partial sums are exact (int64); the scaling runs in float64.
    """
    in_features = x_codes.shape[1]
    step = step_size(group_size)
    group = in_features if group_size == -1 else group_size
    out = torch.zeros(x_codes.shape[0], w_codes.shape[0], dtype=torch.float64, device=x_codes.device)
    for start in range(0, in_features, step):
        stop = min(start + step, in_features)
        partial = (x_codes[:, start:stop].long() @ w_codes[:, start:stop].long().t()).double()
        scale = x_scales[:, start // BLOCK].double()[:, None] * w_scales[:, start // group].double()[None, :]
        out += partial * scale
    return out.float()


def w4ax_linear_reference(x: torch.Tensor, perm: torch.Tensor, a8_channels: int, w_codes: torch.Tensor,
                          w_scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``: permute, quantize per token and block, W4Ax product, bias.

    ``perm [K]`` lists the original channel of each permuted position; ``w_codes``/``w_scales`` are in the permuted
    order (see :func:`quantize_weight`).
    """
    check_layout(x.shape[-1], a8_channels, group_size)
    flat = x.reshape(-1, x.shape[-1])[:, perm]
    x_codes, x_scales = quantize_activations(flat, a8_channels)
    out = w4ax_matmul_reference(x_codes, x_scales, w_codes, w_scales, group_size)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], w_codes.shape[0])
