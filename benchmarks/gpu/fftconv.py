"""Long causal convolution: the Triton Monarch-FFT kernel vs the torch.fft convolution, on one GPU (H100 / H200).

Shapes are FlashFFTConv's benchmark (batch 64, hidden 768, u ``[B, H, N]``, a filter ``k [H, N]``) for N = 256 ..
65536 in fp16 and bf16, forward and forward+backward. Routes, each against its baseline:

- ``triton``: :func:`fft_conv_triton` (one fused kernel per row: Monarch FFT, filter product, inverse), against
  ``torch.fft``: ``irfft(rfft(u, n_fft) * rfft(k, n_fft), n_fft)[..., :N]`` at ``n_fft = 2 * next_pow2(N)`` in
  fp32 (torch has no bf16 FFT), the filter's spectrum computed per call, as in Hyena;
- ``triton+gates``: the Hyena-gated ``x0 * conv(x1 * u, k)`` with the gates in the kernel (bf16 only; gradients of
  the gates too), against ``torch.fft+gates``, the same torch.fft convolution with the gates multiplied in torch.

Each route is first checked against a float64 convolution on the first two batch rows (forward, and the gradients
of u and k of a two-row problem for forward+backward; a failed check reports no speed-up), then timed with
``do_bench`` medians; inputs rotate so each call reads HBM, not L2. Prints a table; writes JSON to ``$OUT`` if
set, else ``benchmarks/results/``.

    python benchmarks/gpu/fftconv.py                                # GPU, several minutes
    TRITON_INTERPRET=1 python benchmarks/gpu/fftconv.py --dry-run   # CPU: tiny shapes, checks and table

Target (FlashFFTConv's README reports 5.4-7.9x over PyTorch at these shapes): forward >= 4x torch.fft at N = 1k-8k.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hf_plugins.kernels.fftconv.reference import fft_conv_spectral_reference, sparse_fft_size  # noqa: E402
from hf_plugins.kernels.fftconv.triton import fft_conv_triton  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_timing import benchmark_parser, cycled, finish, ratio_text, rotating, timer_for  # noqa: E402

BATCH, HIDDEN = 64, 768
LENGTHS = [256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
DRY = (2, 4, [100, 3000])  # batch, hidden, lengths under the interpreter (both paths)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
TARGET = 4.0


def torch_fft_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The usual torch.fft convolution (Hyena / H3), fp32 FFTs, result in u's dtype."""
    seq = u.shape[-1]
    n_fft = sparse_fft_size(seq)
    k_f = torch.fft.rfft(k.float(), n=n_fft)
    return torch.fft.irfft(torch.fft.rfft(u.float(), n=n_fft) * k_f, n=n_fft)[..., :seq].to(u.dtype)


def torch_gated(u: torch.Tensor, k: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x0 * torch_fft_conv(x1 * u, k)


def triton_gated(u: torch.Tensor, k: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return fft_conv_triton(u, k, pre_gate=x1, post_gate=x0)


def reference_gated(u: torch.Tensor, k: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x0 * fft_conv_spectral_reference(x1 * u, k)


ROUTES = {"triton": (fft_conv_triton, "torch.fft"), "torch.fft": (torch_fft_conv, "torch.fft"),
          "triton+gates": (triton_gated, "torch.fft+gates"), "torch.fft+gates": (torch_gated, "torch.fft+gates")}
"""name -> (fn(u, k, *gates), the baseline its ratio is against)."""
GATED_DTYPES = ("bf16",)


def _inputs(batch: int, hidden: int, seq: int, dtype: torch.dtype, device: str, generator: torch.Generator):
    u = torch.randn(batch, hidden, seq, generator=generator).to(device, dtype)
    decay = torch.exp(-torch.arange(seq) / (seq / 4))
    k = (torch.randn(hidden, seq, generator=generator) * decay / seq ** 0.5).to(device)
    return u, k


def _check(route, inputs: tuple[torch.Tensor, ...], dy: torch.Tensor, mode: str) -> float:
    """Max relative error of the route vs float64 on two batch rows (forward, or every gradient too); ``inputs``:
    ``(u, k)`` or ``(u, k, x0, x1)``."""
    inputs = tuple(t[:2] if t.dim() == 3 else t for t in inputs)
    reference = fft_conv_spectral_reference if len(inputs) == 2 else reference_gated
    if mode == "fwd":
        with torch.no_grad():
            return max_rel_error(route(*inputs), reference(*(t.double() for t in inputs)))
    results = []
    for fn, cast in ((route, lambda t: t), (reference, lambda t: t.double())):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        y = fn(*leaves)
        results.append((y.detach(), *torch.autograd.grad(y, leaves, dy[:2].to(y.dtype))))
    return max(max_rel_error(actual, expected) for actual, expected in zip(*results))


def _timed(route, mode: str):
    if mode == "fwd":
        def call(inputs):
            with torch.no_grad():
                return route(*inputs[:-1])
        return call

    def call_backward(inputs):
        *leaves, dy = inputs
        return torch.autograd.grad(route(*leaves), leaves, dy)
    return call_backward


def bench_size(batch: int, hidden: int, seq: int, dtype_name: str, device: str, dry_run: bool) -> list[dict]:
    dtype = DTYPES[dtype_name]
    timer = timer_for(dry_run)
    generator = torch.Generator().manual_seed(seq)
    rows = []
    try:
        copies = rotating(lambda: _inputs(batch, hidden, seq, dtype, device, generator), batch * hidden * seq * 2,
                          dry_run)
        dy = torch.randn(batch, hidden, seq, generator=generator).to(device, dtype)
        gates = [torch.randn(batch, hidden, seq, generator=generator).to(device, dtype) for _ in range(2)]
        routes = {name: route for name, route in ROUTES.items() if "gates" not in name or dtype_name in GATED_DTYPES}
        for mode in MODES:
            timings = {}
            for name, (route, baseline) in routes.items():
                grad = mode != "fwd"
                inputs = [(u.requires_grad_(grad), k.requires_grad_(grad),
                           *([g.requires_grad_(grad) for g in gates] if "gates" in name else []), dy)
                          for u, k in copies]
                error, ms, oom = float("nan"), None, False
                try:
                    error = _check(route, tuple(t.detach() for t in inputs[0][:-1]), dy, mode)
                    checked = error <= FLOAT_KERNEL_RTOL[dtype]
                    ms = timer(cycled(_timed(route, mode), inputs)) if checked else None
                except torch.cuda.OutOfMemoryError:  # a route that does not fit is reported, not timed
                    checked, oom = True, True
                    torch.cuda.empty_cache()
                timings[name] = ms
                rows.append({"batch": batch, "hidden": hidden, "seq": seq, "dtype": dtype_name, "mode": mode,
                             "route": name, "baseline": baseline, "rel_error": error, "checked": checked, "ms": ms,
                             "oom": oom})
            for row in rows[-len(routes):]:
                base = timings[row["baseline"]]
                row["baseline_ms"] = base
                row["vs_baseline"] = None if row["ms"] is None or base is None else base / row["ms"]
                print(_format(row), flush=True)
    except torch.cuda.OutOfMemoryError:
        print(f"B={batch} H={hidden} N={seq} {dtype_name}: out of memory, skipped", flush=True)
        rows.append({"batch": batch, "hidden": hidden, "seq": seq, "dtype": dtype_name, "mode": "oom",
                     "route": None, "checked": True, "ms": None, "vs_baseline": None})
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _format(row: dict) -> str:
    status = "" if row["checked"] else f"  CHECK FAILED (rel error {row['rel_error']:.2e})"
    status += "  OUT OF MEMORY" if row.get("oom") else ""
    ms = "-" if row["ms"] is None else f"{row['ms']:.4f}"
    return (f"B={row['batch']:<3} H={row['hidden']:<4} N={row['seq']:<6} {row['dtype']} {row['mode']:<8} "
            f"{row['route']:<15} {ms:>9} ms  vs {row['baseline']:<15} {ratio_text(row['vs_baseline'])}  "
            f"(rel error {row['rel_error']:.1e}){status}")


def targets(rows: list[dict]) -> list[str]:
    return [f"N={row['seq']} {row['dtype']} fwd: {row['route']} {row['vs_baseline']:.2f}x {row['baseline']} (target "
            f">= {TARGET}x): {'ok' if row['vs_baseline'] >= TARGET else 'MISSED'}"
            for row in rows if row["route"].startswith("triton") and row["mode"] == "fwd"
            and 1024 <= row["seq"] <= 8192 and row["vs_baseline"] is not None]


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="*", default=None, help="sequence lengths (default: all)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    batch, hidden, lengths = DRY if args.dry_run else (BATCH, HIDDEN, LENGTHS)
    lengths = args.lengths or lengths
    rows = [row for seq in lengths for dtype_name in DTYPES
            for row in bench_size(batch, hidden, seq, dtype_name, device, args.dry_run)]
    summary = targets(rows)
    return finish("fftconv", rows, summary, args, all(row["checked"] for row in rows))


if __name__ == "__main__":
    raise SystemExit(main())
