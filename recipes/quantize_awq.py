"""Quantize a causal LM with AWQ, evaluate it, save it, reload it and generate: the script to copy.

    python recipes/quantize_awq.py --model smollm2-135m --bits 4 --group-size 128 --out awq-smollm2

``--model`` is a packaged model id (see hf_plugins.assets) or any local model folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hf_plugins
from hf_plugins import AwqConfig
from hf_plugins.demo import heldout_perplexity, load_any, save_and_reload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calibration", default="wiki", choices=["wiki", "news", "code"])
    parser.add_argument("--eval-docs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("awq-model"))
    args = parser.parse_args()

    # 1. Load a float model (a packaged real model or a local folder).
    model, tokenizer = load_any(args.model)
    fp_ppl = heldout_perplexity(model, tokenizer, "wiki", args.eval_docs)

    # 2. Quantize in place with calibration text (the calibration split never overlaps the evaluation split).
    config = AwqConfig(bits=args.bits, group_size=args.group_size)
    start = time.perf_counter()
    report = hf_plugins.quantize(model, config, calibration_data=args.calibration, tokenizer=tokenizer)
    print(report)
    print(f"calibrated and packed in {time.perf_counter() - start:.1f} s")

    # 3. Evaluate.
    q_ppl = heldout_perplexity(model, tokenizer, "wiki", args.eval_docs)
    print(f"held-out wiki perplexity: float {fp_ppl:.3f} -> AWQ W{args.bits} g{args.group_size} {q_ppl:.3f}")

    # 4. Save (safetensors) and reload with plain transformers (after `import hf_plugins`).
    reloaded, identical = save_and_reload(model, tokenizer, args.out, "Reloading must be exact.")
    print(f"reloaded from {args.out}: logits bit-identical = {identical}")

    # 5. Generate.
    inputs = tokenizer("The printing press was", return_tensors="pt")
    with torch.inference_mode():
        out = reloaded.generate(**inputs, max_new_tokens=32, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
