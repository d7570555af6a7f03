"""``AwqLinear``: the quantized replacement of ``nn.Linear`` (a ``WQLinear_GEMM``-compatible module).

Buffers (the checkpoint format):

- 4 bits, ``out_features % 8 == 0``: the AWQ "GEMM" layout (see ``hf_plugins.kernels.awq_gemm.reference``):
  ``qweight`` int32 ``[in, out // 8]``, ``qzeros`` int32 ``[groups, out // 8]``, ``scales`` fp16 ``[groups, out]``.
- other bit widths: one code per byte, ``qweight`` uint8 ``[in, out]``, ``qzeros`` uint8 ``[groups, out]``,
  ``scales`` fp16 ``[groups, out]``.
- ``bias`` in the model dtype ``[out]`` when the original layer had one.

``groups = ceil(in / group_size)`` (1 for per-channel ``group_size=-1``).

On CPU the codes of every bit width are converted once, on the first forward, into the layout of the CPU kernels
(``hf_plugins.kernels.awq_gemm.prepack`` / ``prepack_codes``: half a byte per weight up to 4 bits, one byte for 5..8)
and the ``qweight`` buffer is released; ``state_dict``, loading and device moves regenerate the checkpoint tensors
bit-identically. Layers no kernel takes (see ``prepack_codes``; and bit widths other than 4 on GPUs) multiply a
transient dequantized weight, with a warning once per shape.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels._dispatch import choose_backend
from ...kernels.awq_gemm import (
    CpuAwqWeight,
    awq_gemm,
    awq_gemm_cpu,
    pack_awq,
    prepack,
    prepack_codes,
    unpack_awq,
    unprepack,
    unprepack_codes,
)
from .int_quant import num_groups, quantize_groupwise

logger = logging.getLogger(__name__)


def uses_awq_layout(bits: int, out_features: int) -> bool:
    """Whether a layer is stored in the packed int4 AWQ layout (else one code per byte)."""
    return bits == 4 and out_features % 8 == 0


@functools.lru_cache(maxsize=None)
def _warn_dequant_path(bits: int, in_features: int, out_features: int, device_type: str) -> None:
    """Once per layer shape: a slow path is never silent."""
    logger.warning("AWQ W%d %dx%d on %s multiplies a dequantized copy of its weight on every call (slower than "
                   "the float model): no packed kernel takes it (CPU: W<=4 needs out_features %% 8 == 0, W5-W8 the "
                   "native kernel and in_features and group size multiples of 64; GPU: W4 only)",
                   bits, in_features, out_features, device_type)


class AwqLinear(nn.Module):
    """``y = x @ dequant(W) + b`` for ``x [..., in_features]`` -> ``y [..., out_features]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = num_groups(in_features, group_size)
        if uses_awq_layout(bits, out_features):
            code_shape, zero_shape, code_dtype = (in_features, out_features // 8), (groups, out_features // 8), torch.int32
        else:
            code_shape, zero_shape, code_dtype = (in_features, out_features), (groups, out_features), torch.uint8
        self.register_buffer("qweight", torch.zeros(code_shape, dtype=code_dtype, device=device))
        self.register_buffer("qzeros", torch.zeros(zero_shape, dtype=code_dtype, device=device))
        self.register_buffer("scales", torch.zeros((groups, out_features), dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._cpu_weight: CpuAwqWeight | None = None
        self._register_state_dict_hook(_state_dict_with_awq_qweight)

    @property
    def kernel_group_size(self) -> int:
        """Group length along ``in_features`` as the kernels see it (per-channel = one group of all inputs)."""
        return self.in_features if self.group_size == -1 else self.group_size

    @classmethod
    def empty_for(cls, linear: nn.Linear, config, dtype: torch.dtype) -> "AwqLinear":
        """An empty module of ``linear``'s shape for ``config`` (an ``AwqConfig``), to load a checkpoint into."""
        return cls(linear.in_features, linear.out_features, config.bits, config.group_size,
                   bias=linear.bias is not None, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> "AwqLinear":
        """Quantize ``linear.weight [out, in]`` round-to-nearest (after AWQ has transformed it, if it ran)."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        codes, scales, zeros = quantize_groupwise(weight, bits, group_size)
        codes, zeros = codes.t().contiguous(), zeros.t().contiguous()
        if uses_awq_layout(bits, linear.out_features):
            module.qweight.copy_(pack_awq(codes))
            module.qzeros.copy_(pack_awq(zeros))
        else:
            module.qweight.copy_(codes.to(torch.uint8))
            module.qzeros.copy_(zeros.to(torch.uint8))
        module.scales.copy_(scales.t().to(torch.float16))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def awq_qweight(self) -> torch.Tensor:
        """``qweight`` in the checkpoint layout, regenerated from the CPU prepacked form when that is active."""
        if self._cpu_weight is None:
            return self.qweight
        if uses_awq_layout(self.bits, self.out_features):
            return unprepack(self._cpu_weight)[0]
        return unprepack_codes(self._cpu_weight)

    def awq_qzeros(self) -> torch.Tensor:
        """``qzeros`` in the checkpoint layout, regenerated from the CPU prepacked form when that is active (the
        one-code-per-byte layout keeps its ``qzeros`` buffer)."""
        if self._cpu_weight is not None and uses_awq_layout(self.bits, self.out_features):
            return self._cpu_weight.awq_qzeros()
        return self.qzeros

    def _release_cpu_weight(self) -> None:
        """Restore the AWQ ``qweight`` and ``qzeros`` buffers and drop the CPU prepacked form."""
        if self._cpu_weight is not None:
            self.qweight, self.qzeros = self.awq_qweight(), self.awq_qzeros()
            self._cpu_weight = None

    def _cpu_prepacked(self) -> CpuAwqWeight | None:
        # The prepacked form holds the codes and (exactly recoverable) zeros; the checkpoint buffers are
        # regenerated for state_dict and other devices, so no copy stays in memory.
        if self._cpu_weight is not None:
            return self._cpu_weight
        if uses_awq_layout(self.bits, self.out_features):
            self._cpu_weight = prepack(self.qweight, self.qzeros, self.scales, self.kernel_group_size)
            self.qweight = torch.empty(0, dtype=torch.int32)
            if self._cpu_weight.qzeros is None:
                self.qzeros = torch.empty(0, dtype=torch.int32)
            return self._cpu_weight
        self._cpu_weight = prepack_codes(self.qweight, self.qzeros, self.scales, self.kernel_group_size, self.bits)
        if self._cpu_weight is not None:
            self.qweight = torch.empty(0, dtype=torch.uint8)
        return self._cpu_weight

    def _apply(self, fn, recurse=True):
        self._release_cpu_weight()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._release_cpu_weight()
        return super()._load_from_state_dict(*args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective weight ``[out, in]`` in float32 (for training, tests and ``dequantize()``)."""
        if uses_awq_layout(self.bits, self.out_features):
            codes, zeros = unpack_awq(self.awq_qweight()), unpack_awq(self.awq_qzeros())
        else:
            codes, zeros = self.awq_qweight().to(torch.int32), self.qzeros.to(torch.int32)
        group = self.kernel_group_size
        zeros = zeros.repeat_interleave(group, dim=0)[: self.in_features]
        scales = self.scales.float().repeat_interleave(group, dim=0)[: self.in_features]
        return ((codes - zeros).float() * scales).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = choose_backend("awq_gemm", x.device)
        # Every width has a packed CPU form where prepack_codes finds a layout; on other backends only the AWQ
        # int4 layout has kernels.
        if backend == "cpu":
            packed = self._cpu_prepacked() is not None
        else:
            packed = uses_awq_layout(self.bits, self.out_features)
        if not packed:
            # A transient dequantized weight, freed after the call.
            if backend != "reference":
                _warn_dequant_path(self.bits, self.in_features, self.out_features, x.device.type)
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return PackedMatmul.apply(x, self)
        if backend == "cpu":
            return awq_gemm_cpu(x, self._cpu_weight, self.bias)
        return self.packed_forward(x)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]`` through the packed kernel of ``x``'s device."""
        if choose_backend("awq_gemm", x.device) == "cpu":
            return awq_gemm_cpu(x, self._cpu_prepacked(), self.bias)
        self._release_cpu_weight()
        return awq_gemm(x, self.qweight, self.qzeros, self.scales, self.kernel_group_size, bias=self.bias)

    def tp_shard(self, features: str, start: int, stop: int) -> None:
        """Keep output (``"out"``) or input (``"in"``) features ``[start, stop)`` (tensor parallelism).

        Output shards slice the packed columns, zeros, scales and bias (8 channels per int32 in the AWQ layout);
        input shards slice whole quantization groups, and keep the bias only when they start at 0 (row-parallel
        partial sums are added up across shards). ``in_features``/``out_features`` become the local sizes.
        """
        if features not in ("out", "in"):
            raise ValueError(f"features must be 'out' or 'in', got {features!r}.")
        full = self.out_features if features == "out" else self.in_features
        if not 0 <= start < stop <= full:
            raise ValueError(f"feature range [{start}, {stop}) is not inside {features}_features={full}.")
        self._release_cpu_weight()
        keep = slice(start, stop)
        if features == "out":
            packed = uses_awq_layout(self.bits, self.out_features)
            if packed and (start % 8 or stop % 8):
                raise ValueError(
                    f"AWQ packs 8 output channels per int32: the shard [{start}, {stop}) of out_features={full} "
                    "does not start and end on multiples of 8. Use a tensor-parallel size whose shards do."
                )
            columns = slice(start // 8, stop // 8) if packed else keep
            self.qweight, self.qzeros = self.qweight[:, columns].contiguous(), self.qzeros[:, columns].contiguous()
            self.scales = self.scales[:, keep].contiguous()
            if self.bias is not None:
                self.bias = self.bias[keep].contiguous()
            self.out_features = stop - start
            return
        group = self.kernel_group_size
        if group == self.in_features or start % group or stop % group:
            raise ValueError(
                f"Input shards must hold whole quantization groups: the shard [{start}, {stop}) of in_features="
                f"{full} cuts groups of {self.group_size}. Use a tensor-parallel size whose shards are multiples of "
                "the group size."
            )
        self.qweight = self.qweight[keep].contiguous()
        groups = slice(start // group, stop // group)
        self.qzeros, self.scales = self.qzeros[groups].contiguous(), self.scales[groups].contiguous()
        if start != 0:
            self.bias = None
        self.in_features = stop - start

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class PackedMatmul(torch.autograd.Function):
    """The packed kernel forward with a gradient for ``x`` only (weights are frozen integers), so adapters such
    as LoRA train on top; the backward uses a transient dequantized weight. Any module with ``packed_forward(x)``
    and ``dequantized_weight()`` can use it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: AwqLinear) -> torch.Tensor:
        ctx.module = module
        return module.packed_forward(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.module.dequantized_weight().to(grad_out.dtype)
        return grad_out @ weight, None


def _state_dict_with_awq_qweight(module: AwqLinear, state_dict, prefix, local_metadata):
    """Checkpoints always hold the AWQ layout, even while the CPU prepacked form is the one in memory."""
    if module._cpu_weight is not None:
        state_dict[prefix + "qweight"] = module.awq_qweight()
        state_dict[prefix + "qzeros"] = module.awq_qzeros()
    return state_dict
