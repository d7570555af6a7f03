"""This machine's roofline (``hf_plugins.hardware``) at each thread count, saved for the kernel figures to cite.

    python benchmarks/hardware.py [--threads 1,2] [--device cpu|cuda] [--out PATH]

Run with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` to measure an AVX512 CPU
as an AVX2-only one (the machine tag in the file name then says ``avx2``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._timing import machine_name, pinned_threads, write_report  # noqa: E402
from hf_plugins.hardware import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    date = datetime.date.today().isoformat()
    name = machine_name() if args.device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    report = {"benchmark": "hardware", "date": date, "machine": name, "torch": torch.__version__, "rooflines": {}}
    for threads in [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [1]:
        with pinned_threads(threads):
            roofline = measure(args.device)
        report["rooflines"][threads] = roofline.as_dict()
        peaks = ", ".join(f"{dtype} {max(routes.values()):.3f}" for dtype, routes in roofline.matmul_tflops.items())
        print(f"{roofline.device}, {threads} thread(s): matmul T(FL)OPS {peaks}; GB/s " + ", ".join(
            f"{k} {v:.1f}" for k, v in roofline.bandwidth_gbs.items()) + "; us/call " + ", ".join(
            f"{k} {v:.1f}" for k, v in roofline.call_us.items()))
    write_report(report, args.out, "hardware", name)


if __name__ == "__main__":
    main()
