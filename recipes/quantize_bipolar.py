"""Quantize a causal LM to bipolar-INT (1-8 bit weights, optional 1-8 bit activations), evaluate, save, reload.

    python recipes/quantize_bipolar.py --model smollm2-135m --w-bits 3 --scale-search awq --out bipolar-w3
    python recipes/quantize_bipolar.py --w-bits 4 --a-bits 8 --scale-search none --eval-docs 2

``--model`` is a packaged model id (see hf_plugins.assets) or any local model folder. ``--scale-search awq``
calibrates AWQ's activation-aware scales on the packaged text first (a few minutes for SmolLM2-135M on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hf_plugins
from hf_plugins import BipolarIntConfig
from hf_plugins.demo import heldout_perplexity, load_any, save_and_reload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--w-bits", type=int, default=3)
    parser.add_argument("--a-bits", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--scale-search", choices=["awq", "none"], default="awq")
    parser.add_argument("--calibration", default="wiki", choices=["wiki", "news", "code"])
    parser.add_argument("--eval-docs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bipolar-model"))
    args = parser.parse_args()

    # 1. Load a float model (a packaged real model or a local folder) and measure its held-out perplexity.
    model, tokenizer = load_any(args.model)
    fp_ppl = heldout_perplexity(model, tokenizer, "wiki", args.eval_docs)

    # 2. Quantize in place: AWQ's searches on the integer grid (optional), rewritten to bipolar bit planes.
    search = args.scale_search == "awq"
    config = BipolarIntConfig(w_bits=args.w_bits, a_bits=args.a_bits, group_size=args.group_size,
                              scale_search="awq" if search else None)
    start = time.perf_counter()
    report = hf_plugins.quantize(model, config, calibration_data=args.calibration if search else None,
                                 tokenizer=tokenizer)
    if report is not None:
        print(report)
    print(f"quantized in {time.perf_counter() - start:.1f} s")

    # 3. Evaluate.
    name = f"W{args.w_bits}" + (f"A{args.a_bits}" if args.a_bits else "")
    q_ppl = heldout_perplexity(model, tokenizer, "wiki", args.eval_docs)
    print(f"held-out wiki perplexity: float {fp_ppl:.3f} -> bipolar {name} g{args.group_size} {q_ppl:.3f}")

    # 4. Save (safetensors) and reload with plain transformers (after `import hf_plugins`).
    prompt = "Every bit stands for minus one or plus one."
    reloaded, identical = save_and_reload(model, tokenizer, args.out, prompt)
    print(f"reloaded from {args.out}: logits bit-identical = {identical}")
    with torch.inference_mode():
        sample = reloaded.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=16, do_sample=False)
    print(tokenizer.decode(sample[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
