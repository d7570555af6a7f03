"""Fast CPU path for AWQ int4 GEMM: ``y = x @ dequant(W)`` with the weights kept at ~4 bits in memory.

Two kernels read one prepacked form (:class:`CpuAwqWeight`, built once by :func:`prepack`):

- ``int4pack``: torch's native tinygemm CPU kernel ``aten._weight_int4pack_mm_for_cpu``. It is only fast with
  bf16 activations (fp32/fp16 activations fall onto a scalar loop, 10-50x slower), so fp32 inputs are cast to
  bf16 and the output back: results carry bf16 rounding (~3e-3 relative), small next to the int4 error itself.
- ``dequant``: dequantize a cache-sized slab of columns to a transient fp32 buffer, then ``torch.mm`` (MKL
  sgemm), slab by slab. Exact fp32 math; no full-precision copy of the weight ever exists.

Measured (``benchmarks/awq_cpu_layers.py`` and the rule's own sweep; 1 thread, median ms, group 128, or 64 when
in_features is 576; one neighbour core busy). ATen's CPU capability decides the winner:

==============  ====  =======  ========  =======  ==========================================
capability      M     fp32 mm  int4pack  dequant  shape (in x out)
==============  ====  =======  ========  =======  ==========================================
AVX512 (+bf16)  1     2.43     0.35      25.8     1536 x 8960   int4pack wins at every M
AVX512 (+bf16)  512   202      127       244      1536 x 8960
AVX512 (+bf16)  512   21.8     14.0      23.2     1536 x 1536
AVX2            1     2.57     1.38      (slow)   1536 x 8960   int4pack wins for small M
AVX2            64    2.96     3.95      see rule 1536 x 1536
AVX2            512   135      373       see rule 1536 x 8960   dequant wins for large M
==============  ====  =======  ========  =======  ==========================================

Also measured and rejected: ``torch.compile`` of a fused dequant+GEMV reading the 4-bit codes (inductor + gcc
compiles in ~1 s per shape, runs 2-14x slower than int4pack: 2.7 ms vs 0.35 ms at 1536 x 8960, M=1) and of a
whole-weight dequant + mm (page-faults on the transient weight: 26 ms at 1536 x 8960).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .reference import pack_awq, unpack_awq

_KERNEL_GROUPS = (256, 128, 64, 32)
"""Group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts, largest first."""

_N_ALIGN = 64
"""Output channels are zero-padded to this multiple so every layout candidate sees only full column blocks."""

_LAYOUT_CANDIDATES = (("split", 64), ("split", 32), ("pair", 32), ("pair", 16), ("pair", 64))
"""ATen int4pack layouts as ``(kind, block_n)``: AVX512 is split-64, AVX2 split-32, scalar builds pair-32."""

_SLAB_FLOATS = 1 << 20
"""Transient fp32 weight slab of the dequant path (4 MiB, measured best of 1-4 MiB): cache-resident, no page faults."""

_INT4PACK_MAX_M_WITHOUT_AVX512 = 48
"""Without AVX512 the int4pack kernel re-dequantizes the weight per 4 rows; above this M sgemm wins (see rule)."""


@dataclass(frozen=True)
class CpuAwqWeight:
    """AWQ weights prepacked for the CPU kernels. Build with :func:`prepack`; invert with :func:`unprepack`.

    Fields:
        packed: uint8 ``[padded_out, in_features // 2]``, ATen's int4pack layout of the codes (zero-padded rows).
        scales_zeros: bf16 ``[in_features // kernel_group, padded_out, 2]``, the int4pack kernel's
            ``(scale, zero)`` pairs with ``w = (q - 8) * scale + zero``; empty when ``kernel_group == 0``.
        scales: the AWQ scales as given, ``[groups, out_features]``, kept for the exact fp32 path and unprepack.
        qzeros: the AWQ int32 zero points as given, ``[groups, out_features // 8]``.
        group_size: the effective group size (``in_features`` for per-channel ``-1``).
        kernel_group: the int4pack kernel's group size (a divisor of ``group_size``), or 0 when none fits.
    """

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor
    group_size: int
    kernel_group: int

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    def nbytes(self) -> int:
        """Bytes held in memory by all tensors of this weight."""
        tensors = (self.packed, self.scales_zeros, self.scales, self.qzeros)
        return sum(t.numel() * t.element_size() for t in tensors)


def _kernel_group(group_size: int, in_features: int) -> int:
    """Largest int4pack group dividing both ``group_size`` and ``in_features`` (so a partial last AWQ group is
    whole kernel groups too; scales are repeated per kernel group), else 0."""
    return next((g for g in _KERNEL_GROUPS if group_size % g == 0 and in_features % g == 0), 0)


def _unpack_layout(packed: torch.Tensor, padded_out: int, kind: str, block_n: int) -> torch.Tensor:
    """Codes uint8 ``[padded_out, in_features]`` from an int4pack buffer ``[padded_out, in_features // 2]``.

    The buffer is ``[padded_out // block_n, in_features, block_n // 2]`` bytes. Byte ``j`` of a block row holds
    columns ``(j, j + block_n // 2)`` in its (low, high) nibbles for ``split`` and ``(2j, 2j + 1)`` for ``pair``.
    """
    in_features = packed.shape[1] * 2
    blocks = packed.reshape(padded_out // block_n, in_features, block_n // 2)
    low, high = blocks & 0xF, blocks >> 4
    dim = -2 if kind == "split" else -1
    codes = torch.stack((low, high), dim=dim).reshape(padded_out // block_n, in_features, block_n)
    return codes.permute(0, 2, 1).reshape(padded_out, in_features)


@functools.lru_cache(maxsize=None)
def native_layout() -> tuple[str, int]:
    """The ``(kind, block_n)`` int4pack layout of this process's ATen build and CPU, found by packing a probe.

    The layout depends on ATen's CPU capability (``torch.backends.cpu.get_cpu_capability()``, overridable with
    ``ATEN_CPU_CAPABILITY``), so it is probed rather than assumed.
    """
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (_N_ALIGN, 32), dtype=torch.int32, generator=generator)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for kind, block_n in _LAYOUT_CANDIDATES:
        if torch.equal(_unpack_layout(packed, _N_ALIGN, kind, block_n).to(torch.int32), probe):
            return kind, block_n
    raise NotImplementedError(
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}) packs int4 weights "
        f"in a layout none of {_LAYOUT_CANDIDATES} matches; use backend='reference' and report this build."
    )


def _check_awq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> int:
    """Validate AWQ tensors and return the effective group size (``in_features`` for ``-1``)."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError(
            f"qweight and qzeros must be int32 (AWQ GEMM layout), got {qweight.dtype} and {qzeros.dtype}; "
            "pass the checkpoint tensors unchanged."
        )
    if not scales.is_floating_point():
        raise TypeError(f"scales must be a float tensor, got {scales.dtype}; pass the checkpoint's fp16 scales.")
    if qweight.device.type != "cpu":
        raise ValueError(f"prepack builds CPU weights, got qweight on {qweight.device}; call .cpu() on the tensors.")
    in_features, words = qweight.shape
    group = in_features if group_size == -1 else group_size
    if group <= 0:
        raise ValueError(f"group_size must be positive or -1 (per-channel), got {group_size}.")
    groups = -(-in_features // group)
    if qzeros.shape != (groups, words) or scales.shape != (groups, words * 8):
        raise ValueError(
            f"with qweight {tuple(qweight.shape)} and group {group}, qzeros must be {(groups, words)} and scales "
            f"{(groups, words * 8)} (ceil(in / group) rows), got {tuple(qzeros.shape)} and {tuple(scales.shape)}; "
            "check group_size against the checkpoint."
        )
    if in_features % 2:
        raise ValueError(f"in_features must be even for the CPU int4 layout, got {in_features}; pad the input.")
    return group


def prepack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> CpuAwqWeight:
    """Prepack AWQ GEMM tensors for :func:`awq_gemm_cpu`, once at load time.

    Args:
        qweight: int32 ``[in_features, out_features // 8]`` (AWQ nibble order).
        qzeros: int32 ``[groups, out_features // 8]`` with ``groups = ceil(in_features / group_size)``.
        scales: float ``[groups, out_features]`` (fp16 in checkpoints).
        group_size: quantization group along ``in_features`` (the last group may be partial); ``-1`` means one
            group (per-channel).

    Returns a :class:`CpuAwqWeight` of ~0.55 bytes per weight (27.5% of bf16 at group 128 with fp16 scales).
    """
    group = _check_awq_tensors(qweight, qzeros, scales, group_size)
    in_features, out_features = qweight.shape[0], scales.shape[1]
    padded_out = -(-out_features // _N_ALIGN) * _N_ALIGN
    codes = torch.zeros(padded_out, in_features, dtype=torch.int32)
    codes[:out_features] = unpack_awq(qweight).t()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    kernel_group = _kernel_group(group, in_features)
    return CpuAwqWeight(
        packed=packed,
        scales_zeros=_int4pack_scales_zeros(qzeros, scales, group, kernel_group, in_features, padded_out),
        scales=scales.contiguous(),
        qzeros=qzeros.contiguous(),
        group_size=group,
        kernel_group=kernel_group,
    )


def _int4pack_scales_zeros(
    qzeros: torch.Tensor, scales: torch.Tensor, group: int, kernel_group: int, in_features: int, padded_out: int
) -> torch.Tensor:
    """bf16 ``[in // kernel_group, padded_out, 2]`` holding ``(s, (8 - z) * s)``.

    The kernel computes ``(q - 8) * scale + zero``, and ``(q - z) * s == (q - 8) * s + (8 - z) * s``.
    """
    if not kernel_group:
        return torch.empty(0, padded_out, 2, dtype=torch.bfloat16)
    scale = scales.float()
    zero = (8.0 - unpack_awq(qzeros).float()) * scale
    pairs = torch.zeros(scale.shape[0], padded_out, 2)
    pairs[:, : scale.shape[1]] = torch.stack((scale, zero), dim=-1)
    rows = pairs.repeat_interleave(group // kernel_group, dim=0)[: in_features // kernel_group]
    return rows.to(torch.bfloat16).contiguous()


def _codes(weight: CpuAwqWeight) -> torch.Tensor:
    """uint8 codes ``[padded_out, in_features]`` from the packed buffer."""
    kind, block_n = native_layout()
    return _unpack_layout(weight.packed, weight.packed.shape[0], kind, block_n)


def unprepack(weight: CpuAwqWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`prepack`: ``(qweight, qzeros, scales)`` bit-identical to the tensors packed."""
    codes = _codes(weight)[: weight.out_features].t().to(torch.int32)
    return pack_awq(codes), weight.qzeros, weight.scales


def _use_int4pack(rows: int, weight: CpuAwqWeight) -> bool:
    """The measured rule: int4pack at every M with AVX512, below ~48 rows with AVX2/scalar builds; see module doc."""
    if not weight.kernel_group:
        return False
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return True
    return rows <= _INT4PACK_MAX_M_WITHOUT_AVX512


def _int4pack_matmul(x2d: torch.Tensor, weight: CpuAwqWeight) -> torch.Tensor:
    """``[M, in] -> [M, out]`` in x's dtype through the bf16 tinygemm kernel (bf16 activations, fp32 accumulate)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2d.to(torch.bfloat16).contiguous(), weight.packed, weight.kernel_group, weight.scales_zeros
    )
    return y[:, : weight.out_features].to(x2d.dtype)


def _dequant_matmul(x2d: torch.Tensor, weight: CpuAwqWeight) -> torch.Tensor:
    """``[M, in] -> [M, out]`` in x's dtype: fp32 sgemm over transient dequantized column slabs."""
    kind, block_n = native_layout()
    in_features, out_features = weight.in_features, weight.out_features
    x32 = x2d.float().contiguous()
    scales, zeros = weight.scales.float(), unpack_awq(weight.qzeros).float()
    blocks = weight.packed.reshape(-1, in_features, block_n // 2)
    blocks_per_slab = max(1, _SLAB_FLOATS // (in_features * block_n))
    slab = torch.empty(in_features, blocks_per_slab * block_n)
    y = x32.new_empty(x32.shape[0], out_features)
    for first in range(0, blocks.shape[0], blocks_per_slab):
        chunk = blocks[first : first + blocks_per_slab]
        start = first * block_n
        width = min(chunk.shape[0] * block_n, out_features - start)
        if width <= 0:
            break
        w = _dequant_slab(chunk, slab, kind, block_n)[:, :width]
        cols = slice(start, start + width)
        _apply_groups(w, zeros[:, cols], scales[:, cols], weight.group_size)
        y[:, cols] = x32 @ w
    return y.to(x2d.dtype)


def _apply_groups(w: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> None:
    """In place ``w[k, n] = (w[k, n] - zeros[k // group, n]) * scales[k // group, n]`` for ``w [in, width]``."""
    full = w.shape[0] // group
    head = w[: full * group].view(full, group, w.shape[1])
    head.sub_(zeros[:full, None]).mul_(scales[:full, None])
    if full < zeros.shape[0]:
        w[full * group :].sub_(zeros[full]).mul_(scales[full])


def _dequant_slab(chunk: torch.Tensor, slab: torch.Tensor, kind: str, block_n: int) -> torch.Tensor:
    """Write the codes of ``chunk`` (uint8 ``[blocks, in, block_n // 2]``) as fp32 ``[in, blocks * block_n]``."""
    blocks, in_features, half = chunk.shape
    w = slab[:, : blocks * block_n]
    nibbles = w.view(in_features, blocks, 2, half) if kind == "split" else w.view(in_features, blocks, half, 2)
    low, high = (nibbles[:, :, 0], nibbles[:, :, 1]) if kind == "split" else (nibbles[..., 0], nibbles[..., 1])
    low.copy_((chunk & 0xF).transpose(0, 1))
    high.copy_((chunk >> 4).transpose(0, 1))
    return w


def awq_gemm_cpu(x: torch.Tensor, weight: CpuAwqWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in_features] @ dequant(W) [in, out] (+ bias [out])`` -> ``[..., out_features]`` in x's dtype.

    ``x`` is typically ``[batch, seq, in_features]``, fp32 (the fast CPU dtype), bf16 or fp16. The kernel is picked
    per call by :func:`_use_int4pack` (rows ``M = batch * seq``): bf16-activation int4pack or fp32 dequant + sgemm.
    """
    if x.device.type != "cpu":
        raise ValueError(f"awq_gemm_cpu needs a CPU tensor, got one on {x.device}; call .cpu() or use awq_gemm().")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"awq_gemm_cpu supports float32/bfloat16/float16 inputs, got {x.dtype}; cast x first.")
    if x.shape[-1] != weight.in_features:
        raise ValueError(
            f"x has {x.shape[-1]} input features but the weight expects {weight.in_features}; "
            "check which layer this input belongs to."
        )
    x2d = x.reshape(-1, weight.in_features)
    if _use_int4pack(x2d.shape[0], weight):
        y = _int4pack_matmul(x2d, weight)
    else:
        y = _dequant_matmul(x2d, weight)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], weight.out_features)
