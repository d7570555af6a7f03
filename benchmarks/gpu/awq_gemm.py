"""AWQ W4A16 Triton kernels vs torch fp16 ``F.linear`` on one GPU (written for H100 / H200).

For each weight shape (K x N) and batch M: random packed AWQ weights (group 128), a correctness check of every
measured route against the fp64 reference (``reference.awq_dequantize`` + fp64 matmul; a failed check reports
no speed-up), then medians of ``triton.testing.do_bench`` (eager: includes host launch cost) and of
``do_bench_cudagraph`` (GPU time only, as under CUDA-graph decode) for our routes and the baseline. Weight
copies rotate so each call streams weights from HBM, not L2. Prints a table and writes JSON (card, date,
versions, autotuned configs) to ``$OUT`` if set, else ``benchmarks/results/``.

    python benchmarks/gpu/awq_gemm.py                                  # GPU, ~2-4 min including autotuning
    TRITON_INTERPRET=1 python benchmarks/gpu/awq_gemm.py --dry-run     # CPU: tiny shapes, checks, table, JSON

The dry run exercises everything except the GPU timers (its times are interpreter wall clock, meaningless as
speed) and writes its JSON only where ``$OUT`` or ``--out`` points.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
BATCHES = (1, 16, 64, 1024)
DRY_SHAPES = ((256, 136), (128, 64))
DRY_BATCHES = (1, 16, 33)
DECODE_TARGET = 2.5
"""Speed-up over fp16 F.linear the GEMV must reach at M <= 16 (ideal: 16 / 4.156 bits = 3.85x)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes under the Triton interpreter (CPU)")
    parser.add_argument("--shapes", default=None, help="comma-separated KxN, e.g. 4096x4096,4096x11008")
    parser.add_argument("--batches", default=None, help="comma-separated M values, e.g. 1,16,64,1024")
    parser.add_argument("--group-size", type=int, default=None, help="quantization group (default 128; dry: 64)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="activation and baseline dtype")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results/)")
    args = parser.parse_args(argv)
    args.shapes = _parse_shapes(args.shapes) if args.shapes else (DRY_SHAPES if args.dry_run else SHAPES)
    args.batches = _parse_ints(args.batches) if args.batches else (DRY_BATCHES if args.dry_run else BATCHES)
    args.group_size = args.group_size or (64 if args.dry_run else 128)
    for K, N in args.shapes:
        if N % 8 or K % args.group_size:
            parser.error(f"shape {K}x{N}: N must be a multiple of 8 and K of the group size {args.group_size}")
    return args


def _parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def routes_for(M: int, dispatched: str, dry_run: bool) -> list[str]:
    """The dispatched route plus the alternatives worth comparing at this M (all of them in a dry run)."""
    applicable = {"gemv": M <= 64, "gemm": True, "dequant": M >= 64}
    return [dispatched] + [r for r, ok in applicable.items() if (ok or dry_run) and r != dispatched]


def output_dir(args: argparse.Namespace) -> Path | None:
    """Where the JSON goes; a dry run writes only to an explicit place."""
    explicit = args.out or os.environ.get("OUT")
    if explicit:
        return Path(explicit)
    return None if args.dry_run else REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # The interpreter is chosen when the @triton.jit decorators run, so it must be set before the import below.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch
    import torch.nn.functional as F
    import triton

    from hf_plugins.kernels.awq_gemm import triton as awq_triton
    from hf_plugins.kernels.awq_gemm.reference import awq_dequantize
    from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run (and TRITON_INTERPRET=1) on a CPU machine", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    G = args.group_size
    torch.manual_seed(0)

    if args.dry_run:
        card, l2_bytes = f"cpu ({platform.processor() or platform.machine()}), Triton interpreter", 0
    else:
        props = torch.cuda.get_device_properties(0)
        card, l2_bytes = torch.cuda.get_device_name(), getattr(props, "L2_cache_size", 50 * 2**20)

    def timed(fn) -> tuple[float, float | None]:
        """Median ms of ``fn``: (eager do_bench, CUDA-graph do_bench); interpreter wall clock in a dry run."""
        if args.dry_run:
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
            return statistics.median(samples), None
        eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        if args.no_graph:
            return eager, None
        try:
            return eager, triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        except RuntimeError as exc:
            # A capture failure costs the graph column only, not the run.
            print(f"  (CUDA-graph timing failed: {exc})", flush=True)
            return eager, None

    def rotating(op, copies):
        """``op(copy)`` cycling through weight copies, so back-to-back calls (and graph replays) miss L2."""
        order = itertools.cycle(range(len(copies)))
        return lambda: op(copies[next(order)])

    def n_copies(bytes_per_copy: int) -> int:
        return 1 if args.dry_run else max(2, min(64, math.ceil(2 * l2_bytes / bytes_per_copy)))

    meta = {
        "benchmark": "awq_gemm",
        "card": card,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "group_size": G,
        "dry_run": args.dry_run,
        "l2_bytes": l2_bytes,
        "timers": "interpreter wall clock (not a speed)" if args.dry_run else
                  "triton.testing.do_bench median (eager) and do_bench_cudagraph median (graph)",
        "reference": "hf_plugins.kernels.awq_gemm.reference.awq_dequantize + fp64 matmul",
        "tolerance": FLOAT_KERNEL_RTOL[dtype],
        "results": [],
    }
    folder = output_dir(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = "-".join("".join(c if c.isalnum() else " " for c in card.split(",")[0]).lower().split())
    path = folder / f"awq_gemm-{slug}-{stamp}.json" if folder else None
    t_start = time.perf_counter()
    print(f"# {card} | torch {torch.__version__} | triton {triton.__version__} | {args.dtype} | group {G}"
          + (" | DRY RUN: interpreter wall clock, not speeds" if args.dry_run else ""), flush=True)

    rows = []
    for K, N in args.shapes:
        groups = K // G
        packed_bytes = K * N // 2 + groups * N // 2 + groups * N * 2
        n_q, n_w = n_copies(packed_bytes), n_copies(K * N * 2)
        # Random int32 words are uniformly random nibbles; this skips packing 45M codes on the host.
        layers = [(torch.randint(-2**31, 2**31, (K, N // 8), dtype=torch.int32, device=device),
                   torch.randint(-2**31, 2**31, (groups, N // 8), dtype=torch.int32, device=device),
                   (torch.rand(groups, N, device=device) * 0.02 + 0.001).to(torch.float16)) for _ in range(n_q)]
        w_ref = awq_dequantize(*(t.cpu() for t in layers[0]), G).double().to(device)
        # The baseline multiplies the same dequantized weights, laid out [N, K] as nn.Linear stores them.
        w_lin = w_ref.t().to(dtype).contiguous()
        baselines = [w_lin] + [w_lin.clone() for _ in range(n_w - 1)]
        print(f"\n## K x N = {K} x {N}: {n_q} packed copies, {n_w} {args.dtype} copies "
              f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
        for M in args.batches:
            x = torch.randn(M, K, device=device).to(dtype)
            y_ref = x.double() @ w_ref
            base_eager, base_graph = timed(rotating(lambda w: F.linear(x, w), baselines))
            dispatched = awq_triton.dispatch(M)
            for route in routes_for(M, dispatched, args.dry_run):
                config = awq_triton.AwqGemmConfig(kernel=route)
                row = {"K": K, "N": N, "M": M, "route": route, "dispatched": route == dispatched,
                       "baseline_ms": base_eager, "baseline_graph_ms": base_graph}
                t0 = time.perf_counter()
                try:
                    y = awq_triton.awq_gemm_triton(x, *layers[0], G, config=config)
                except Exception as exc:  # noqa: BLE001 - one failing route must not hide the others' numbers
                    y, row["error"] = None, f"{type(exc).__name__}: {exc}"[:2000]
                row["first_call_s"] = round(time.perf_counter() - t0, 2)
                row["max_rel_error"] = float("nan") if y is None else max_rel_error(y, y_ref)
                row["ok"] = y is not None and bool(torch.isfinite(y).all()) and \
                    row["max_rel_error"] <= FLOAT_KERNEL_RTOL[dtype]
                row["best_config"] = None if y is None else _best_config(awq_triton, route, args.dry_run)
                ok = row["ok"]
                if ok:
                    ours_eager, ours_graph = timed(
                        rotating(lambda layer: awq_triton.awq_gemm_triton(x, *layer, G, config=config), layers))
                    row.update(ours_ms=ours_eager, ours_graph_ms=ours_graph, speedup=base_eager / ours_eager,
                               speedup_graph=base_graph / ours_graph if ours_graph else None)
                rows.append(row)
                print(_format_row(row), flush=True)
        meta["results"] = rows
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        if path:
            # Written after every shape so a run cut short still leaves its numbers behind.
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(meta, indent=2))
        del layers, baselines, w_ref, w_lin

    print(_summary(rows, args.dry_run))
    print(f"\nelapsed {time.perf_counter() - t_start:.0f}s; " + (f"JSON: {path}" if path else
          "JSON not written (dry run: set OUT or --out to keep it)"))
    return 0 if all(r["ok"] for r in rows) else 1


def _best_config(awq_triton, route: str, dry_run: bool) -> str | None:
    """The autotuner's pick for the call just made (None under the interpreter, which does not tune)."""
    kernel = {"gemv": awq_triton.awq_gemv_splitk_kernel, "gemm": awq_triton.awq_gemm_tiled_kernel,
              "dequant": awq_triton.awq_dequant_kernel}[route]
    config = None if dry_run else getattr(kernel, "best_config", None)
    return str(config) if config is not None else None


def _ms(value: float | None) -> str:
    return "      -" if value is None else f"{value * 1e3:7.1f}"


def _format_row(row: dict) -> str:
    """One table line: times in microseconds, speed-up = baseline / ours."""
    mark = "*" if row["dispatched"] else " "
    head = f"M={row['M']:<5} {row['route'] + mark:<9} err {row['max_rel_error']:.1e} "
    if not row["ok"]:
        return head + "FAILED CHECK: no timing reported" + (f" ({row['error']})" if "error" in row else "")
    graph = (f" | graph ours {_ms(row['ours_graph_ms'])} us  base {_ms(row['baseline_graph_ms'])} us  "
             f"x{row['speedup_graph']:.2f}") if row["speedup_graph"] else ""
    return (head + f"| eager ours {_ms(row['ours_ms'])} us  base {_ms(row['baseline_ms'])} us  "
            f"x{row['speedup']:.2f}" + graph)


def _summary(rows: list[dict], dry_run: bool) -> str:
    """Dispatched-route speed-ups per batch, and the decode target check (M <= 16)."""
    lines = ["\n## dispatched route (*), speed-up over F.linear: eager / graph"]
    for row in rows:
        if row["dispatched"] and row["ok"]:
            graph = f"{row['speedup_graph']:.2f}" if row["speedup_graph"] else "-"
            lines.append(f"{row['K']}x{row['N']} M={row['M']}: {row['route']} {row['speedup']:.2f} / {graph}")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        lines.append(f"FAILED CHECKS: {[(r['K'], r['N'], r['M'], r['route']) for r in failed]}")
    decode = [r for r in rows if r["dispatched"] and r["M"] <= 16]
    if decode and not dry_run:
        for timer in ("speedup", "speedup_graph"):
            worst = min((r.get(timer) or 0.0) if r["ok"] else 0.0 for r in decode)
            verdict = "met" if worst >= DECODE_TARGET else "NOT met"
            lines.append(f"decode target >= {DECODE_TARGET}x at M <= 16, {timer}: worst x{worst:.2f}, {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
