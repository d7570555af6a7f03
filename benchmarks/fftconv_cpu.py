"""Long causal convolution on CPU: ours vs a plain torch.fft convolution vs direct ``F.conv1d``, after a check.

    python benchmarks/fftconv_cpu.py [--threads 1] [--lengths 1024 4096 16384 65536] [--batch 1]
                                     [--channels 64] [--kernel-len N] [--keep-frequencies F]
                                     [--conv1d-max-len 16384] [--no-save | --out PATH]

For each length N, fp32 ``u [batch, channels, N]`` and a filter ``k [channels, N]`` (all taps, unless
``--kernel-len``). First :func:`hf_plugins.kernels.fftconv.cpu.fft_conv_cpu` is checked against the float64
spectral oracle (equal to the direct sum; the direct float64 sum itself is O(N^2)), forward and the gradients of
u and k; no timing is reported for a length whose check failed. Then the median time of

- ``ours``: ``fft_conv_cpu`` in ``no_grad`` with the filter spectrum cached across calls (a frozen filter, as in
  eval), and forward + backward (training: the spectrum is recomputed and differentiated every call);
- ``torch_fft``: the usual PyTorch FFT convolution, ``irfft(rfft(u, n=2N) * rfft(k, n=2N), n=2N)[..., :N]``
  (no cache, FFT size 2N as in the Hyena/M2 code), forward and forward + backward;
- ``conv1d``: depthwise ``F.conv1d`` of the left-padded u with the flipped filter (up to ``--conv1d-max-len``;
  it is O(N^2)).

Ratios are baseline time / ours (> 1: ours is faster). With ``--keep-frequencies`` ours runs the
frequency-sparse convolution (checked against its own oracle); the baselines stay dense.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._timing import add_ratios, fwd_and_fwd_bwd, sweep_and_save, sweep_parser  # noqa: E402
from hf_plugins.kernels.fftconv.cpu import KernelSpectrumCache, fft_conv_cpu  # noqa: E402
from hf_plugins.kernels.fftconv.reference import fft_conv_spectral_reference  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402


def make_inputs(batch: int, channels: int, seq: int) -> dict[str, torch.Tensor]:
    """fp32 ``u`` and the upstream gradient ``dy`` ``[batch, channels, seq]``, and a decaying filter
    ``k [channels, seq]``."""
    gen = torch.Generator().manual_seed(seq)
    decay = torch.exp(-torch.arange(seq) / (seq / 4))
    return {"u": torch.randn(batch, channels, seq, generator=gen),
            "k": torch.randn(channels, seq, generator=gen) * (0.1 + decay),
            "dy": torch.randn(batch, channels, seq, generator=gen)}


def torch_fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch FFT convolution (FFT size 2N, no cached spectrum)."""
    n_fft = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n_fft) * torch.fft.rfft(k, n=n_fft), n=n_fft)[..., :u.shape[-1]]


def conv1d_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Depthwise ``F.conv1d`` (a cross-correlation) with the flipped filter over the left-padded input."""
    return F.conv1d(F.pad(u, (k.shape[1] - 1, 0)), k.flip(-1)[:, None, :], groups=u.shape[1])


def gradients(forward, u: torch.Tensor, k: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    """``d sum(forward(u, k) * dy) / d (u, k)``."""
    u, k = u.detach().requires_grad_(), k.detach().requires_grad_()
    (forward(u, k).double() * dy.double()).sum().backward()
    return [u.grad, k.grad]


def check(ours, inputs: dict[str, torch.Tensor], kernel_len: int, keep: float | None) -> float:
    """Max relative error of ours (forward, du, dk) against the float64 spectral oracle."""
    def oracle(u, k):
        return fft_conv_spectral_reference(u, k, kernel_len, keep)

    u, k, dy = inputs["u"], inputs["k"], inputs["dy"]
    with torch.no_grad():
        errors = [max_rel_error(ours(u, k), oracle(u.double(), k.double()))]
    for got, expected in zip(gradients(ours, u, k, dy), gradients(oracle, u.double(), k.double(), dy)):
        errors.append(max_rel_error(got, expected))
    return max(errors)


def timed(forward, inputs: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Forward (no grad) and forward + backward timings of ``forward(u, k) -> y``."""
    u, k, dy = inputs["u"], inputs["k"], inputs["dy"]

    def forward_only():
        with torch.no_grad():
            forward(u, k)

    return fwd_and_fwd_bwd(forward_only, lambda: gradients(forward, u, k, dy))


def run(seq: int, args: argparse.Namespace) -> dict:
    inputs = make_inputs(args.batch, args.channels, seq)
    kernel_len = min(args.kernel_len or seq, seq)
    cache = KernelSpectrumCache()

    def ours(u, k):
        return fft_conv_cpu(u, k, kernel_len, args.keep_frequencies, cache)

    error = check(ours, inputs, kernel_len, args.keep_frequencies)
    row = {"N": seq, "kernel_len": kernel_len, "rel_error": error, "checked": error <= FLOAT_KERNEL_RTOL[torch.float32]}
    if not row["checked"]:
        return row
    row["ours"] = timed(ours, inputs)
    baseline_inputs = {**inputs, "k": inputs["k"][:, :kernel_len]}
    row["torch_fft"] = timed(torch_fft_conv, baseline_inputs)
    if seq <= args.conv1d_max_len:
        row["conv1d"] = timed(conv1d_conv, baseline_inputs)
    add_ratios(row, "ours", ('torch_fft', 'conv1d'))
    return row


def main() -> None:
    parser = sweep_parser(__doc__, [1024, 4096, 16384, 65536])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--kernel-len", type=int, default=None, help="taps used (default: all N)")
    parser.add_argument("--keep-frequencies", type=float, default=None)
    parser.add_argument("--conv1d-max-len", type=int, default=16384)
    sweep_and_save("fftconv_cpu", parser.parse_args(), run, "N", "ours", ("torch_fft", "conv1d"),
                   ("channels", "kernel_len", "keep_frequencies"), REPO_ROOT / "benchmarks" / "results")


if __name__ == "__main__":
    main()
