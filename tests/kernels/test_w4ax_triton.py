"""Triton W4Ax kernels (``hf_plugins.kernels.w4ax_gemm.triton``) against the integer-exact reference.

On CPU they run under the Triton interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` first); tests marked
``gpu`` run the GPU tilings at model shapes.
"""

import pytest
import torch

from hf_plugins.kernels.w4ax_gemm import triton as w4ax_triton
from hf_plugins.kernels.w4ax_gemm.reference import (
    BLOCK,
    num_blocks,
    pack_int4,
    quantize_activations,
    quantize_weight,
    w4ax_linear_reference,
    w4ax_matmul_reference,
)
from hf_plugins.kernels.w4ax_gemm.triton import quantize_activations_triton, w4ax_linear_triton, w4ax_matmul_triton
from tests.kernels.poison import poisoned_output
from tests.tolerances import FLOAT_KERNEL_RTOL, assert_close_kernel, max_rel_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(w4ax_triton, "_new_output", poisoned_output)


def _split(codes: torch.Tensor, a8_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permuted activation codes ``[M, K]`` -> the kernel's ``(int8 [M, a8], nibbles [M, ceil((K - a8) / 2)])``."""
    return codes[:, :a8_channels].contiguous(), pack_int4(codes[:, a8_channels:])


def _codes(rows: int, in_features: int, a8_channels: int, generator) -> torch.Tensor:
    """Random activation codes over each block's full range (8-bit blocks first)."""
    wide = torch.randint(-127, 128, (rows, in_features), generator=generator)
    narrow = torch.randint(-7, 8, (rows, in_features), generator=generator)
    return torch.where(torch.arange(in_features) < a8_channels, wide, narrow).to(torch.int8)


CASES = [  # (M, K, N, a8_channels, group_size): odd sizes, partial blocks, every mix of block kinds
    (5, 300, 24, 0, 128), (5, 300, 24, 128, 128), (5, 300, 24, 256, 64), (5, 300, 24, 300, -1),
    (3, 257, 40, 128, -1), (1, 128, 16, 128, 64), (17, 390, 72, 256, 128), (2, 64, 8, 0, 64),
]


@pytest.mark.parametrize(("M", "K", "N", "a8_channels", "group_size"), CASES, ids=lambda v: str(v))
def test_integer_product_is_exact(M, K, N, a8_channels, group_size):
    gen = torch.Generator().manual_seed(K + a8_channels)
    x_codes = _codes(M, K, a8_channels, gen)
    w_codes = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    x8, x4 = _split(x_codes, a8_channels)
    groups = 1 if group_size == -1 else -(-K // group_size)
    ones_x, ones_w = torch.ones(M, num_blocks(K)), torch.ones(groups, N)
    out = w4ax_matmul_triton(x8, x4, ones_x, pack_int4(w_codes).t().contiguous(), ones_w, K, group_size)
    exact = x_codes.long() @ w_codes.long().t()  # |sum| < 2^24: fp32 holds it exactly
    assert torch.equal(out.double(), exact.double())


@pytest.mark.parametrize(("M", "K", "N", "a8_channels", "group_size"), CASES, ids=lambda v: str(v))
def test_scaled_product_matches_the_reference(M, K, N, a8_channels, group_size):
    gen = torch.Generator().manual_seed(M * K)
    x_codes = _codes(M, K, a8_channels, gen)
    w_codes = torch.randint(-7, 8, (N, K), generator=gen, dtype=torch.int8)
    groups = 1 if group_size == -1 else -(-K // group_size)
    x_scales, w_scales = torch.rand(M, num_blocks(K), generator=gen) + 0.1, torch.rand(N, groups, generator=gen)
    x8, x4 = _split(x_codes, a8_channels)
    out = w4ax_matmul_triton(x8, x4, x_scales, pack_int4(w_codes).t().contiguous(), w_scales.t().contiguous(), K,
                             group_size)
    expected = w4ax_matmul_reference(x_codes, x_scales, w_codes, w_scales, group_size)
    assert max_rel_error(out, expected) <= FLOAT_KERNEL_RTOL[torch.float32]


@pytest.mark.parametrize("a8_channels", [0, 128, 256, 300])
def test_fused_activation_pass_equals_gather_then_reference_quantizer(a8_channels):
    gen = torch.Generator().manual_seed(a8_channels)
    x = torch.randn(6, 300, generator=gen) * torch.rand(300, generator=gen) * 20
    x[0, :8] = torch.tensor([0.5, 1.5, -2.5, 3.5, 7.0, -7.0, 0.0, -0.0])  # ties and signed zeros (row absmax 7)
    x[1] = 0.0  # an all-zero row keeps a finite scale
    perm = torch.randperm(300, generator=gen)
    x8, x4, scales = quantize_activations_triton(x, perm, a8_channels)
    codes, expected_scales = quantize_activations(x[:, perm], a8_channels)
    assert torch.equal(scales, expected_scales)
    expected8, expected4 = _split(codes, a8_channels)
    assert torch.equal(x8, expected8) and torch.equal(x4, expected4)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("a8_channels", "group_size", "bias"), [(128, 128, True), (0, 64, False), (256, -1, True)])
def test_linear_matches_the_reference(dtype, a8_channels, group_size, bias):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 300, generator=gen) * 3).to(dtype)
    weight = torch.randn(40, 300, generator=gen)
    perm = torch.randperm(300, generator=gen)
    w_codes, w_scales = quantize_weight(weight[:, perm], group_size)
    b = torch.randn(40, generator=gen) if bias else None
    out = w4ax_linear_triton(x, perm, a8_channels, pack_int4(w_codes).t().contiguous(), w_scales.t().contiguous(),
                             group_size, b)
    expected = w4ax_linear_reference(x, perm, a8_channels, w_codes, w_scales, group_size, b)
    assert out.dtype == dtype and out.shape == (2, 5, 40)
    assert_close_kernel(out, expected.float(), dtype)


def test_persistent_grid_walks_every_tile():
    # 4 programs under the interpreter, 9 x 2 output tiles: each program computes several tiles.
    gen = torch.Generator().manual_seed(9)
    M, K, N = 140, 128, 96
    x_codes = _codes(M, K, 0, gen)
    w_codes = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    x8, x4 = _split(x_codes, 0)
    out = w4ax_matmul_triton(x8, x4, torch.ones(M, 1), pack_int4(w_codes).t().contiguous(), torch.ones(1, N), K,
                             128)
    assert torch.equal(out.double(), (x_codes.long() @ w_codes.long().t()).double())


def test_linear_rejects_integer_activations():
    with pytest.raises(TypeError, match="w4ax_linear_triton takes fp16, bf16 or fp32 activations, got torch.int32"):
        w4ax_linear_triton(torch.zeros(1, BLOCK, dtype=torch.int32), torch.arange(BLOCK), 0,
                           torch.zeros(BLOCK // 2, 16, dtype=torch.uint8), torch.ones(1, 16), 128)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 64, 512])
@pytest.mark.parametrize(("K", "N"), [(4096, 4096), (4096, 14336)])
def test_gpu_linear_matches_the_reference_at_model_shapes(M, K, N):
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=gen).cuda().half()
    weight = torch.randn(N, K, generator=gen)
    perm = torch.randperm(K, generator=gen)
    w_codes, w_scales = quantize_weight(weight[:, perm], 128)
    out = w4ax_linear_triton(x, perm.cuda(), 512, pack_int4(w_codes).t().contiguous().cuda(),
                             w_scales.t().contiguous().cuda(), 128)
    expected = w4ax_linear_reference(x.cpu().float(), perm, 512, w_codes, w_scales, 128)
    assert_close_kernel(out.float().cpu(), expected, torch.float16)
