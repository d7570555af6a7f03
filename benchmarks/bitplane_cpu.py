"""Bipolar-INT linears on CPU vs fp32 ``F.linear`` at real layer shapes, M = 1 and 16, after a correctness check.

    python benchmarks/bitplane_cpu.py [--threads 1] [--rows 1 16] [--configs w2 w3 w4 w8 w4a8 w8a8]

Layers run the CPU path of ``hf_plugins.kernels.bitplane_gemm.cpu``: the weight as one packed int4 matmul per 4
bits (nibble planes), activations (``aN``) quantized per token first. Every layer is first checked against the
integer-exact reference (bf16 tolerance: the int4 kernel rounds activations to bf16). Reports time ratios
(fp32 / bipolar, > 1 is faster) and bytes: the stored bit planes are n/32 of fp32; the prepacked form a call
reads is 4 bits per weight per chunk plus bf16 group scales.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._timing import machine_name, pinned_threads, time_fn  # noqa: E402
from hf_plugins.quantizers.bipolar.modules import BipolarIntLinear  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402

# (model, role, in_features, out_features): the distinct linear shapes of SmolLM2-135M and Qwen2.5-Coder-1.5B.
SHAPES = [
    ("smollm2-135m", "q,o", 576, 576),
    ("smollm2-135m", "gate,up", 576, 1536),
    ("smollm2-135m", "down", 1536, 576),
    ("qwen2.5-coder-1.5b", "q,o", 1536, 1536),
    ("qwen2.5-coder-1.5b", "gate,up", 1536, 8960),
    ("qwen2.5-coder-1.5b", "down", 8960, 1536),
]


def parse_config(text: str) -> tuple[int, int | None]:
    """``"w3"`` -> ``(3, None)``, ``"w2a4"`` -> ``(2, 4)``."""
    match = re.fullmatch(r"w([1-8])(?:a([1-8]))?", text)
    if match is None:
        raise ValueError(f"configs look like w3 or w2a4 (1..8 bits each), got {text!r}.")
    return int(match[1]), None if match[2] is None else int(match[2])


def run(config: str, rows: int, shape) -> dict:
    model, role, in_features, out_features = shape
    bits, act_bits = parse_config(config)
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    layer = BipolarIntLinear.from_linear(linear, bits, act_bits, 128)
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        os.environ["HF_PLUGINS_BACKEND"] = "reference"
        reference = layer(x)
        os.environ.pop("HF_PLUGINS_BACKEND")
        fast = layer(x)
        error = max_rel_error(fast, reference)
        packed = layer._cpu_weight is not None
        row = {"model": model, "layer": role, "in": in_features, "out": out_features, "config": config, "bits": bits,
               "act_bits": act_bits, "rows": rows,
               "path": f"int4 x{layer._cpu_weight.chunks}" if packed else "reference", "rel_error": error,
               "checked": error <= FLOAT_KERNEL_RTOL[torch.bfloat16 if packed else torch.float32],
               "plane_bytes_vs_fp32": layer.planes().numel() / (4 * in_features * out_features),
               "prepacked_bytes_vs_fp32": layer._cpu_weight.nbytes() / (4 * in_features * out_features)
               if packed else None}
        if not row["checked"]:
            return row
        baseline = time_fn(lambda: F.linear(x, linear.weight))
        timed = time_fn(lambda: layer(x))
    row.update(fp32_ms=baseline.median_ms, bipolar_ms=timed.median_ms, speedup=baseline.median_ms / timed.median_ms,
               other_cores_busy=timed.other_cores_busy)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--configs", nargs="+", default=["w2", "w3", "w4", "w8", "w4a8", "w8a8"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with pinned_threads(args.threads):
        for config in args.configs:
            for m in args.rows:
                for shape in SHAPES:
                    row = run(config, m, shape)
                    rows.append(row)
                    speed = f"{row['speedup']:.2f}x" if "speedup" in row else "CHECK FAILED"
                    print(f"{config:<5} M={m:<3} {row['model']:<19} {row['layer']:<8} {row['in']:>5}x{row['out']:<5} "
                          f"{row['path']:<12} {speed:>8}  planes {row['plane_bytes_vs_fp32']:.3f} of fp32", flush=True)
    name = f"bitplane_cpu-{datetime.date.today()}-{machine_name()}.json"
    out = args.out or REPO_ROOT / "benchmarks" / "results" / name
    out.write_text(json.dumps({"date": str(datetime.date.today()), "machine": machine_name(), "threads": args.threads,
                               "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
