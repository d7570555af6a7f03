"""CPU bipolar linear (nibble planes on the int4 kernels) against the integer-exact reference."""

import itertools

import pytest
import torch

from hf_plugins.kernels.awq_gemm import awq_dequantize
from hf_plugins.kernels.bitplane_gemm import bipolar_linear_reference
from hf_plugins.kernels.bitplane_gemm.cpu import bitplane_linear_cpu, integer_zeros, nibble_chunks, prepack_bitplanes
from hf_plugins.quantizers.bipolar.weights import quantize_weight_bipolar
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

ROUTES = {
    # (in_features, group_size): the int4pack route needs kernel groups of 32..256; 100 / 50 has none and takes
    # the exact fp32 dequant route.
    "int4pack": (128, 32),
    "dequant": (100, 50),
}


def _layer(w_bits: int, in_features: int, group_size: int, out_features: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    return quantize_weight_bipolar(weight, w_bits, group_size)


@pytest.mark.parametrize("w_bits", range(1, 9))
def test_nibble_chunks_sum_to_the_weight_exactly(w_bits):
    planes, scales, offsets = _layer(w_bits, 96, 32)
    chunks = nibble_chunks(planes, scales, offsets, 96)
    assert len(chunks) == -(-w_bits // 4)
    total = sum(awq_dequantize(*chunk, 32).double() for chunk in chunks)  # [in, out]
    identity = torch.eye(96, dtype=torch.float64)
    expected = bipolar_linear_reference(identity, planes, scales, offsets, 96, 32, None)
    assert torch.equal(total, expected)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("w_bits, a_bits", list(itertools.product(range(1, 9), (None, *range(1, 9)))))
def test_cpu_linear_matches_the_reference(w_bits, a_bits, route):
    in_features, group_size = ROUTES[route]
    planes, scales, offsets = _layer(w_bits, in_features, group_size, seed=w_bits)
    bias = torch.randn(40)
    x = torch.randn(3, 5, in_features, generator=torch.Generator().manual_seed(a_bits or 0))
    weight = prepack_bitplanes(planes, scales, offsets, in_features, group_size)
    y = bitplane_linear_cpu(x, weight, a_bits, bias)
    expected = bipolar_linear_reference(x.double(), planes, scales, offsets, in_features, group_size, a_bits,
                                        bias.double())
    assert y.shape == (3, 5, 40) and y.dtype == torch.float32
    # int4pack runs bf16 activations; integer activation values (a_bits) are exact in bf16, the output is not.
    rtol = FLOAT_KERNEL_RTOL[torch.bfloat16 if route == "int4pack" else torch.float32]
    assert max_rel_error(y, expected) <= rtol


def test_offsets_off_the_integer_grid_have_no_int4_form():
    planes, scales, offsets = _layer(3, 64, 32)
    assert integer_zeros(scales, offsets, 3) is not None
    assert integer_zeros(scales, offsets + 0.3 * scales, 3) is None
    assert prepack_bitplanes(planes, scales, offsets + 0.3 * scales, 64, 32) is None
    assert nibble_chunks(planes[:, :20], scales[:, :20], offsets[:, :20], 64) is None  # out % 8: no AWQ packing


def test_public_op_dispatches_and_explains_what_the_cpu_backend_needs():
    from hf_plugins.kernels.bitplane_gemm import bipolar_linear

    planes, scales, offsets = _layer(5, 64, 32)
    x = torch.randn(4, 64)
    expected = bipolar_linear(x, planes, scales, offsets, 64, 32, 8, backend="reference")
    assert max_rel_error(bipolar_linear(x, planes, scales, offsets, 64, 32, 8, backend="cpu"), expected) <= \
        FLOAT_KERNEL_RTOL[torch.bfloat16]
    with pytest.raises(ValueError, match=r"integer zero points .* use backend='reference'"):
        bipolar_linear(x, planes, scales, offsets + 0.3 * scales, 64, 32, None, backend="cpu")
