"""Fast CPU path for AWQ GEMM: ``y = x @ dequant(W)`` with the weights kept at ~4 bits in memory (1..4-bit codes)
or at one byte (5..8-bit codes, :func:`prepack_codes`).

Three routes read the prepacked form (:class:`CpuAwqWeight`, built once by :func:`prepack`), which keeps 4-bit codes
in one of two layouts: the native q4dot kernel's (:mod:`.q4dot`) or ATen's int4pack layout, whichever multiplies one
row faster for the shape on this machine (measured once, :data:`LAYOUTS`); wider codes only in q4dot's. Per call, the fastest route of that
layout for the shape class and row bucket is taken (measured once, :data:`ROUTES`):

- ``q4dot``: the native int4 x int8 dot-product kernel (:mod:`.q4dot`), up to 32 rows; on the AVX2-capped EPYC
  1.2-2.5x fp32 on 576- to 1536-wide layers and 4.5-7x on 1536 x 8960 at one row, where int4pack was 0.36-0.52x.
- ``int4pack``: torch's native tinygemm CPU kernel ``aten._weight_int4pack_mm_for_cpu``. It is only fast with
  bf16 activations (fp32/fp16 activations fall onto a scalar loop, 10-50x slower), so fp32 inputs are cast to
  bf16 and the output back. The kernel also holds each group's ``(scale, zero)`` in bf16, and rounding those is a
  systematic error shared by every weight of a group (measured: Qwen2.5-Coder-0.5B RTN-W4 wiki perplexity 39.94
  with rounded scales and zeros vs 39.58 with exact ones, 39.55 in float64). So they are kept exact: our quantizer
  writes bf16-exact scales (any other scales get a second kernel call with the bf16 remainder,
  ``scale_residual``), and the zero's remainder after bf16 rounding (``zero_residual``) is added as
  ``group_sums(x) @ zero_residual``, +4-20% on a decode step (M=1), +2% at M=512. What is left is the bf16
  rounding of activations and outputs, random per element (2e-3 to 7e-3 max relative error).
- ``dequant``: dequantize a cache-sized slab of columns to a transient fp32 buffer, then ``torch.mm`` (MKL
  sgemm), slab by slab, from either layout. Exact fp32 math; no full-precision copy of the weight ever exists.

The table below is the measurement (before q4dot existed) behind the int4pack / dequant choice, now made per
machine by timing; ``benchmarks/results/awq_cpu_layers-*`` hold the current figures with every route. Measured with ``benchmarks/awq_cpu_layers.py`` (plus an M sweep) on a 2-core AMD EPYC with AVX512 + avx512_bf16,
1 thread, median ms, group 128 (kernel group 64 for in_features 576), one neighbour core busy. "AVX2" rows are the
same CPU run as an AVX2-only machine (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``), "scalar" rows
with ``ATEN_CPU_CAPABILITY=default``. ATen's CPU capability decides the winner, so the rule keys on it:

==========  ===========  ====  =======  ========  =======  =====================================
capability  in x out     M     fp32 mm  int4pack  dequant  winner
==========  ===========  ====  =======  ========  =======  =====================================
AVX512      1536 x 8960  1     2.67     0.367     5.62     int4pack (7.3x fp32)
AVX512      1536 x 8960  64    21.4     10.5      22.8     int4pack (2.0x)
AVX512      1536 x 8960  512   213      127       213      int4pack (1.7x)
AVX512      8960 x 1536  2048  773      333       642      int4pack (2.3x)
AVX512      576 x 192    1     0.007    0.010     0.105    int4pack (fp32 weights would be faster)
AVX2        1536 x 8960  1     2.64     1.34      6.47     int4pack (2.0x)
AVX2        1536 x 8960  64    20.2     23.3      23.8     int4pack (0.87x)
AVX2        1536 x 8960  256   71.6     92.5      73.7     dequant (0.97x)
AVX2        1536 x 1536  256   17.6     29.5      18.7     dequant (0.94x)
AVX2        576 x 576    1     0.018    0.040     0.202    int4pack (0.45x)
AVX2        576 x 576    256   1.61     2.30      1.81     dequant (0.89x)
scalar      1536 x 1536  1     0.115    3.62      2.85     dequant
scalar      1536 x 1536  64    3.09     227       10.4     dequant
==========  ===========  ====  =======  ========  =======  =====================================

At M=128 with AVX2, dequant won or tied on all four shapes swept (576^2, 1536^2, 1536 x 8960, 8960 x 1536).

Also measured and rejected: ``torch.compile`` (inductor + gcc; ~1 s compile per shape and per M unless dynamic) of
a fused dequant + GEMV reading the 4-bit codes: 2.7 ms vs int4pack's 0.35 ms at 1536 x 8960, M=1, and 2-3x
slower than fp32 elsewhere; and of a whole-weight dequant + mm: 26 ms there, page faults on the 55 MB transient.
Eager whole-weight dequant: 71 ms. int8 kernels (``_weight_int8pack_mm``, dynamic qint8) would need 8-bit weights.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from ... import _env
from .._routes import RouteChooser, row_bucket
from .q4dot import (
    Q4DotWeight,
    q4dot_available,
    q4dot_codes,
    q4dot_dequant_matmul,
    q4dot_matmul,
    q4dot_pack,
    q4dot_shape_supported,
)
from .reference import AWQ_ORDER, AWQ_REVERSE_ORDER, pack_awq, unpack_awq

_KERNEL_GROUPS = (256, 128, 64, 32)
"""Group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts, largest first."""

_N_ALIGN = 64
"""Output channels are zero-padded to this multiple so every layout candidate sees only full column blocks."""

_LAYOUT_CANDIDATES = (("split", 64), ("split", 32), ("pair", 32), ("pair", 16), ("pair", 64))
"""ATen int4pack layouts as ``(kind, block_n)``: AVX512 is split-64, AVX2 split-32, scalar builds pair-32."""

_SLAB_FLOATS = 1 << 20
"""Transient fp32 weight slab of the dequant path (4 MiB, measured best of 1-4 MiB): cache-resident, no page faults."""

_Q4DOT_MAX_ROWS = 32
"""The q4dot route is timed only up to this many rows: it re-reads the weights per 4 rows, and from 16 rows on it
lost to int4pack or dequant + sgemm on every layer measured."""

ROUTES = RouteChooser("awq_gemm", ("q4dot", "int4pack", "dequant"))
"""The CPU routes, chosen per ``(dtype, in, out, group, codes layout, row bucket)`` on this machine."""

LAYOUTS = RouteChooser("awq_layout", ("q4dot", "int4pack"))
"""The codes layout :func:`prepack` keeps where both kernels run, chosen per ``(in, out, group)`` on this machine by
a one-row product (decoding): ATen's int4pack kernel ranges from 4x slower than q4dot to about as fast, by CPU."""


@dataclass(frozen=True)
class CpuAwqWeight:
    """AWQ weights prepacked for the CPU kernels. Build with :func:`prepack`; invert with :func:`unprepack`.

    Fields:
        packed: uint8 ``[padded_out, in_features // 2]``, ATen's int4pack layout of the codes (zero-padded rows).
        scales_zeros: bf16 ``[in_features // kernel_group, padded_out, 2]``, the int4pack kernel's
            ``(scale, zero)`` pairs with ``w = (q - 8) * scale + zero``, rounded to bf16; empty when
            ``kernel_group == 0``.
        scale_residual: bf16 pairs ``(scale - bf16(scale), 0)`` shaped like ``scales_zeros`` for a second kernel
            call, or None when every scale is bf16-exact (always so for our quantizer's scales).
        zero_residual: bf16 ``[groups, out_features]``, ``zero - bf16(zero)`` per AWQ group (exact: the zero
            ``(8 - z) * scale`` of an fp16 scale has at most 15 significant bits); empty without a kernel group.
        scales: the AWQ scales as given, ``[groups, out_features]`` (the module's buffer, not a copy).
        qzeros: the AWQ int32 zero points as given, ``[groups, out_features // 8]``, or None when they are
            recovered exactly from ``scales_zeros``, ``zero_residual`` and ``scales`` (see :meth:`zeros`).
        group_size: the effective group size (``in_features`` for per-channel ``-1``).
        kernel_group: the int4pack kernel's group size (a divisor of ``group_size``), or 0 when none fits.
        q4dot: the codes in the q4dot kernel's layout (then ``packed`` is None), or None.
        chosen_routes: the route :data:`ROUTES` chose per ``(dtype, rows)`` for this weight, so a decoding step
            asks the route table once per layer and row count, not on every call.
    """

    packed: torch.Tensor | None
    scales_zeros: torch.Tensor
    scale_residual: torch.Tensor | None
    zero_residual: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    group_size: int
    kernel_group: int
    q4dot: Q4DotWeight | None = None
    chosen_routes: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def in_features(self) -> int:
        return self.q4dot.in_features if self.packed is None else self.packed.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this weight holds (some may be shared with the module it serves)."""
        tensors = (self.packed, self.scales_zeros, self.scale_residual, self.zero_residual, self.scales, self.qzeros)
        if self.q4dot is not None:
            tensors += (self.q4dot.codes, self.q4dot.scales, self.q4dot.scaled_zeros)
        return [t for t in tensors if t is not None]

    def nbytes(self) -> int:
        """Bytes held in memory by all tensors of this weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def zeros(self) -> torch.Tensor:
        """The integer zero points, int32 ``[groups, out_features]``."""
        if self.qzeros is not None:
            return unpack_awq(self.qzeros)
        return _recovered_zeros(self.scales_zeros, self.zero_residual, self.scales, self.group_size // self.kernel_group)

    def awq_qzeros(self) -> torch.Tensor:
        """The zero points in the checkpoint layout, int32 ``[groups, out_features // 8]``, bit-identical."""
        return self.qzeros if self.qzeros is not None else pack_awq(self.zeros())


def _kernel_group(group_size: int, in_features: int) -> int:
    """Largest int4pack group dividing both ``group_size`` and ``in_features`` (so a partial last AWQ group is
    whole kernel groups too; scales are repeated per kernel group), else 0."""
    return next((g for g in _KERNEL_GROUPS if group_size % g == 0 and in_features % g == 0), 0)


def _nibble_views(codes: torch.Tensor, kind: str, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(low, high)`` ``[in, blocks, block_n // 2]`` of codes ``[in, padded_out]``, in int4pack byte order.

    ATen's int4pack buffer is ``[padded_out // block_n, in, block_n // 2]`` bytes. Byte ``j`` of a block row holds
    columns ``(j, j + block_n // 2)`` of the block in its (low, high) nibbles for ``split`` and ``(2j, 2j + 1)`` for
    ``pair`` (see ``weight_to_int4pack_kernel`` in ATen's ``int4mm_kernel.cpp``).
    """
    in_features, padded_out = codes.shape
    half = block_n // 2
    if kind == "split":
        blocked = codes.view(in_features, padded_out // block_n, 2, half)
        return blocked[:, :, 0], blocked[:, :, 1]
    blocked = codes.view(in_features, padded_out // block_n, half, 2)
    return blocked[..., 0], blocked[..., 1]


def _pack_layout(codes: torch.Tensor, kind: str, block_n: int) -> torch.Tensor:
    """uint8 codes ``[in, padded_out]`` -> ATen int4pack buffer uint8 ``[padded_out, in // 2]``."""
    low, high = _nibble_views(codes, kind, block_n)
    packed = (low | (high << 4)).permute(1, 0, 2).contiguous()
    return packed.view(codes.shape[1], codes.shape[0] // 2)


def _unpack_layout(packed: torch.Tensor, kind: str, block_n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_layout`: ATen int4pack buffer ``[padded_out, in // 2]`` -> uint8 ``[in, padded_out]``."""
    padded_out, in_features = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(padded_out // block_n, in_features, block_n // 2).transpose(0, 1)
    codes = torch.empty(in_features, padded_out, dtype=torch.uint8)
    low, high = _nibble_views(codes, kind, block_n)
    torch.bitwise_and(blocks, 0xF, out=low)
    torch.bitwise_right_shift(blocks, 4, out=high)
    return codes


@functools.lru_cache(maxsize=None)
def native_layout() -> tuple[str, int]:
    """The ``(kind, block_n)`` int4pack layout of this process's ATen build and CPU, found by packing a probe.

    The layout depends on ATen's CPU capability (``torch.backends.cpu.get_cpu_capability()``, overridable with
    ``ATEN_CPU_CAPABILITY``), so it is probed: the candidate whose pack equals ATen's own converter, bit for bit.
    """
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (_N_ALIGN, 32), dtype=torch.int32, generator=generator)
    # The second argument (innerKTiles) only shapes the CUDA layout; the CPU converter ignores it.
    native = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    codes = probe.t().to(torch.uint8).contiguous()
    for kind, block_n in _LAYOUT_CANDIDATES:
        if torch.equal(_pack_layout(codes, kind, block_n), native):
            return kind, block_n
    raise NotImplementedError(
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}) packs int4 weights "
        f"in a layout none of {_LAYOUT_CANDIDATES} matches; use backend='reference' and report this build."
    )


def _awq_to_codes(qweight: torch.Tensor, padded_out: int) -> torch.Tensor:
    """AWQ int32 ``[in, out // 8]`` -> uint8 codes ``[in, padded_out]`` (zero-padded columns).

    Same result as ``reference.unpack_awq`` but one int32 pass per channel of each 8 instead of int64 temporaries
    (4x faster; it runs for every layer at load time).
    """
    in_features, words = qweight.shape
    codes = torch.zeros(in_features, padded_out, dtype=torch.uint8)
    per_word = codes[:, : words * 8].view(in_features, words, 8)
    for channel, nibble in enumerate(AWQ_REVERSE_ORDER):
        per_word[..., channel] = (qweight >> (4 * nibble)) & 0xF
    return codes


def _codes_to_awq(codes: torch.Tensor, out_features: int) -> torch.Tensor:
    """uint8 codes ``[in, padded_out]`` -> AWQ int32 ``[in, out // 8]``, bit-identical to ``reference.pack_awq``.

    int32 shifts wrap like the checkpoint format's words (torch shifts as unsigned, so no overflow UB).
    """
    in_features = codes.shape[0]
    per_word = codes[:, :out_features].view(in_features, out_features // 8, 8)
    words = torch.zeros(in_features, out_features // 8, dtype=torch.int32)
    for nibble, channel in enumerate(AWQ_ORDER):
        words |= per_word[..., channel].to(torch.int32) << (4 * nibble)
    return words


def _check_awq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> int:
    """Validate AWQ tensors and return the effective group size (``in_features`` for ``-1``)."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError(
            f"qweight and qzeros must be int32 (AWQ GEMM layout), got {qweight.dtype} and {qzeros.dtype}; "
            "pass the checkpoint tensors unchanged."
        )
    if not scales.is_floating_point():
        raise TypeError(f"scales must be a float tensor, got {scales.dtype}; pass the checkpoint's fp16 scales.")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError(
            f"qweight, qzeros and scales must be 2-D, got shapes {tuple(qweight.shape)}, {tuple(qzeros.shape)}, "
            f"{tuple(scales.shape)}; pass one layer's tensors."
        )
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


def prepack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, layout: str = "auto"
) -> CpuAwqWeight:
    """Prepack AWQ GEMM tensors for :func:`awq_gemm_cpu`, once at load time.

    The codes are kept in one layout: the native q4dot kernel's where it built on this machine and takes the layer
    (``in_features`` and the group multiples of 64), else ATen's int4pack layout.

    Args:
        qweight: int32 ``[in_features, out_features // 8]`` (AWQ nibble order).
        qzeros: int32 ``[groups, out_features // 8]`` with ``groups = ceil(in_features / group_size)``.
        scales: float ``[groups, out_features]`` (fp16 in checkpoints).
        group_size: quantization group along ``in_features`` (the last group may be partial); ``-1`` means one
            group (per-channel).
        layout: ``"auto"`` (as above), ``"q4dot"`` (raises ``ValueError`` where unavailable) or ``"int4pack"``.

    Returns a :class:`CpuAwqWeight`: in the q4dot layout 0.58 bytes per weight at group 128 (29% of bf16). In the
    int4pack layout ~0.56 bytes per weight with bf16-exact fp16 scales: 28.1% of bf16 at group
    128, 29.9% when ``in_features`` is 576 (its partial last group needs kernel group 64, doubling the bf16 scale
    rows). Other scales add the scale remainder's pairs (+1.6% of bf16 at group 128).
    """
    group = _check_awq_tensors(qweight, qzeros, scales, group_size)
    in_features, out_features = qweight.shape[0], scales.shape[1]
    padded_out = -(-out_features // _N_ALIGN) * _N_ALIGN
    kernel_group = _kernel_group(group, in_features)
    if layout not in ("auto", "q4dot", "int4pack"):
        raise ValueError(f"layout must be 'auto', 'q4dot' or 'int4pack', got {layout!r}.")
    use_q4dot = q4dot_shape_supported(in_features, group) and q4dot_available()
    if layout == "q4dot" and not use_q4dot:
        raise ValueError(
            f"the q4dot layout needs the native kernel (built: {q4dot_available()}) and in_features and group_size "
            f"divisible by 64 (got {in_features} and {group}); use layout='auto'."
        )
    if layout == "auto" and use_q4dot and kernel_group and _cpu_capability().startswith(("AVX2", "AVX512")):
        layout = _measured_layout(qweight, qzeros, scales, group)
    codes = _awq_to_codes(qweight, padded_out)
    zeros = unpack_awq(qzeros)
    empty = torch.empty(0, dtype=torch.bfloat16)
    if use_q4dot and layout != "int4pack":
        q4dot = q4dot_pack(codes[:, :out_features], zeros, scales, group)
        return CpuAwqWeight(None, empty, None, empty, scales.contiguous(), qzeros.contiguous(), group, 0, q4dot)
    packed = _pack_layout(codes, *native_layout())
    if not kernel_group:
        return CpuAwqWeight(packed, empty, None, empty, scales.contiguous(), qzeros.contiguous(), group, 0)
    repeat = group // kernel_group
    # fp32 [in // kernel_group, out, 2]: each AWQ group's (scale, zero) once per kernel group, exact in fp32.
    pairs = torch.stack((scales.float(), (8.0 - zeros.float()) * scales.float()), dim=-1)
    pairs = pairs.repeat_interleave(repeat, dim=0)[: in_features // kernel_group]
    scales_zeros = _padded(pairs.to(torch.bfloat16), padded_out)
    residual = pairs - scales_zeros[:, :out_features].float()
    scale_residual = None
    if residual[..., 0].any():
        scale_residual = _padded((residual * residual.new_tensor([1.0, 0.0])).to(torch.bfloat16), padded_out)
    zero_residual = residual[::repeat, :, 1].to(torch.bfloat16).contiguous()
    weight = CpuAwqWeight(
        packed, scales_zeros, scale_residual, zero_residual, scales.contiguous(), None, group, kernel_group
    )
    if not torch.equal(weight.zeros(), zeros):
        # Zeros are not recoverable (e.g. a zero scale): keep the checkpoint's.
        weight = dataclasses.replace(weight, qzeros=qzeros.contiguous())
    return weight


def prepack_codes(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int
) -> CpuAwqWeight | None:
    """Prepack unsigned integer codes of any width 1..8 for :func:`awq_gemm_cpu`, once at load time.

    Args:
        codes: integer ``[in_features, out_features]``, values ``0 .. 2^bits - 1``.
        zeros: integer ``[groups, out_features]``, the zero points (``w = (q - z) * s``).
        scales: float ``[groups, out_features]``.
        group_size: as for :func:`prepack` (``-1``: one group).
        bits: the code width.

    Codes of at most 4 bits take :func:`prepack`'s layouts; 5..8 bits the q4dot kernel's one-code-per-byte
    layout. Returns None where no CPU kernel takes the layer: at most 4 bits with ``out_features % 8`` (the AWQ
    words hold 8 channels), or more than 4 bits without the native kernel or with ``in_features`` or the group
    not a multiple of 64. The zero points stay with the caller (they are needed again only by
    :meth:`CpuAwqWeight.zeros` for the int4 layouts, which recover them).
    """
    in_features, out_features = codes.shape
    group = in_features if group_size == -1 else group_size
    if bits <= 4:
        if out_features % 8:
            return None
        return prepack(pack_awq(codes.to(torch.int32)), pack_awq(zeros.to(torch.int32)), scales, group)
    if not (q4dot_available() and q4dot_shape_supported(in_features, group)):
        return None
    empty = torch.empty(0, dtype=torch.bfloat16)
    wide = q4dot_pack(codes, zeros, scales, group, bits)
    return CpuAwqWeight(None, empty, None, empty, scales.contiguous(), None, group, 0, wide)


def unprepack_codes(weight: CpuAwqWeight) -> torch.Tensor:
    """The codes of a weight from :func:`prepack` or :func:`prepack_codes`: uint8 ``[in, out]``, bit-identical."""
    if weight.packed is None:
        return q4dot_codes(weight.q4dot).contiguous()
    return _unpack_layout(weight.packed, *native_layout())[:, : weight.out_features].contiguous()


def _measured_layout(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> str:
    """The layout (:data:`LAYOUTS`) whose kernel multiplies one row fastest for this layer's shape class on this
    machine; both are built and timed only when the class is not in the route table yet."""
    in_features, out_features = qweight.shape[0], scales.shape[1]
    x = torch.randn(1, in_features)
    weights: dict[str, CpuAwqWeight] = {}

    def run(layout: str) -> torch.Tensor:
        if layout not in weights:
            weights[layout] = prepack(qweight, qzeros, scales, group, layout=layout)
        return _by_route(layout, x, weights[layout])

    return LAYOUTS.choose((in_features, out_features, group), run)


def _padded(pairs: torch.Tensor, padded_out: int) -> torch.Tensor:
    """``[rows, out, 2]`` -> contiguous ``[rows, padded_out, 2]``, zero in the padded columns."""
    padded = pairs.new_zeros(pairs.shape[0], padded_out, 2)
    padded[:, : pairs.shape[1]] = pairs
    return padded


def _recovered_zeros(
    scales_zeros: torch.Tensor, zero_residual: torch.Tensor, scales: torch.Tensor, repeat: int
) -> torch.Tensor:
    """int32 ``[groups, out]``: ``z = 8 - zero / scale`` from the kernel's bf16 zero plus its exact remainder."""
    zero = scales_zeros[::repeat, : scales.shape[1], 1].float() + zero_residual.float()
    return (8.0 - torch.round(zero / scales.float())).to(torch.int32)


def unprepack(weight: CpuAwqWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`prepack`: ``(qweight, qzeros, scales)`` bit-identical to the tensors packed."""
    return _codes_to_awq(unprepack_codes(weight), weight.out_features), weight.awq_qzeros(), weight.scales


@functools.lru_cache(maxsize=None)
def _cpu_capability() -> str:
    """ATen's CPU kernel level for this process (``AVX512``, ``AVX2``, ``DEFAULT``, ...); fixed at start-up."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_routes(rows: int, weight: CpuAwqWeight) -> tuple[str, ...]:
    """The routes :func:`awq_gemm_cpu` may take for ``rows`` input rows of ``weight`` on this machine.

    ``q4dot`` where the native kernel built and takes the layer, up to :data:`_Q4DOT_MAX_ROWS` rows;
    ``int4pack`` where ATen runs it vectorized (AVX2 or AVX-512; elsewhere it is a scalar loop 10-80x slower than
    dequant + sgemm) and the group fits its kernel groups; ``dequant`` always.
    """
    routes = ("q4dot",) if weight.q4dot is not None and rows <= _Q4DOT_MAX_ROWS else ()
    if weight.kernel_group and _cpu_capability().startswith(("AVX2", "AVX512")):
        routes += ("int4pack",)
    return (*routes, "dequant")


def _shape_class(x2d: torch.Tensor, weight: CpuAwqWeight) -> tuple:
    """``(dtype, in, out, group, codes layout, row bucket)``; with the layout and the row bucket it determines
    :func:`cpu_routes` (the q4dot row limit is a power of two)."""
    layout = f"q4dot-w{weight.q4dot.bits}" if weight.packed is None else f"int4pack-k{weight.kernel_group}"
    return (x2d.dtype, weight.in_features, weight.out_features, weight.group_size, layout, row_bucket(x2d.shape[0]))


def _by_route(route: str, x2d: torch.Tensor, weight: CpuAwqWeight) -> torch.Tensor:
    """``[M, in] -> [M, out]`` in x's dtype by one route."""
    if route == "q4dot":
        return q4dot_matmul(x2d, weight.q4dot).to(x2d.dtype)
    if route == "int4pack":
        return _int4pack_matmul(x2d, weight)
    return _dequant_matmul(x2d, weight)


def _int4pack_matmul(x2d: torch.Tensor, weight: CpuAwqWeight) -> torch.Tensor:
    """``[M, in] -> [M, out]`` in x's dtype through the bf16 tinygemm kernel (bf16 activations, fp32 accumulate),
    with the exact remainders of the bf16 scales and zeros added back (module docstring)."""
    x_bf16 = x2d.to(torch.bfloat16).contiguous()
    kernel = functools.partial(
        torch.ops.aten._weight_int4pack_mm_for_cpu, x_bf16, weight.packed, weight.kernel_group
    )
    y = kernel(weight.scales_zeros)[:, : weight.out_features].float()
    if weight.scale_residual is not None:
        y += kernel(weight.scale_residual)[:, : weight.out_features]
    y = torch.addmm(y, _group_sums(x2d.float(), weight.group_size), weight.zero_residual.float())
    return y.to(x2d.dtype)


def _group_sums(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[M, in] -> [M, ceil(in / group)]``: the sum of each quantization group's inputs (last one may be partial)."""
    full = x.shape[1] // group
    sums = x[:, : full * group].reshape(x.shape[0], full, group).sum(-1)
    if full * group < x.shape[1]:
        sums = torch.cat((sums, x[:, full * group :].sum(-1, keepdim=True)), dim=1)
    return sums


def _dequant_matmul(x2d: torch.Tensor, weight: CpuAwqWeight) -> torch.Tensor:
    """``[M, in] -> [M, out]`` in x's dtype: fp32 sgemm over transient dequantized column slabs."""
    if weight.packed is None:
        return q4dot_dequant_matmul(x2d, weight.q4dot, _SLAB_FLOATS).to(x2d.dtype)
    kind, block_n = native_layout()
    in_features, out_features = weight.in_features, weight.out_features
    x32 = x2d.float().contiguous()
    scales, zeros = weight.scales.float(), weight.zeros().float()
    blocks = weight.packed.reshape(-1, in_features, block_n // 2)
    blocks_per_slab = min(blocks.shape[0], max(1, _SLAB_FLOATS // (in_features * block_n)))
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
    w = slab[:, : chunk.shape[0] * block_n]
    low, high = _nibble_views(w, kind, block_n)
    by_row = chunk.transpose(0, 1)
    low.copy_(by_row & 0xF)
    high.copy_(by_row >> 4)
    return w


def awq_gemm_cpu(x: torch.Tensor, weight: CpuAwqWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in_features] @ dequant(W) [in, out] (+ bias [out])`` -> ``[..., out_features]`` in x's dtype.

    ``x`` is typically ``[batch, seq, in_features]``, fp32 (the fast CPU dtype), bf16 or fp16. The route is the
    fastest of :func:`cpu_routes` for the shape class (rows ``M = batch * seq`` in power-of-two buckets), measured
    once per machine (:mod:`.._routes`; ``HF_PLUGINS_ROUTE=q4dot|int4pack|dequant`` forces one).
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
    forced, key = _env.forced_route(), (x2d.dtype, x2d.shape[0])
    route = None if forced else weight.chosen_routes.get(key)
    if route is None:
        routes = cpu_routes(x2d.shape[0], weight)
        route = ROUTES.choose(_shape_class(x2d, weight), lambda candidate: _by_route(candidate, x2d, weight), routes)
        if not forced:
            weight.chosen_routes[key] = route
    y = _by_route(route, x2d, weight)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], weight.out_features)
