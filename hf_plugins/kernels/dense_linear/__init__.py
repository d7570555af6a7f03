"""Dense float linear ``y = x W^T + b`` with a faster CPU path, and an ``nn.Linear`` that uses it.

Backends: ``reference`` (float64 oracle), ``cpu`` and, on CUDA, cuBLAS through ``F.linear`` (already the fast path
there; there is no Triton kernel for a plain dense matmul to beat it). The ``cpu`` backend has two routes, oneDNN
(:mod:`.cpu`) and ``F.linear`` (MKL); neither wins everywhere (oneDNN: 1.2-1.5x on wide layers, 0.35-0.7x on
SmolLM2's 576-wide attention projections, AMD EPYC at 1 thread), so the fastest is measured per shape class
(:mod:`.._routes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import choose_backend
from .._routes import RouteChooser, row_bucket
from .cpu import dense_linear_cpu, onednn_linear_supports
from .reference import dense_linear_reference

__all__ = [
    "FastLinear",
    "dense_linear",
    "dense_linear_cpu",
    "dense_linear_reference",
    "fast_linears",
    "use_fast_linears",
]


ROUTES = RouteChooser("dense_linear", ("onednn", "torch"))
"""The CPU routes, chosen per ``(dtype, in, out, row bucket)`` on this machine."""

def _shape_class(x: torch.Tensor, weight: torch.Tensor) -> tuple:
    """``(dtype, in, out, rows rounded up to a power of two, at most 512)``: decode, verification and prefill rows
    fall into different classes, close row counts into one."""
    rows = x.numel() // x.shape[-1]
    return str(x.dtype).removeprefix("torch."), weight.shape[1], weight.shape[0], row_bucket(rows)


def _by_route(route: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return dense_linear_cpu(x, weight, bias) if route == "onednn" else F.linear(x, weight, bias)


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """``x [..., in]``, ``weight [out, in]``, ``bias [out]`` -> ``[..., out]``.

    On CPU, inference in the dtypes oneDNN runs on this machine (fp32; bf16 where the CPU has AVX-512) takes the
    faster of oneDNN and ``F.linear`` for its shape class, measured once (``HF_PLUGINS_ROUTE=onednn|torch``
    forces one); autograd, other dtypes and builds without oneDNN use ``F.linear`` (same math, the stock kernel).
    """
    chosen = choose_backend("dense_linear", x.device, backend)
    if chosen == "reference":
        return dense_linear_reference(x, weight, bias)
    if (
        chosen == "cpu"
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and onednn_linear_supports(x.dtype)
    ):
        route = ROUTES.choose(_shape_class(x, weight), lambda candidate: _by_route(candidate, x, weight, bias))
        return _by_route(route, x, weight, bias)
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose forward goes through :func:`dense_linear`; parameters and state dict unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)


def _switch(models, source: type, target: type) -> list[nn.Module]:
    """Give every module of exactly class ``source`` in ``models`` the class ``target``; the modules switched."""
    switched = [m for model in models for m in model.modules() if type(m) is source]
    for module in switched:
        module.__class__ = target
    return switched


def use_fast_linears(model: nn.Module, enable: bool = True) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` to :class:`FastLinear` in place (or back with ``enable=False``).

    Only the class changes: the same parameter tensors stay, so ``state_dict``, ``save_pretrained``, PEFT and
    weight tying are unaffected. Returns the number of modules switched.
    """
    source, target = (nn.Linear, FastLinear) if enable else (FastLinear, nn.Linear)
    return len(_switch([model], source, target))


@contextlib.contextmanager
def fast_linears(*models: nn.Module, enabled: bool = True) -> Iterator[None]:
    """:func:`use_fast_linears` on ``models`` for the block; exactly the modules it switched are switched back."""
    switched = _switch(models, nn.Linear, FastLinear) if enabled else []
    try:
        yield
    finally:
        for module in switched:
            module.__class__ = nn.Linear
