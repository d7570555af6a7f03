"""Bit-plane Triton kernels vs torch fp16 ``F.linear`` and int8 ``torch._int_mm`` on one GPU (H100 / H200).

For each square weight (K = N) and batch M, every bipolar config (``wXaY``; a16 = weight-only fp16 activations)
is first checked against the fp64 reference at that M (a failed check reports no speed-up), then timed with
``triton.testing.do_bench`` (median; activation quantization included for AxW). Weight copies rotate so each call
streams its weights from HBM, not L2; the baselines rotate the same way. Weight-only W<=4 also times AWQ's int4
kernel on the same weights (``awq-int4``), the route ``BipolarIntLinear`` takes for them today: the faster of the
two should serve. Prints a table and the issue's targets; writes JSON to ``$OUT`` if set, else
``benchmarks/results/``.

    python benchmarks/gpu/bitplane_gemm.py                                # GPU, ~3-5 min with autotuning
    TRITON_INTERPRET=1 python benchmarks/gpu/bitplane_gemm.py --dry-run   # CPU: tiny shapes, checks and table

Targets (issue): W2A16 >= 4x fp16 and W3A16 >= 3x at M <= 16; W2A2 and W1A2 >= 1.5x fp16 and >= 1.2x int8 at the
largest M.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_plugins.kernels.awq_gemm import awq_gemm  # noqa: E402
from hf_plugins.kernels.bitplane_gemm import bipolar_linear_reference, pack_for_triton  # noqa: E402
from hf_plugins.kernels.bitplane_gemm.cpu import nibble_chunks  # noqa: E402
from hf_plugins.kernels.bitplane_gemm.triton import bipolar_linear_triton  # noqa: E402
from hf_plugins.quantizers.bipolar.weights import quantize_weight_bipolar  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_timing import benchmark_parser, cycled, finish, ratio_text, rotating, timer_for  # noqa: E402

CONFIGS = ("w2a16", "w3a16", "w4a16", "w8a16", "w1a2", "w2a2", "w4a4", "w8a8")
SIZES, BATCHES = (4096, 8192), (1, 16, 128, 1024, 4096)
DRY_SIZES, DRY_BATCHES = (256,), (1, 16, 33)
GROUP = 128


def parse_config(text: str) -> tuple[int, int | None]:
    match = re.fullmatch(r"w([1-8])a([1-8]|16)", text)
    if match is None:
        raise ValueError(f"configs look like w2a16 or w2a2, got {text!r}.")
    return int(match[1]), None if match[2] == "16" else int(match[2])


def bench_size(size: int, batches, configs, device: str, dry_run: bool) -> list[dict]:
    timer = timer_for(dry_run)
    generator = torch.Generator().manual_seed(size)
    weight = torch.randn(size, size, generator=generator) * 0.02
    fp16 = rotating(lambda: weight.half().to(device), size * size * 2, dry_run)
    int8 = rotating(lambda: torch.randint(-127, 128, (size, size), dtype=torch.int8, device=device),
                     size * size, dry_run)
    quantized = {}
    for config in configs:
        w_bits, a_bits = parse_config(config)
        planes, scales, offsets = quantize_weight_bipolar(weight, w_bits, GROUP)
        words = pack_for_triton(planes).to(device)
        copies = rotating(lambda: (words.clone(), scales.to(device), offsets.to(device)), words.numel() * 4,
                           dry_run)
        awq = nibble_chunks(planes, scales, offsets, size)[0] if a_bits is None and w_bits <= 4 else None
        awq_copies = None if awq is None else rotating(lambda: tuple(t.to(device) for t in awq),
                                                        awq[0].numel() * 4, dry_run)
        quantized[config] = (planes, scales, offsets, copies, awq_copies)
    rows = []
    for M in batches:
        x = torch.randn(M, size, generator=generator).half().to(device)
        x8 = torch.randint(-127, 128, (M, size), dtype=torch.int8, device=device)
        fp16_ms = timer(cycled(lambda w: F.linear(x, w), fp16))
        # cuBLASLt's int8 GEMM needs M > 16; smaller batches report none.
        int8_ms = timer(cycled(lambda w: torch._int_mm(x8, w.t()), int8)) if M > 16 else None
        for config in configs:
            w_bits, a_bits = parse_config(config)
            planes, scales, offsets, copies, awq_copies = quantized[config]
            routes = {"bitplane": cycled(lambda c, a=a_bits: bipolar_linear_triton(
                x, c[0], c[1], c[2], size, GROUP, a), copies)}
            if awq_copies is not None:
                routes["awq-int4"] = cycled(lambda c: awq_gemm(x, *c, GROUP, backend="triton"), awq_copies)
            expected = bipolar_linear_reference(x.double(), planes.to(device), scales.to(device),
                                                offsets.to(device), size, GROUP, a_bits)
            for route, call in routes.items():
                error = max_rel_error(call().float(), expected)
                checked = error <= FLOAT_KERNEL_RTOL[torch.float16]
                ms = timer(call) if checked else None
                rows.append({"size": size, "M": M, "config": config, "route": route, "rel_error": error,
                             "checked": checked, "ms": ms, "fp16_ms": fp16_ms, "int8_ms": int8_ms,
                             "vs_fp16": None if ms is None else fp16_ms / ms,
                             "vs_int8": None if ms is None or int8_ms is None else int8_ms / ms})
                print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    status = "" if row["checked"] else f"  CHECK FAILED (rel error {row['rel_error']:.2e})"
    ms = "-" if row["ms"] is None else f"{row['ms']:.4f}"
    return (f"{row['size']:>5}  M={row['M']:<5} {row['config']:<6} {row['route']:<9} {ms:>9} ms  "
            f"vs fp16 {ratio_text(row['vs_fp16'])}  vs int8 {ratio_text(row['vs_int8'])}{status}")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, from the best route per (size, M, config)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["size"], row["M"], row["config"])
        if row["ms"] is not None and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    lines = []
    for (size, M, config), row in sorted(best.items()):
        goal = None
        if M <= 16 and config in ("w2a16", "w3a16"):
            goal = (4.0 if config == "w2a16" else 3.0, None)
        elif M == max(r["M"] for r in rows) and config in ("w2a2", "w1a2"):
            goal = (1.5, 1.2)
        if goal is None:
            continue
        fp16_ok = row["vs_fp16"] >= goal[0]
        int8_ok = goal[1] is None or (row["vs_int8"] is not None and row["vs_int8"] >= goal[1])
        lines.append(f"{config} {size} M={M} ({row['route']}): {row['vs_fp16']:.2f}x fp16 (target {goal[0]}x)"
                     + ("" if goal[1] is None else f", {row['vs_int8'] or 0:.2f}x int8 (target {goal[1]}x)")
                     + f": {'ok' if fp16_ok and int8_ok else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = parser.parse_args(argv)
    for config in args.configs:
        parse_config(config)
    device = "cpu" if args.dry_run else "cuda"
    sizes = args.sizes or (DRY_SIZES if args.dry_run else SIZES)
    batches = args.batches or (DRY_BATCHES if args.dry_run else BATCHES)
    rows = [row for size in sizes for row in bench_size(size, batches, args.configs, device, args.dry_run)]
    summary = targets(rows)
    return finish("bitplane_gemm", rows, summary, args, all(row["checked"] for row in rows))


if __name__ == "__main__":
    raise SystemExit(main())
