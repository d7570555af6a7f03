"""COMET-style W4A4KV4: compare W4A16 / W4A8 / W4A4 / W4A4 + FMPQ / + 4-bit KV cache, then save the last one,
reload it and generate (the 4-bit KV cache is used automatically).

    python recipes/quantize_w4a4kv4.py --model smollm2-135m --out w4a4kv4-model
    python recipes/quantize_w4a4kv4.py --model qwen2.5-coder-0.5b --eval-docs 2 --calibration code

``--model`` is a packaged model id (see hf_plugins.assets) or any local model folder. FMPQ reorders each linear's
input channels from calibration activations (8 x 512 tokens of the packaged text) so that the outlier channels
share a few 128-channel blocks, which keep 8-bit activations; every other block runs in 4 bits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hf_plugins
from hf_plugins import KV4Cache, W4A4KV4Config
from hf_plugins.demo import heldout_perplexity, load_any, save_and_reload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calibration", default="wiki", choices=["wiki", "news", "code"])
    parser.add_argument("--eval-docs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("w4a4kv4-model"))
    args = parser.parse_args()
    group = args.group_size

    # 1. The float model's held-out perplexity, with its own cache and with attention reading a 4-bit KV cache.
    model, tokenizer = load_any(args.model)
    kv4 = lambda: KV4Cache(model.config)  # noqa: E731
    print(f"float:            wiki perplexity {heldout_perplexity(model, tokenizer, 'wiki', args.eval_docs):.3f}"
          f"  (+KV4 {heldout_perplexity(model, tokenizer, 'wiki', args.eval_docs, cache_factory=kv4):.3f})")

    # 2. One quantized variant per line, each from a fresh float model: the same 4-bit weights throughout.
    variants = {
        "W4A16": W4A4KV4Config(group_size=group, outlier_blocks=0, kv_bits=16),  # dequantized below
        "W4A8": W4A4KV4Config(group_size=group, outlier_blocks="all", kv_bits=16),
        "W4A4 (plain)": W4A4KV4Config(group_size=group, outlier_blocks=0, kv_bits=16),
        "W4A4 + FMPQ": W4A4KV4Config(group_size=group, outlier_blocks="auto", kv_bits=16),
        "W4A4 + FMPQ + KV4": W4A4KV4Config(group_size=group, outlier_blocks="auto", kv_bits=4),
    }
    for name, config in variants.items():
        model, tokenizer = load_any(args.model)
        start = time.perf_counter()
        report = hf_plugins.quantize(model, config, calibration_data=args.calibration, tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        if name == "W4A16":
            model.dequantize()  # float activations on the W4 weights
        cache = (lambda m=model: KV4Cache(m.config)) if config.kv_bits == 4 else None
        ppl = heldout_perplexity(model, tokenizer, "wiki", args.eval_docs, cache_factory=cache)
        blocks = [entry["outlier_blocks"] for entry in report.values()]
        print(f"{name:<18}wiki perplexity {ppl:.3f}  (quantized in {seconds:.0f} s; 8-bit blocks per linear: "
              f"mean {sum(blocks) / len(blocks):.2f}, max {max(blocks)})")

    # 3. Save the last model (safetensors) and reload it with plain transformers (after `import hf_plugins`).
    prompt = "The four-bit cache keeps"
    reloaded, identical = save_and_reload(model, tokenizer, args.out, prompt)
    print(f"reloaded from {args.out}: logits bit-identical = {identical}")
    with torch.inference_mode():
        out = reloaded.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=24, do_sample=False,
                                return_dict_in_generate=True)
    cache = out.cache
    print(f"{type(cache).__name__}: {cache.nbytes()} bytes, {cache.nbytes() / cache.dense_nbytes():.0%} of an fp16 "
          "cache")
    print(tokenizer.decode(out.sequences[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
