"""The Triton dot-loop probe (what ``hf-plugins bench hw`` times on a GPU) against its reference."""

import pytest
import torch

from hf_plugins.kernels.dot_loop import dot_loop_reference, dot_loop_triton
from hf_plugins.kernels.dot_loop import triton as dot_loop_module
from tests.kernels.poison import poisoned_output

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(dot_loop_module, "_new_output", poisoned_output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=["fp32", "fp16", "int8"])
@pytest.mark.parametrize(("programs", "bm", "bn", "bk", "iters"), [(3, 16, 64, 32, 5), (1, 32, 16, 16, 1)],
                         ids=["3x16x64x32-5iters", "1x32x16x16-1iter"])
def test_every_program_sums_its_tile_product_iters_times(dtype, programs, bm, bn, bk, iters):
    gen = torch.Generator().manual_seed(programs * bm + iters)
    # Small integers: every product and sum is exact in each dtype, so the comparison is exact.
    a = torch.randint(-3, 4, (programs, bm, bk), generator=gen).to(dtype)
    b = torch.randint(-3, 4, (programs, bk, bn), generator=gen).to(dtype)
    out = dot_loop_triton(a, b, iters)
    expected = dot_loop_reference(a, b, iters)
    assert out.dtype == expected.dtype and torch.equal(out, expected)


def test_bad_tiles_are_refused_with_the_constraint():
    with pytest.raises(ValueError, match="tile sides must be powers of two >= 16, got bm=24"):
        dot_loop_triton(torch.ones(1, 24, 16), torch.ones(1, 16, 16), 1)
    with pytest.raises(ValueError, match=r"a must be \[programs, bm, bk\]"):
        dot_loop_triton(torch.ones(1, 16, 16), torch.ones(2, 16, 16), 1)
    with pytest.raises(TypeError, match="a and b must share a dtype"):
        dot_loop_triton(torch.ones(1, 16, 16), torch.ones(1, 16, 16, dtype=torch.float16), 1)
