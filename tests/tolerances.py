"""The one tolerance table of the test suite, keyed by operation class and dtype.

- ``exact``: lossless integer work (packing, integer GEMMs): bit-identical.
- ``float_kernel``: a float fast path vs its reference: max relative error ``max|a-b| / max|b|``.
- ``sqnr_db``: lossy quantization: signal-to-quantization-noise floor in dB, per bit width.
"""

import torch

FLOAT_KERNEL_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    # activations as two int8 levels per 64-input block, the second rounding the first's remainder (q4dot on CPU)
    "int8x2": 1e-4,
}

# Group-wise asymmetric RTN on Gaussian weights gives ~6 dB per bit; floors leave margin for clipping search.
SQNR_FLOOR_DB = {2: 6.0, 3: 12.0, 4: 18.0, 5: 24.0, 6: 30.0, 7: 36.0, 8: 42.0}


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``approx`` against ``exact`` in dB."""
    exact = exact.double()
    noise = (approx.double() - exact).pow(2).mean().clamp_min(1e-30)
    return (10 * torch.log10(exact.pow(2).mean() / noise)).item()


def assert_close_kernel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Assert a float kernel result matches its reference within the table's tolerance for ``dtype``."""
    assert torch.isfinite(actual).all(), "kernel output has non-finite values (poisoned output not overwritten?)"
    err = max_rel_error(actual, expected)
    assert err <= FLOAT_KERNEL_RTOL[dtype], f"max rel error {err:.3e} > {FLOAT_KERNEL_RTOL[dtype]:.1e} for {dtype}"

# Significance level of the statistical tests that sampled outputs follow the target's distribution: a correct
# sampler fails one such test with this probability (the seeds are fixed, so a passing test stays passing).
SAMPLING_SIGNIFICANCE = 1e-3
