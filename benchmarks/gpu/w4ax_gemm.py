"""W4Ax Triton kernels vs torch fp16 / bf16 ``F.linear`` on one GPU (H100 / H200).

For each weight shape ``K x N`` and batch M, every activation mix (``a4``: all blocks 4-bit, ``a4+o1``: FMPQ's
typical one 8-bit outlier block of 128 channels per 4096, ``a8``: all 8-bit) is first checked against the
reference at that M (a failed check reports no speed-up), then timed with ``triton.testing.do_bench`` (median;
the fused activation pass included). Weight copies rotate so each call streams its weights from HBM, not L2;
the baselines rotate the same way. Prints a table and the issue's targets; writes JSON to ``$OUT`` if set, else
``benchmarks/results/``.

    python benchmarks/gpu/w4ax_gemm.py                                # GPU, a few minutes
    TRITON_INTERPRET=1 python benchmarks/gpu/w4ax_gemm.py --dry-run   # CPU: tiny shapes, checks and table

Targets (issue): >= 1.6x bf16 at M >= 512 and >= 1.3x at M = 2..8, on 4096x4096 and 4096x14336.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_plugins.kernels.w4ax_gemm.reference import (  # noqa: E402
    BLOCK,
    dequantize_activations,
    dequantize_weight,
    pack_int4,
    quantize_activations,
    quantize_weight,
)
from hf_plugins.kernels.w4ax_gemm.triton import w4ax_linear_triton  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_timing import benchmark_parser, cycled, finish, ratio_text, rotating, timer_for  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336))  # (K, N)
BATCHES = (1, 2, 4, 8, 16, 64, 512, 2048, 8192)
DRY_SHAPES, DRY_BATCHES = ((256, 192),), (1, 8, 33)
MIXES = {"a4": 0.0, "a4+o1": 1 / 32, "a8": 1.0}  # fraction of the input channels in 8-bit blocks
GROUP = 128


def dequantized_product(x: torch.Tensor, perm: torch.Tensor, a8: int, w_hat: torch.Tensor) -> torch.Tensor:
    """The reference's value in float64 on ``x``'s device: quantized activations (the reference quantizer) times
    the dequantized weight ``w_hat [N, K]``; an int64 product would take hours at these shapes."""
    codes, scales = quantize_activations(x.float()[:, perm], a8)
    return dequantize_activations(codes, scales.double()) @ w_hat.t()


def bench_shape(K: int, N: int, batches, device: str, dry_run: bool) -> list[dict]:
    timer = timer_for(dry_run)
    generator = torch.Generator().manual_seed(K + N)
    weight = torch.randn(N, K, generator=generator) * 0.02
    perm = torch.randperm(K, generator=generator)
    codes, scales = quantize_weight(weight[:, perm], GROUP)
    packed, scales_t = pack_int4(codes).t().contiguous(), scales.t().contiguous()
    copies = rotating(lambda: (packed.to(device), scales_t.to(device)), packed.numel(), dry_run)
    half = {dtype: rotating(lambda d=dtype: weight.to(device=device, dtype=d), N * K * 2, dry_run)
            for dtype in (torch.float16, torch.bfloat16)}
    perm_device = perm.to(device)
    w_hat = dequantize_weight(codes, scales.double(), GROUP).to(device)
    rows = []
    for M in batches:
        x = torch.randn(M, K, generator=generator).half().to(device)
        baseline = {str(d).removeprefix("torch."): timer(cycled(lambda w, d=d: F.linear(x.to(d), w), half[d]))
                    for d in half}
        for mix, fraction in MIXES.items():
            a8 = min(K, round(K * fraction / BLOCK) * BLOCK) if fraction < 1 else K
            call = cycled(lambda c, a=a8: w4ax_linear_triton(x, perm_device, a, c[0], c[1], GROUP), copies)
            error = max_rel_error(call(), dequantized_product(x, perm_device, a8, w_hat))
            checked = error <= FLOAT_KERNEL_RTOL[torch.float16]
            ms = timer(call) if checked else None
            rows.append({"K": K, "N": N, "M": M, "mix": mix, "a8_channels": a8, "rel_error": error,
                         "checked": checked, "ms": ms, "fp16_ms": baseline["float16"],
                         "bf16_ms": baseline["bfloat16"],
                         "vs_fp16": None if ms is None else baseline["float16"] / ms,
                         "vs_bf16": None if ms is None else baseline["bfloat16"] / ms})
            print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    status = "" if row["checked"] else f"  CHECK FAILED (rel error {row['rel_error']:.2e})"
    ms = "-" if row["ms"] is None else f"{row['ms']:.4f}"
    return (f"{row['K']:>5}x{row['N']:<6} M={row['M']:<5} {row['mix']:<6} {ms:>9} ms  vs fp16 "
            f"{ratio_text(row['vs_fp16'])}  vs bf16 {ratio_text(row['vs_bf16'])}{status}")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets for FMPQ's typical mix (one outlier block per 4096 channels)."""
    lines = []
    for row in rows:
        if row["mix"] != "a4+o1" or row["ms"] is None:
            continue
        goal = 1.6 if row["M"] >= 512 else 1.3 if 2 <= row["M"] <= 8 else None
        if goal is not None:
            lines.append(f"{row['K']}x{row['N']} M={row['M']}: {row['vs_bf16']:.2f}x bf16 (target {goal}x): "
                         f"{'ok' if row['vs_bf16'] >= goal else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    batches = args.batches or (DRY_BATCHES if args.dry_run else BATCHES)
    rows = [row for K, N in shapes for row in bench_shape(K, N, batches, device, args.dry_run)]
    summary = targets(rows)
    return finish("w4ax_gemm", rows, summary, args, all(row["checked"] for row in rows))


if __name__ == "__main__":
    raise SystemExit(main())
