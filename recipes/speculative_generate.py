"""Speculative decoding with the Hugging Face API: a batch of prompts, a draft, lossless output, metrics.

    python recipes/speculative_generate.py                                   # qwen2.5-coder 1.5B + int4 0.5B draft
    python recipes/speculative_generate.py --draft self --bits 4             # no second checkpoint
    python recipes/speculative_generate.py --sample --temperature 0.7        # exact speculative sampling
    accelerate launch recipes/speculative_generate.py --model smollm2-135m --draft self

``--model``/``--draft`` are packaged model ids (see hf_plugins.assets) or local folders sharing a tokenizer;
``--draft self`` derives the draft from the target (``hf_plugins.self_draft``). Accelerate places the models on
this process's device. Greedy runs also decode without a draft and check the outputs are identical.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator

import hf_plugins
from hf_plugins import SpeculativeConfig
from hf_plugins.assets import load_text
from hf_plugins.demo import load_any
from hf_plugins.evaluation import load_speculative_metric, speculative_fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b", help="a model id/folder, or 'self'")
    parser.add_argument("--bits", type=int, default=4, help="quantize the draft's linears to this many bits; 0: keep")
    parser.add_argument("--layer-parallel", type=int, default=1, help="EasySpec layer group size of the draft")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the batch (half prose, half code)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    accelerator = Accelerator()
    target, tokenizer = load_any(args.model)
    target.to(accelerator.device)
    if args.draft == "self":
        draft = hf_plugins.self_draft(target, bits=args.bits or None)
    else:
        draft = load_any(args.draft)[0].to(accelerator.device)
        draft = hf_plugins.self_draft(draft, bits=args.bits) if args.bits else draft
    hf_plugins.enable_speculative(target, SpeculativeConfig(layer_parallel_group_size=args.layer_parallel))

    prose = args.prompts // 2
    docs = load_text("wiki", "evaluation")[:prose] + load_text("code", "evaluation")[: args.prompts - prose]
    tokenizer.padding_side = "left"
    batch = tokenizer([doc[:600] for doc in docs], return_tensors="pt", padding=True).to(accelerator.device)
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=args.sample)
    if args.sample:
        kwargs["temperature"] = args.temperature

    metric = load_speculative_metric()
    with torch.inference_mode():
        start = time.perf_counter()
        out = target.generate(**batch, assistant_model=draft, return_dict_in_generate=True, **kwargs)
        seconds = time.perf_counter() - start
        metric.add(**speculative_fields(out.speculative_stats))
        if not args.sample:
            start = time.perf_counter()
            plain = target.generate(**batch, **kwargs)
            plain_seconds = time.perf_counter() - start
            identical = torch.equal(plain, out.sequences)
            print(f"identical to plain greedy: {identical}; speculative {seconds:.1f} s, plain {plain_seconds:.1f} s "
                  f"({plain_seconds / seconds:.2f}x)")
    for row in out.sequences[:, batch.input_ids.shape[1] :]:
        print("---", tokenizer.decode(row, skip_special_tokens=True)[:300])
    print(metric.compute())


if __name__ == "__main__":
    main()
