"""Bipolar-INT format and the bit-plane decomposition: integer-exact against int64 matmuls."""

import itertools

import pytest
import torch

from hf_plugins.kernels.bitplane_gemm.reference import (
    affine_to_bipolar,
    bipolar_limit,
    bipolar_to_codes,
    bit_planes,
    bitplane_matmul_reference,
    codes_to_bipolar,
    pack_code_planes,
    pack_planes,
    planes_to_bipolar,
    popcount_matmul_reference,
    round_to_bipolar,
    signed_to_bipolar,
    unpack_code_planes,
    unpack_planes,
)


def _random_bipolar(shape, bits, seed):
    codes = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed))
    return codes_to_bipolar(codes, bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bipolar_values_are_the_odd_integers_of_the_range(bits):
    values = codes_to_bipolar(torch.arange(1 << bits), bits)
    limit = bipolar_limit(bits)
    assert values.tolist() == list(range(-limit, limit + 1, 2))
    assert torch.equal(bipolar_to_codes(values, bits), torch.arange(1 << bits, dtype=torch.uint8))
    assert torch.equal(planes_to_bipolar(bit_planes(values, bits)), values)


@pytest.mark.parametrize("bits", range(1, 9))
def test_signed_and_affine_int_convert_losslessly(bits):
    signed = torch.arange(-(1 << (bits - 1)), 1 << (bits - 1))
    assert torch.equal(bipolar_to_codes(signed_to_bipolar(signed, bits), bits).long(), signed + (1 << (bits - 1)))
    # w = s (u - z) over all codes u, for a few scales and zero points, equals s' v + o exactly (float64).
    codes = torch.arange(1 << bits, dtype=torch.float64)
    # Dyadic scales make every product exact in float64, so equality shows the rewrite loses nothing.
    scale = torch.tensor([0.375, 1.5, 2.0], dtype=torch.float64)
    zero = torch.tensor([0.0, 3.0, 7.0], dtype=torch.float64)
    new_scale, offset = affine_to_bipolar(scale, zero, bits)
    bipolar = codes_to_bipolar(codes.long(), bits).double()
    assert torch.equal(scale[:, None] * (codes - zero[:, None]), new_scale[:, None] * bipolar + offset[:, None])


def test_rounding_picks_the_nearest_odd_value_and_clamps():
    x = torch.tensor([-9.0, -3.2, -2.0, -0.1, 0.0, 0.9, 1.0, 1.9, 2.1, 4.0, 6.2, 100.0])
    assert round_to_bipolar(x, 3).tolist() == [-7, -3, -3, -1, 1, 1, 1, 1, 3, 5, 7, 7]  # ties away from zero
    nonzero = x != 0
    assert torch.equal(round_to_bipolar(-x[nonzero], 3), -round_to_bipolar(x[nonzero], 3))  # symmetric
    assert (round_to_bipolar(torch.randn(1000) * 3, 2).abs() <= 3).all()


def test_bad_bits_and_values_raise():
    with pytest.raises(ValueError, match="1 to 8 bits, got 9"):
        bipolar_limit(9)
    with pytest.raises(ValueError, match=r"odd integers in \[-3, 3\]"):
        bipolar_to_codes(torch.tensor([2]), 2)


@pytest.mark.parametrize("x_bits, w_bits", list(itertools.product(range(1, 9), range(1, 9))))
def test_decomposition_and_recovery_equal_an_int64_matmul(x_bits, w_bits):
    m, n, k = 5, 7, 37  # odd shapes; K not a multiple of 8 exercises the packed padding
    x = _random_bipolar((m, k), x_bits, seed=x_bits)
    w = _random_bipolar((n, k), w_bits, seed=10 + w_bits)
    expected = x.long() @ w.long().t()
    x_planes, w_planes = bit_planes(x, x_bits), bit_planes(w, w_bits)
    assert torch.equal(bitplane_matmul_reference(x_planes, w_planes), expected)
    x_packed, w_packed = pack_planes(x_planes), pack_planes(w_planes)
    assert torch.equal(unpack_planes(w_packed, k), w_planes)
    assert torch.equal(popcount_matmul_reference(x_packed, w_packed, k), expected)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rows, k", [(5, 13), (3, 64), (7, 100)])
def test_planes_packed_from_codes_equal_the_planes_packed(bits, rows, k):
    codes = torch.randint(0, 2**bits, (rows, k))
    packed = pack_code_planes(codes, bits)
    assert torch.equal(packed, pack_planes(bit_planes(codes_to_bipolar(codes, bits), bits)))
    assert torch.equal(unpack_code_planes(packed, k), codes.to(torch.int32))
