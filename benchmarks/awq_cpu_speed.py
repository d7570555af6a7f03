"""End-to-end CPU decode speed and weight memory of AWQ W4 models vs the fp32 model, in one process.

    python benchmarks/awq_cpu_speed.py [--models smollm2-135m qwen2.5-coder-1.5b] [--threads 1] [--new-tokens 32]

Per-layer kernel ratios are in ``benchmarks/awq_cpu_layers.py``. Targets (issue 24): decode >= 1.2x fp32 on
smollm2-135m and >= 2.5x on qwen2.5-coder-1.5b at 1 thread, on AVX2 and on AVX-512; quantized decoder-linear weights
<= 30% of their bf16 bytes. Weights are quantized round-to-nearest here: AWQ's search changes values, not the format
or the kernels.

Correctness gate: the quantized model's greedy tokens with the routes this machine chose are compared with those of
the same quantized weights through the exact fp32 ``dequant`` route (``HF_PLUGINS_ROUTE=dequant``); the result file
records whether they are identical and, if not, where they first differ. The load average before and after is
recorded, since another busy process on a 2-core machine shows up directly in tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_plugins  # noqa: E402
from _timing import machine_name, pinned_threads  # noqa: E402
from hf_plugins import AwqConfig, AwqLinear  # noqa: E402
from hf_plugins.assets import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The history of the printing press begins"


def _decode_tok_s(model, inputs, new_tokens: int, repeats: int) -> float:
    """Median decode tokens/s over ``repeats`` runs, prefill time (a 1-token run) subtracted."""
    speeds = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            speeds.append((new_tokens - 1) / (time.perf_counter() - start - prefill))
    return sorted(speeds)[len(speeds) // 2]


def _linear_bytes(model) -> tuple[int, int]:
    """(bytes held by quantized linears, bf16 bytes of the same weights)."""
    held = bf16 = 0
    for module in model.modules():
        if isinstance(module, AwqLinear):
            tensors = [*module.buffers(recurse=False)]
            cpu_weight = module._cpu_weight
            held += sum(t.numel() * t.element_size() for t in tensors)
            if cpu_weight is not None:
                # The prepacked form shares the scales (and kept zeros) with the module's buffers: count once.
                shared = [cpu_weight.scales] + ([cpu_weight.qzeros] if cpu_weight.qzeros is not None else [])
                held += cpu_weight.nbytes() - sum(t.numel() * t.element_size() for t in shared)
            bf16 += 2 * module.in_features * module.out_features
    return held, bf16


def _greedy(model, inputs, new_tokens: int, route: str | None = None) -> torch.Tensor:
    """Greedy tokens ``[1, prompt + new]``; ``route`` forces one kernel route (``HF_PLUGINS_ROUTE``) for the call."""
    previous = os.environ.pop("HF_PLUGINS_ROUTE", None)
    if route:
        os.environ["HF_PLUGINS_ROUTE"] = route
    try:
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        os.environ.pop("HF_PLUGINS_ROUTE", None)
        if previous is not None:
            os.environ["HF_PLUGINS_ROUTE"] = previous


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first position where two token rows differ, or None when they are identical."""
    differ = (a != b).flatten().nonzero()
    return int(differ[0]) if len(differ) else None


def run_model(name: str, args) -> dict:
    load_before = os.getloadavg()[0]
    model, tokenizer = load_model(name)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with pinned_threads(args.threads):
        fp32 = _decode_tok_s(model, inputs, args.new_tokens, args.repeats)
        with torch.inference_mode():
            fp_tokens = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
        hf_plugins.quantize(model, AwqConfig(bits=4, group_size=128, scale_search=False, clip=False))
        q_tokens = _greedy(model, inputs, args.new_tokens)
        exact_tokens = _greedy(model, inputs, args.new_tokens, route="dequant")
        w4 = _decode_tok_s(model, inputs, args.new_tokens, args.repeats)
    gate = _first_difference(q_tokens, exact_tokens)
    held, bf16 = _linear_bytes(model)
    agree = (fp_tokens == q_tokens).float().mean().item()
    row = {
        "model": name,
        "threads": args.threads,
        "fp32_tok_s": fp32,
        "awq_w4_tok_s": w4,
        "speedup": w4 / fp32,
        "linear_bytes_vs_bf16": held / bf16,
        "greedy_token_agreement": agree,
        "gate_identical_to_exact_route": gate is None,
        "gate_first_difference": gate,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }
    print(f"{name:<22} fp32 {fp32:6.2f} tok/s  W4g128 {w4:6.2f} tok/s  x{w4 / fp32:4.2f}  "
          f"weights {100 * held / bf16:4.1f}% of bf16  greedy agreement with fp32 {agree:.2f}  "
          f"gate: {'identical' if gate is None else f'differs from token {gate}'}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [run_model(name, args) for name in args.models]
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = RESULTS / f"awq_cpu_speed-{stamp}-{machine_name()}.json"
    report = {"date": stamp, "machine": machine_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "native_march": os.environ.get("HF_PLUGINS_NATIVE_MARCH", "native"), "torch": torch.__version__,
              "rows": rows}
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
