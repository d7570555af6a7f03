"""End-to-end CPU decode speed and weight memory of weight-only quantized models vs the fp32 model, in one process.

    python benchmarks/awq_cpu_speed.py [--models smollm2-135m qwen2.5-coder-1.5b] [--configs awq-w4 bipolar-w8]
                                       [--threads 1] [--new-tokens 32] [--rounds 5]

Per-layer kernel ratios are in ``benchmarks/awq_cpu_layers.py``. Targets (issue 24): AWQ W4 decode >= 1.2x fp32 on
smollm2-135m and >= 2.5x on qwen2.5-coder-1.5b at 1 thread, every weight-only width (``awq-w2`` .. ``awq-w8``,
``bipolar-w1`` .. ``bipolar-w8``) >= 1.0x, on AVX2 and on AVX-512; quantized decoder-linear weights <= 30% of their
bf16 bytes at W4. Weights are quantized round-to-nearest here: AWQ's search changes values, not the format or the
kernels.

Timing: the fp32 model and each quantized copy decode in alternating rounds, and the speedup is the median of the
per-round ratios, so a neighbour that slows the machine for a while (shared 2-core boxes vary by 20% within minutes)
slows both sides of a ratio alike.

Correctness gate: the quantized model's greedy tokens with the routes this machine chose are compared with those of
the same quantized weights through the exact fp32 ``dequant`` route (``HF_PLUGINS_ROUTE=dequant``); the result file
records whether they are identical and, if not, where they first differ. The load average before and after is
recorded.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_plugins  # noqa: E402
from _timing import machine_name, pinned_threads  # noqa: E402
from hf_plugins import AwqConfig, BipolarIntConfig  # noqa: E402
from hf_plugins.assets import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The history of the printing press begins"


CONFIGS = {f"awq-w{bits}": (lambda bits=bits: AwqConfig(bits=bits, group_size=128, scale_search=False, clip=False))
           for bits in range(2, 9)}
CONFIGS.update({f"bipolar-w{bits}": (lambda bits=bits: BipolarIntConfig(w_bits=bits, group_size=128))
                for bits in range(1, 9)})
"""Round-to-nearest weight-only configurations by name, group 128."""


def _decode_seconds(model, inputs, new_tokens: int) -> float:
    """Seconds for ``new_tokens - 1`` decode steps: a ``new_tokens`` run minus a 1-token (prefill) run."""
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - start - prefill


def _linear_bytes(model) -> tuple[int, int]:
    """(bytes held by the quantized linears, bf16 bytes of the same weights): each distinct tensor of their
    buffers and CPU prepacked forms counted once."""
    tensors, bf16 = {}, 0
    for module in model.modules():
        cpu_weight = getattr(module, "_cpu_weight", None)
        if not hasattr(module, "dequantized_weight"):
            continue
        held = list(module.buffers(recurse=False))
        if cpu_weight is not None:
            held += cpu_weight.tensors()
        tensors.update({t.data_ptr(): t.numel() * t.element_size() for t in held if t.numel()})
        bf16 += 2 * module.in_features * module.out_features
    return sum(tensors.values()), bf16


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


def run_config(name: str, config: str, fp32_model, tokenizer, args) -> dict:
    load_before = os.getloadavg()[0]
    inputs = tokenizer(PROMPT, return_tensors="pt")
    model = copy.deepcopy(fp32_model)
    with pinned_threads(args.threads):
        with torch.inference_mode():
            fp_tokens = fp32_model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
        hf_plugins.quantize(model, CONFIGS[config]())
        q_tokens = _greedy(model, inputs, args.new_tokens)
        exact_tokens = _greedy(model, inputs, args.new_tokens, route="dequant")
        fp32_seconds, q_seconds = [], []
        for _ in range(args.rounds):
            fp32_seconds.append(_decode_seconds(fp32_model, inputs, args.new_tokens))
            q_seconds.append(_decode_seconds(model, inputs, args.new_tokens))
    gate = _first_difference(q_tokens, exact_tokens)
    held, bf16 = _linear_bytes(model)
    agree = (fp_tokens == q_tokens).float().mean().item()
    steps = args.new_tokens - 1
    fp32, quantized = steps / statistics.median(fp32_seconds), steps / statistics.median(q_seconds)
    speedup = statistics.median(f / q for f, q in zip(fp32_seconds, q_seconds))
    row = {
        "model": name,
        "config": config,
        "threads": args.threads,
        "rounds": args.rounds,
        "fp32_tok_s": fp32,
        "quantized_tok_s": quantized,
        "speedup": speedup,
        "speedup_per_round": [f / q for f, q in zip(fp32_seconds, q_seconds)],
        "linear_bytes_vs_bf16": held / bf16,
        "greedy_token_agreement": agree,
        "gate_identical_to_exact_route": gate is None,
        "gate_first_difference": gate,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }
    print(f"{name:<20} {config:<11} fp32 {fp32:6.2f} tok/s  quantized {quantized:6.2f} tok/s  x{speedup:4.2f}  "
          f"weights {100 * held / bf16:4.1f}% of bf16  greedy agreement with fp32 {agree:.2f}  "
          f"gate: {'identical' if gate is None else f'differs from token {gate}'}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="alternating fp32 / quantized decode runs")
    parser.add_argument("--configs", nargs="+", default=["awq-w4"], choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/<date>-<machine>)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        model, tokenizer = load_model(name)
        rows += [run_config(name, config, model, tokenizer, args) for config in args.configs]
        del model
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = args.out or RESULTS / f"awq_cpu_speed-{stamp}-{machine_name()}.json"
    report = {"date": stamp, "machine": machine_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "native_march": os.environ.get("HF_PLUGINS_NATIVE_MARCH", "native"), "torch": torch.__version__,
              "rows": rows}
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
