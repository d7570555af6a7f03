"""Helpers shared by the GPU kernel benchmarks: medians from ``do_bench`` (eager and CUDA graph), weight copies
rotated so every timed call streams its weights from HBM instead of L2, ratio cells, the command line and the
JSON report."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
ROTATE_BYTES = 256 << 20
"""Weights cycled per timing: several times a Hopper L2 (50-60 MB), so every call reads HBM."""


def timer_for(dry_run: bool):
    """Median ms per call: on a GPU the smaller of ``do_bench`` (eager, host launch cost included) and
    ``do_bench_cudagraph`` (GPU time, as under CUDA-graph decode) for every route alike; wall clock under the
    interpreter (meaningless as speed)."""
    if not dry_run:
        import triton.testing

        def gpu(fn) -> float:
            eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            try:
                graphed = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            except RuntimeError:  # a route that cannot be captured is timed eagerly
                graphed = eager
            return min(eager, graphed)

        return gpu

    def wall(fn) -> float:
        samples = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return wall


def rotating(make, nbytes: int, dry_run: bool) -> list:
    """Enough independent copies of ``make()`` to overflow the L2 cache (one under the interpreter)."""
    return [make() for _ in range(1 if dry_run else max(2, -(-ROTATE_BYTES // nbytes)))]


def cycled(fn, copies: list):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(copies)
        return fn(copies[state["i"]])

    return call


def ratio_text(value: float | None) -> str:
    """A speed-up table cell: ``" 1.23x"``, or a dash for a route that was not timed."""
    return "    -" if value is None else f"{value:5.2f}x"


def benchmark_parser(doc: str, dry_help: str = "tiny shapes under the Triton interpreter (CPU)"
                     ) -> argparse.ArgumentParser:
    """The options every GPU benchmark takes (``--dry-run``, ``--out``), described by the first paragraph of
    ``doc``; a benchmark adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help=dry_help)
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results/)")
    return parser


def finish(name: str, rows: list[dict], targets: list[str], args: argparse.Namespace, passed: bool) -> int:
    """Print the target lines, write the report (:func:`write_report`) and return the exit status: 0 when every
    route ``passed`` its correctness check."""
    print("\n".join(targets))
    write_report(name, rows, targets, args.dry_run, args.out, RESULTS)
    return 0 if passed else 1


def write_report(name: str, rows: list[dict], targets: list[str], dry_run: bool, out: str | None,
                 results: Path) -> None:
    """Write ``{name}-{date}-{card}.json`` to ``out``, else ``$OUT``, else ``results`` (nowhere for a dry run
    without a folder)."""
    import torch

    card = "interpreter" if dry_run else torch.cuda.get_device_name().lower().replace(" ", "-")
    report = {"date": str(datetime.date.today()), "card": card, "torch": torch.__version__, "dry_run": dry_run,
              "rows": rows, "targets": targets}
    folder = out or os.environ.get("OUT") or (None if dry_run else results)
    if folder is not None:
        path = Path(folder) / f"{name}-{datetime.date.today()}-{card}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
