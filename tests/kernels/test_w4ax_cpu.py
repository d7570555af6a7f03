"""The W4Ax CPU path (``hf_plugins.kernels.w4ax_gemm.cpu``), both routes, against the reference."""

import pytest
import torch

from hf_plugins.kernels.w4ax_gemm import w4ax_linear
from hf_plugins.kernels.w4ax_gemm.cpu import prepack_cpu, w4ax_linear_cpu
from hf_plugins.kernels.w4ax_gemm.reference import pack_int4, quantize_weight, w4ax_linear_reference
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error


@pytest.mark.parametrize("route", ["int8", "fp32"])
@pytest.mark.parametrize(("M", "K", "N", "a8_channels", "group_size"),
                         [(1, 300, 24, 128, 128), (7, 257, 40, 0, 64), (33, 390, 72, 390, -1), (5, 64, 8, 0, 128)],
                         ids=lambda v: str(v))
def test_cpu_routes_match_the_reference(route, M, K, N, a8_channels, group_size):
    gen = torch.Generator().manual_seed(K + M)
    x = torch.randn(M, K, generator=gen) * torch.rand(K, generator=gen) * 10
    weight, bias = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    perm = torch.randperm(K, generator=gen)
    codes, scales = quantize_weight(weight[:, perm], group_size)
    packed = prepack_cpu(pack_int4(codes), scales, K, group_size, route=route)
    out = w4ax_linear_cpu(x, perm, a8_channels, packed, bias)
    expected = w4ax_linear_reference(x, perm, a8_channels, codes, scales, group_size, bias)
    assert max_rel_error(out, expected) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_dispatch_runs_every_backend_on_the_same_numbers():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 200, generator=gen)
    weight = torch.randn(16, 200, generator=gen)
    perm = torch.randperm(200, generator=gen)
    codes, scales = quantize_weight(weight[:, perm], 128)
    outputs = {backend: w4ax_linear(x, perm, 128, pack_int4(codes), scales, 128, backend=backend)
               for backend in ("reference", "cpu", "triton")}
    for backend in ("cpu", "triton"):
        assert outputs[backend].shape == (2, 3, 16)
        assert max_rel_error(outputs[backend], outputs["reference"]) <= FLOAT_KERNEL_RTOL[torch.float32]


def test_bad_route_and_shape_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"route must be one of \('int8', 'fp32'\), got 'avx'"):
        prepack_cpu(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 1), 128, 128, route="avx")
    packed = prepack_cpu(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 1), 128, 128)
    with pytest.raises(ValueError, match="x has 100 input features but the weight expects 128"):
        w4ax_linear_cpu(torch.zeros(1, 100), torch.arange(100), 0, packed)
