"""Tiny shared CPU timing helper for the benchmarks: pinned threads, median + min, and the load of other jobs.

The shared CI boxes run with a noisy neighbour (about one core busy), so every timing records how busy the
rest of the machine was while it ran (``other_cores_busy``, in cores), read from ``/proc/stat`` minus this
process's own CPU time. 1-thread medians are the primary numbers; 2-thread medians snap to the ~4 ms CFS
slice when a neighbour is busy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hf_plugins.kernels._routes import cpu_model, cpuinfo_field


@dataclass(frozen=True)
class Timing:
    """One measurement: per-call wall time in milliseconds and the other-core load while it ran."""

    median_ms: float
    min_ms: float
    runs: int
    other_cores_busy: float

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _busy_jiffies_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores), or None without ``/proc/stat``."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def time_fn(fn: Callable[[], object], min_time_s: float = 0.3, min_runs: int = 5, max_runs: int = 500) -> Timing:
    """Time ``fn()`` per call after 3 warm-up calls; run until ``min_time_s`` and ``min_runs`` are both reached."""
    for _ in range(3):
        fn()
    busy0, cpu0, wall0 = _busy_jiffies_seconds(), time.process_time(), time.perf_counter()
    samples: list[float] = []
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - wall0 < min_time_s):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    busy1, cpu1, wall1 = _busy_jiffies_seconds(), time.process_time(), time.perf_counter()
    other = float("nan") if busy0 is None else max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / (wall1 - wall0)
    return Timing(
        median_ms=statistics.median(samples) * 1e3,
        min_ms=min(samples) * 1e3,
        runs=len(samples),
        other_cores_busy=round(other, 2),
    )


def machine_name() -> str:
    """A file-name-safe machine tag: CPU model, ATen's CPU capability, core count (``amd-epyc-avx512-2c``), with
    ``-capped`` where the CPU has AVX-512 but this process runs as an AVX2 machine (``ATEN_CPU_CAPABILITY=avx2``)."""
    model = "".join(c if c.isalnum() else "-" for c in cpu_model().lower()).strip("-")
    capability = torch.backends.cpu.get_cpu_capability().lower()
    capped = "-capped" if capability == "avx2" and "avx512f" in (cpuinfo_field("flags") or "").split() else ""
    return f"{model}-{capability}{capped}-{os.cpu_count()}c"


PARTS = ("fwd", "fwd_bwd")


def add_ratios(row: dict, ours: str, baselines: tuple[str, ...]) -> None:
    """``row[f"{baseline}_over_{ours}"][part]``: the baseline's median over ours, for every timed baseline."""
    for baseline in baselines:
        if baseline in row:
            row[f"{baseline}_over_{ours}"] = {
                part: row[baseline][part]["median_ms"] / row[ours][part]["median_ms"] for part in PARTS}


def print_ratio_row(row: dict, size_key: str, ours: str, baselines: tuple[str, ...]) -> None:
    """One table line: ``ours``' forward and forward+backward medians and each baseline's ratio (or the failed
    check)."""
    if not row["checked"]:
        print(f"{size_key}={row[size_key]:<6} CHECK FAILED (max rel error {row['rel_error']:.2e})", flush=True)
        return
    cells = [f"{size_key}={row[size_key]:<6}"]
    for part in PARTS:
        cells.append(f"{part:>7} {ours} {row[ours][part]['median_ms']:9.2f} ms")
        for baseline in baselines:
            ratio = row.get(f"{baseline}_over_{ours}", {}).get(part)
            cells.append(f"{baseline}/{ours} {ratio:6.2f}x" if ratio else f"{baseline}/{ours}      -")
    print("  ".join(cells) + f"  (busy {row[ours]['fwd']['other_cores_busy']})", flush=True)


def fwd_and_fwd_bwd(forward_only: Callable[[], object], forward_backward: Callable[[], object]) -> dict[str, dict]:
    """The ``{"fwd": .., "fwd_bwd": ..}`` timings a ratio row holds."""
    return {"fwd": time_fn(forward_only).as_dict(), "fwd_bwd": time_fn(forward_backward).as_dict()}


def sweep_parser(doc: str, lengths: list[int]) -> argparse.ArgumentParser:
    """The flags every length-sweep kernel benchmark has: ``--threads``, ``--lengths``, ``--batch`` and
    ``--out`` / ``--no-save``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths)
    parser.add_argument("--batch", type=int, default=1)
    saving = parser.add_mutually_exclusive_group()
    saving.add_argument("--out", type=Path, default=None)
    saving.add_argument("--no-save", action="store_true", help="print the table only (smoke runs)")
    return parser


def write_report(report: dict, out: Path | None, name: str, machine: str) -> Path:
    """Write ``report`` as JSON to ``out``, or to ``benchmarks/results/{name}-{date}-{machine}.json``."""
    path = out or Path(__file__).resolve().parent / "results" / f"{name}-{datetime.date.today()}-{machine}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return path


def sweep_and_save(name: str, args: argparse.Namespace, run: Callable[[int, argparse.Namespace], dict],
                   size_key: str, ours: str, baselines: tuple[str, ...], config_keys: tuple[str, ...],
                   results: Path) -> None:
    """Run ``run(length, args)`` for every ``--lengths`` under pinned threads, print each ratio row, and write
    ``{name}-{date}-{machine}.json`` to ``--out`` or ``results`` (nothing with ``--no-save``)."""
    rows = []
    with pinned_threads(args.threads):
        for length in args.lengths:
            rows.append(run(length, args))
            print_ratio_row(rows[-1], size_key, ours, baselines)
    if args.no_save:
        return
    today = str(datetime.date.today())
    out = args.out or results / f"{name}-{today}-{machine_name()}.json"
    config = {key: getattr(args, key) for key in ("batch", *config_keys)}
    out.write_text(json.dumps({"date": today, "machine": machine_name(), "threads": args.threads,
                               "torch": torch.__version__, "config": config, "rows": rows}, indent=2))
    print(f"wrote {out}")
