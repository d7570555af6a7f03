"""``W4AxLinear``: 4-bit weights with run-time mixed 4-/8-bit activations in FMPQ's reordered channel layout."""

from __future__ import annotations

import torch
from torch import nn

from ...kernels._dispatch import choose_backend
from ...kernels.w4ax_gemm import CpuW4AxWeight, prepack_cpu, w4ax_linear_cpu
from ...kernels.w4ax_gemm.reference import (
    check_layout,
    dequantize_weight,
    num_blocks,
    num_groups,
    pack_int4,
    quantize_weight,
    unpack_int4,
    w4ax_linear_reference,
)
from ..awq.modules import PackedMatmul
from .fmpq import LayerPlan


class W4AxLinear(nn.Module):
    """``y = x W^T + b`` for ``x [..., in_features]`` -> ``[..., out_features]`` with ``W`` 4-bit symmetric per group
    and ``x`` quantized per token and 128-channel block at run time: 8-bit for the first ``a8_channels`` reordered
    channels (the outliers), 4-bit for the rest.

    Buffers: ``qweight`` uint8 ``[out, ceil(in/2)]`` (the weight codes in the reordered channel order, offset-binary
    nibbles), ``scales`` float32 ``[out, groups]``, ``perm`` int64 ``[in]`` (the original channel at each reordered
    position), ``a8_channels`` int64 scalar, ``bias`` ``[out]`` or None.

    Kernels (``HF_PLUGINS_BACKEND`` or the device picks): CPU and CUDA (Triton) run the packed W4Ax product;
    ``reference`` is the integer-exact oracle. Gradients reach ``x`` straight through the rounding (adapters train).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_layout(in_features, 0, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, -(-in_features // 2), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(out_features, num_groups(in_features, group_size), device=device))
        self.register_buffer("perm", torch.arange(in_features, device=device))
        self.register_buffer("a8_channels", torch.zeros((), dtype=torch.int64, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None
        self._cpu_weight: CpuW4AxWeight | None = None
        self._triton_form: tuple[torch.Tensor, torch.Tensor] | None = None
        self._a8: int | None = None  # a8_channels as a Python int: reading the buffer on CUDA would sync per call

    @classmethod
    def empty_for(cls, linear: nn.Linear, config, dtype: torch.dtype) -> W4AxLinear:
        """An empty module of ``linear``'s shape for ``config`` (a ``W4A4KV4Config``), to load a checkpoint into."""
        return cls(linear.in_features, linear.out_features, config.group_size, bias=linear.bias is not None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, plan: LayerPlan, group_size: int) -> W4AxLinear:
        """Quantize ``linear.weight [out, in]`` round-to-nearest in the channel order of ``plan``."""
        weight = linear.weight.detach()
        check_layout(linear.in_features, plan.a8_channels, group_size)
        module = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None,
                     device=weight.device)
        perm = plan.perm.to(weight.device)
        codes, scales = quantize_weight(weight[:, perm], group_size)
        module.qweight.copy_(pack_int4(codes))
        module.scales.copy_(scales)
        module.perm.copy_(perm)
        module.a8_channels.fill_(plan.a8_channels)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    @property
    def outlier_blocks(self) -> int:
        """Activation blocks kept in 8 bits."""
        return num_blocks(int(self.a8_channels))

    def weight_codes(self) -> torch.Tensor:
        """int8 ``[out, in]`` codes in ``[-7, 7]``, reordered channel order."""
        return unpack_int4(self.qweight, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float32 weight ``[out, in]`` in the original channel order."""
        reordered = dequantize_weight(self.weight_codes(), self.scales, self.group_size)
        weight = torch.empty_like(reordered)
        weight[:, self.perm] = reordered
        return weight

    def _release_caches(self) -> None:
        """Drop every form derived from the buffers (they moved or were reloaded)."""
        self._cpu_weight, self._triton_form, self._a8 = None, None, None

    def _apply(self, fn, recurse=True):
        self._release_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._release_caches()
        return super()._load_from_state_dict(*args, **kwargs)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]`` through the kernel of ``x``'s device (each backend's weight form is built
        once and kept until the module moves or loads new weights)."""
        backend = choose_backend("w4ax_gemm", x.device)
        if self._a8 is None:
            self._a8 = int(self.a8_channels)
        a8 = self._a8
        if backend == "cpu":
            if self._cpu_weight is None:
                self._cpu_weight = prepack_cpu(self.qweight, self.scales, self.in_features, self.group_size)
            return w4ax_linear_cpu(x, self.perm, a8, self._cpu_weight, self.bias)
        if backend == "triton":
            from ...kernels.w4ax_gemm.triton import w4ax_linear_triton

            if self._triton_form is None:
                self._triton_form = (self.qweight.t().contiguous(), self.scales.t().contiguous())
            return w4ax_linear_triton(x, self.perm, a8, *self._triton_form, self.group_size, self.bias)
        return w4ax_linear_reference(x, self.perm, a8, self.weight_codes(), self.scales, self.group_size, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return PackedMatmul.apply(x, self)
        return self.packed_forward(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"outlier_blocks={self.outlier_blocks}, bias={self.bias is not None}")
