"""AWQ int4 CPU GEMM vs fp32 ``F.linear`` at the real layer shapes of SmolLM2-135M and Qwen2.5-Coder-1.5B.

For every distinct layer shape, after a correctness check of every CPU route against the float64 reference,
times fp32 ``F.linear`` (the baseline, same process) and each route of :func:`hf_plugins.kernels.awq_gemm.awq_gemm_cpu`
(the native q4dot kernel, torch's int4pack kernel, dequant + sgemm from each codes layout), and reports the fastest
route this machine offers for that many rows (what the route chooser measures on first use). Ratios are baseline
time / kernel time (> 1 is faster than fp32). Also reports in-memory weight bytes vs bf16, and each time as a fraction of this
machine's roofline (``hf-plugins bench hw``, measured here at each thread count): the bytes a call must move
(weights as stored, activations in, outputs out) at the STREAM triad bandwidth, or its FLOPs at the fp32 / bf16
matmul peak, whichever takes longer, over the measured time.

    python benchmarks/awq_cpu_layers.py [--threads 1,2] [--rows 1,8,64] [--min-time 0.3]

ATen's CPU capability decides the int4pack kernel's speed and layout, ``-march`` the q4dot build; to measure an
AVX2-only CPU on an AVX512 one, run with ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
HF_PLUGINS_NATIVE_MARCH=haswell`` (the machine tag in the file name says so).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._timing import machine_name, pinned_threads, time_fn, write_report  # noqa: E402
from hf_plugins.kernels.awq_gemm import awq_dequantize, awq_gemm_reference, pack_awq, prepack  # noqa: E402
from hf_plugins.hardware import Roofline, measure_cpu  # noqa: E402
from hf_plugins.kernels.awq_gemm import cpu as awq_cpu  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402

GROUP_SIZE = 128

# (roles, in_features, out_features) per distinct nn.Linear shape of one decoder block.
MODELS = {
    "smollm2-135m": [
        ("q,o", 576, 576),
        ("k,v", 576, 192),
        ("gate,up", 576, 1536),
        ("down", 1536, 576),
    ],
    "qwen2.5-coder-1.5b": [
        ("q,o", 1536, 1536),
        ("k,v", 1536, 256),
        ("gate,up", 1536, 8960),
        ("down", 8960, 1536),
    ],
}

KERNELS = {"q4dot": ("q4dot", "q4dot"), "int4pack": ("int4pack", "int4pack"), "dequant": ("dequant", "int4pack"),
           "dequant-q4dot": ("dequant", "q4dot")}
"""Timed kernels as ``(route, codes layout)``."""
# Tolerance keys: int4pack computes with bf16 activations, q4dot with two int8 levels, dequant in fp32.
KERNEL_TOLERANCE = {"q4dot": "int8x2", "int4pack": torch.bfloat16, "dequant": torch.float32,
                    "dequant-q4dot": torch.float32}
KERNEL_PEAK = {"q4dot": "int8", "int4pack": "bf16", "dequant": "fp32", "dequant-q4dot": "fp32"}
"""The matmul peak each kernel's FLOPs are measured against."""


def prepacked_layouts(tensors: tuple) -> dict[str, awq_cpu.CpuAwqWeight]:
    """The layer in each codes layout this machine builds (q4dot needs the native kernel)."""
    layouts = {"int4pack": prepack(*tensors, GROUP_SIZE, layout="int4pack")}
    if awq_cpu.q4dot_available():
        layouts["q4dot"] = prepack(*tensors, GROUP_SIZE, layout="q4dot")
    return layouts


def runnable(layouts: dict[str, awq_cpu.CpuAwqWeight], rows: int) -> dict[str, tuple]:
    """Kernel name -> ``(route, weight)`` for the kernels this machine runs for ``rows`` rows."""
    return {name: (route, layouts[layout]) for name, (route, layout) in KERNELS.items()
            if layout in layouts and route in awq_cpu.cpu_routes(rows, layouts[layout])}


def random_awq_layer(in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random AWQ tensors with realistic magnitudes: ``qweight [in, out // 8]``, ``qzeros``, fp16 ``scales``."""
    groups = -(-in_features // GROUP_SIZE)
    qweight = pack_awq(torch.randint(0, 16, (in_features, out_features), dtype=torch.int32))
    qzeros = pack_awq(torch.randint(6, 10, (groups, out_features), dtype=torch.int32))
    scales = (torch.rand(groups, out_features) * 0.004 + 0.001).half()
    return qweight, qzeros, scales


def check_kernels(x: torch.Tensor, tensors: tuple, layouts: dict[str, awq_cpu.CpuAwqWeight]) -> dict[str, float]:
    """Max relative error of each runnable kernel vs the float64 reference; raises if one exceeds its tolerance."""
    expected = awq_gemm_reference(x, *tensors, GROUP_SIZE)
    errors = {}
    for name, (route, weight) in runnable(layouts, x.shape[0]).items():
        errors[name] = max_rel_error(awq_cpu._by_route(route, x, weight), expected)
        if errors[name] > FLOAT_KERNEL_RTOL[KERNEL_TOLERANCE[name]]:
            raise AssertionError(f"{name} failed its correctness check: rel error {errors[name]:.2e}")
    return errors


def roofline_fractions(roofline: Roofline, rows: int, in_features: int, out_features: int,
                       weight_bytes: dict[str, int], timings: dict) -> dict[str, float]:
    """Each timed route's fraction of the roofline: fp32 ``F.linear`` reads fp32 weights, the int4 kernels their
    packed bytes; all read fp32 inputs and write fp32 outputs."""
    activation_bytes = 4 * rows * (in_features + out_features)
    flops = 2 * rows * in_features * out_features
    weights = {"fp32_linear": 4 * in_features * out_features, **weight_bytes}
    peaks = {"fp32_linear": "fp32", **KERNEL_PEAK}
    return {name: roofline.fraction(t.median_ms / 1e3, weights[name] + activation_bytes, flops, peaks[name])
            for name, t in timings.items()}


def bench_shape(in_features: int, out_features: int, rows_list: list[int], threads_list: list[int], min_time: float,
                rooflines: dict[int, Roofline]):
    """Time one layer shape; returns a list of result rows (one per threads x rows)."""
    tensors = random_awq_layer(in_features, out_features)
    layouts = prepacked_layouts(tensors)
    dense = awq_dequantize(*tensors, GROUP_SIZE).t().contiguous()
    errors = {}
    for rows in sorted({min(rows_list), max(rows_list)}):
        errors.update(check_kernels(torch.randn(rows, in_features), tensors, layouts))
    weight_bytes = {name: layouts[layout].nbytes() for name, (_, layout) in KERNELS.items() if layout in layouts}
    default_layout = "q4dot" if "q4dot" in layouts else "int4pack"
    results = []
    for threads in threads_list:
        with pinned_threads(threads):
            for rows in rows_list:
                x = torch.randn(rows, in_features)
                base = time_fn(lambda: F.linear(x, dense), min_time_s=min_time)
                kernels = runnable(layouts, rows)
                timings = {name: time_fn(lambda r=route, w=weight: awq_cpu._by_route(r, x, w), min_time_s=min_time)
                           for name, (route, weight) in kernels.items()}
                # What the route chooser picks among the routes of the layout prepack keeps on this machine.
                offered = [name for name, (_, layout) in KERNELS.items() if name in timings and layout == default_layout]
                chosen = min(offered, key=lambda name: timings[name].median_ms)
                fractions = roofline_fractions(rooflines[threads], rows, in_features, out_features, weight_bytes,
                                               {"fp32_linear": base, **timings})
                results.append({
                    "roofline_fraction": fractions,
                    "threads": threads,
                    "rows": rows,
                    "fp32_linear": base.as_dict(),
                    **{name: t.as_dict() for name, t in timings.items()},
                    "chosen": chosen,
                    "speedup_chosen": base.median_ms / timings[chosen].median_ms,
                    "speedup_chosen_min": base.min_ms / timings[chosen].min_ms,
                })
    return {"rel_error": errors, "weight_bytes": layouts[default_layout].nbytes(),
            "bf16_bytes": in_features * out_features * 2, "layout": default_layout, "timings": results}


def print_table(model: str, shapes: list[tuple], measured: dict) -> None:
    print(f"\n{model} (group {GROUP_SIZE}; ms are medians; x = fp32 time / kernel time; (min) = ratio of minima)")
    header = f"{'layer':8} {'in x out':>11} {'thr':>3} {'M':>3} {'fp32 ms':>8} " + \
             " ".join(f"{name:>15}" for name in KERNELS) + \
             f" {'chosen':>13} {'vs fp32':>7} {'(min)':>6} {'roofline':>8} {'load':>5} {'bytes/bf16':>10}"
    print(header)
    for roles, k, n in shapes:
        shape = measured[f"{k}x{n}"]
        for t in shape["timings"]:
            base = t["fp32_linear"]["median_ms"]
            cells = []
            for name in KERNELS:
                ms = t[name]["median_ms"] if name in t else float("nan")
                cells.append(f"{ms:7.3f} ({base / ms:4.2f}x)")
            print(f"{roles:8} {f'{k}x{n}':>11} {t['threads']:>3} {t['rows']:>3} {base:8.3f} "
                  + " ".join(f"{cell:>15}" for cell in cells)
                  + f" {t['chosen']:>13} {t['speedup_chosen']:6.2f}x {t['speedup_chosen_min']:5.2f}x "
                  f"{t['roofline_fraction'][t['chosen']]:8.0%} "
                  f"{t['fp32_linear']['other_cores_busy']:5.2f}"
                  f" {shape['weight_bytes'] / shape['bf16_bytes']:9.1%}")


def block_summary(shapes: list[tuple], measured: dict) -> list[dict]:
    """Per decoder block (7 linears: q, k, v, o, gate, up, down): summed fp32 vs chosen-kernel time."""
    summary = {}
    for roles, k, n in shapes:
        count = len(roles.split(","))
        for t in measured[f"{k}x{n}"]["timings"]:
            entry = summary.setdefault((t["threads"], t["rows"]), {"fp32_ms": 0.0, "awq_ms": 0.0})
            entry["fp32_ms"] += count * t["fp32_linear"]["median_ms"]
            entry["awq_ms"] += count * t[t["chosen"]]["median_ms"]
    return [{"threads": th, "rows": m, **v, "speedup": v["fp32_ms"] / v["awq_ms"]} for (th, m), v in summary.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (1 is the primary number)")
    parser.add_argument("--rows", default="1,8,64", help="comma-separated M = batch * seq")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per measurement")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    threads_list = [int(v) for v in args.threads.split(",")]
    rows_list = [int(v) for v in args.rows.split(",")]
    torch.manual_seed(0)
    report = {
        "benchmark": "awq_cpu_layers",
        "date": datetime.date.today().isoformat(),
        "machine": machine_name(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "int4pack_layout": list(awq_cpu.native_layout()),
        "native_march": os.environ.get("HF_PLUGINS_NATIVE_MARCH", "native"),
        "q4dot_built": awq_cpu.q4dot_available(),
        "group_size": GROUP_SIZE,
        "models": {},
    }
    rooflines = {}
    for threads in threads_list:
        with pinned_threads(threads):
            rooflines[threads] = measure_cpu()
    report["roofline"] = {threads: roofline.as_dict() for threads, roofline in rooflines.items()}
    for model in args.models.split(","):
        shapes = MODELS[model]
        measured = {f"{k}x{n}": bench_shape(k, n, rows_list, threads_list, args.min_time, rooflines)
                    for _, k, n in shapes}
        print_table(model, shapes, measured)
        summary = block_summary(shapes, measured)
        for s in summary:
            print(f"  block of 7 linears, {s['threads']} thread(s), M={s['rows']}: fp32 {s['fp32_ms']:.3f} ms, "
                  f"awq {s['awq_ms']:.3f} ms -> {s['speedup']:.2f}x")
        report["models"][model] = {"shapes": {roles: f"{k}x{n}" for roles, k, n in shapes}, "measured": measured,
                                   "block_summary": summary}
    write_report(report, args.out, "awq_cpu_layers", report["machine"])


if __name__ == "__main__":
    main()
