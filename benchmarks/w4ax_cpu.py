"""W4Ax linears on CPU vs fp32 ``F.linear`` at real layer shapes, M = 1, 64 and 512, after a correctness check.

    python benchmarks/w4ax_cpu.py [--threads 1] [--rows 1 64 512] [--routes int8 fp32] [--outlier-blocks 1]

Each layer (group 128, ``--outlier-blocks`` 8-bit activation blocks, the rest 4-bit, a random channel order) runs
the CPU path of ``hf_plugins.kernels.w4ax_gemm.cpu`` on both routes: ``int8`` (one ``torch._int_mm`` per
128-channel scale step) and ``fp32`` (dequantized activations times a cached fp32 weight). Activation
quantization is included in the time. Every layer is first checked against the integer-exact reference on its
first 16 rows (rows are independent). Reports time ratios (fp32 / W4Ax, > 1 is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._timing import machine_name, pinned_threads, time_fn  # noqa: E402
from hf_plugins.kernels.w4ax_gemm.cpu import cpu_route, prepack_cpu, w4ax_linear_cpu  # noqa: E402
from hf_plugins.kernels.w4ax_gemm.reference import (  # noqa: E402
    BLOCK,
    pack_int4,
    quantize_weight,
    w4ax_linear_reference,
)
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402

# (model, role, in_features, out_features): the distinct linear shapes of three packaged models.
SHAPES = [
    ("smollm2-135m", "q,o", 576, 576),
    ("smollm2-135m", "gate,up", 576, 1536),
    ("smollm2-135m", "down", 1536, 576),
    ("qwen2.5-coder-0.5b", "q,o", 896, 896),
    ("qwen2.5-coder-0.5b", "gate,up", 896, 4864),
    ("qwen2.5-coder-0.5b", "down", 4864, 896),
    ("qwen2.5-coder-1.5b", "q,o", 1536, 1536),
    ("qwen2.5-coder-1.5b", "gate,up", 1536, 8960),
    ("qwen2.5-coder-1.5b", "down", 8960, 1536),
]
GROUP = 128
CHECK_ROWS = 16


def run(route: str, rows: int, shape, outlier_blocks: int) -> dict:
    model, role, in_features, out_features = shape
    gen = torch.Generator().manual_seed(in_features * out_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    perm = torch.randperm(in_features, generator=gen)
    a8 = min(outlier_blocks * BLOCK, in_features)
    codes, scales = quantize_weight(weight[:, perm], GROUP)
    packed = prepack_cpu(pack_int4(codes), scales, in_features, GROUP, route=route)
    x = torch.randn(rows, in_features, generator=gen)
    with torch.inference_mode():
        head = x[:CHECK_ROWS]
        error = max_rel_error(w4ax_linear_cpu(head, perm, a8, packed),
                              w4ax_linear_reference(head, perm, a8, codes, scales, GROUP))
        row = {"model": model, "layer": role, "in": in_features, "out": out_features, "route": route, "rows": rows,
               "a8_channels": a8, "rel_error": error, "checked": error <= FLOAT_KERNEL_RTOL[torch.float32],
               "weight_bytes_vs_fp32": packed.weight.numel() * packed.weight.element_size() / (4 * weight.numel())}
        if not row["checked"]:
            return row
        baseline = time_fn(lambda: F.linear(x, weight))
        timed = time_fn(lambda: w4ax_linear_cpu(x, perm, a8, packed))
    row.update(fp32_ms=baseline.median_ms, w4ax_ms=timed.median_ms, speedup=baseline.median_ms / timed.median_ms,
               other_cores_busy=timed.other_cores_busy)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--routes", nargs="+", default=["int8", "fp32"], choices=["int8", "fp32"])
    parser.add_argument("--outlier-blocks", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with pinned_threads(args.threads):
        for route in args.routes:
            for m in args.rows:
                for shape in SHAPES:
                    row = run(route, m, shape, args.outlier_blocks)
                    rows.append(row)
                    speed = f"{row['speedup']:.2f}x" if "speedup" in row else "CHECK FAILED"
                    print(f"{route:<5} M={m:<4} {row['model']:<19} {row['layer']:<8} {row['in']:>5}x{row['out']:<5} "
                          f"{speed:>8}", flush=True)
    name = f"w4ax_cpu-{datetime.date.today()}-{machine_name()}.json"
    out = args.out or REPO_ROOT / "benchmarks" / "results" / name
    out.write_text(json.dumps({"date": str(datetime.date.today()), "machine": machine_name(), "threads": args.threads,
                               "torch": torch.__version__, "default_route": cpu_route(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
