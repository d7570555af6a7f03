"""Speculative decoding on one GPU: plain greedy vs transformers' assisted generation vs ours (written for H100/H200).

    python benchmarks/gpu/speculative.py                 # real qwen2.5-coder pair if its cache exists, else synthetic
    python benchmarks/gpu/speculative.py --dry-run       # CPU, tiny random models: the whole script in seconds

Real mode (the packaged qwen2.5-coder 1.5B target / 0.5B draft, fp16, prose and code prompts, 128 new tokens):
every speculative output is checked token-identical to plain greedy before its wall-clock ratio is reported.
Target (issue): >= 2x plain greedy. Synthetic mode (random weights with the two models' real shapes, for machines
without the model cache, e.g. a device that cannot reach the package registries): the same runs check losslessness
on CUDA and time the pieces, but random weights give meaningless acceptance, so it also reports the measured costs
(target forward of 1 and k+1 tokens, one draft token) and the speed-up they imply at given acceptance rates
(``(1 - a^(k+1)) / ((1 - a) (k c + v))``, the acceptance rates measured on CPU with the real pair).
Writes JSON to ``$OUT`` if set, else ``benchmarks/results/``.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import hf_plugins  # noqa: E402
from hf_plugins import SpeculativeConfig  # noqa: E402

# Per-token acceptance of the real pair with the 0.5B draft, measured by benchmarks/speculative_cpu.py (fp32 CPU,
# results/speculative_cpu-2026-11-27-amd-epyc-avx512-2c.json: prose 0.77-0.83, code 0.67-0.73).
CPU_ACCEPTANCE = {"prose": 0.8, "code": 0.7}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def _synthetic_pair(device, dtype, dry: bool):
    import transformers

    shapes = {
        "target": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
        "draft": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    }
    if dry:
        shapes = {
            "target": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
            "draft": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        }
    models = []
    for seed, name in enumerate(("target", "draft")):
        config = transformers.Qwen2Config(vocab_size=151936 if not dry else 512, num_key_value_heads=2,
                                          tie_word_embeddings=False, **shapes[name])
        torch.manual_seed(seed)
        with torch.device(device):
            models.append(transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval())
    return models[0], models[1], None


def _real_pair(device, dtype):
    from hf_plugins.assets import load_model

    target, tokenizer = load_model("qwen2.5-coder-1.5b")
    draft, _ = load_model("qwen2.5-coder-0.5b")
    return target.to(device, dtype), draft.to(device, dtype), tokenizer


def _prompts(tokenizer, vocab: int, count: int, length: int) -> dict[str, list[torch.Tensor]]:
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        return {kind: [torch.randint(3, vocab, (1, length), generator=gen) for _ in range(count)]
                for kind in ("prose", "code")}
    from hf_plugins.assets import load_text

    out = {}
    for kind, text in (("prose", "wiki"), ("code", "code")):
        docs = [d for d in load_text(text, "evaluation") if len(d) > 4 * length][:count]
        out[kind] = [tokenizer(d, return_tensors="pt").input_ids[:, :length] for d in docs]
    return out


def _costs(target, draft, ids, device, k: int) -> dict:
    """Median seconds of: target forward of 1 and of k+1 tokens after the prompt, and one draft token."""
    from transformers import DynamicCache

    def forward(model, new):
        cache = DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)
        seconds = []
        for _ in range(5):
            length = cache.get_seq_length()
            _, dt = _timed(lambda: model(new, cache=cache, use_cache=True), device)
            cache.crop(-(cache.get_seq_length() - length))
            seconds.append(dt)
        return sorted(seconds)[2]

    with torch.inference_mode():
        one = forward(target, ids[:, -1:])
        many = forward(target, ids[:, -(k + 1):])
        draft_one = forward(draft, ids[:, -1:])
    return {"target_1": one, "target_k1": many, "draft_1": draft_one, "k": k}


def _implied_speedup(costs: dict, acceptance: float) -> float:
    k, a = costs["k"], acceptance
    tokens = (1 - a ** (k + 1)) / (1 - a)
    return tokens * costs["target_1"] / (k * costs["draft_1"] + costs["target_k1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny random models")
    parser.add_argument("--synthetic", action="store_true", help="random weights even if the model cache exists")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.float16
    from hf_plugins.assets._store import cache_dir

    have_cache = (cache_dir() / "models" / "qwen2.5-coder-1.5b").is_dir()
    synthetic = args.dry_run or args.synthetic or not have_cache
    target, draft, tokenizer = (_synthetic_pair(device, dtype, args.dry_run) if synthetic
                                else _real_pair(device, dtype))
    hf_plugins.enable_speculative(target)
    drafts = {
        "ours-0.5b": (draft, SpeculativeConfig()),
        "ours-0.5b-easyspec2": (draft, SpeculativeConfig(layer_parallel_group_size=2)),
        "ours-self-int4": (hf_plugins.self_draft(target, bits=4), SpeculativeConfig()),
    }
    new_tokens = 16 if args.dry_run else args.new_tokens
    prompts = _prompts(tokenizer, target.config.vocab_size, max(1, args.batch // 2), 32 if args.dry_run else 192)
    rows = []
    with torch.inference_mode():
        for kind, batch in prompts.items():
            ids = batch[0].to(device)
            kwargs = dict(max_new_tokens=new_tokens, do_sample=False)
            target.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up (kernels, allocator)
            plain, base = _timed(lambda: target.generate(ids, **kwargs), device)
            hf_plugins.disable_speculative(target)
            hf_out, hf_seconds = _timed(lambda: target.generate(ids, assistant_model=draft, **kwargs), device)
            hf_plugins.enable_speculative(target)
            rows.append({"kind": kind, "method": "transformers", "seconds": hf_seconds,
                         "identical": torch.equal(hf_out, plain), "speedup": base / hf_seconds})
            for name, (assistant, config) in drafts.items():
                target.generate(ids, assistant_model=assistant, speculative_config=config, max_new_tokens=4)
                out, seconds = _timed(lambda: target.generate(
                    ids, assistant_model=assistant, speculative_config=config, return_dict_in_generate=True,
                    **kwargs), device)
                same = torch.equal(out.sequences, plain)
                rows.append({"kind": kind, "method": name, "seconds": seconds, "identical": same,
                             "speedup": base / seconds if same else None,
                             "acceptance": out.speculative_stats["acceptance_rate"],
                             "tokens_per_forward": out.speculative_stats["tokens_per_target_forward"]})
            rows.append({"kind": kind, "method": "plain", "seconds": base, "identical": True, "speedup": 1.0})
        if args.batch:
            ids = torch.cat([t[:, :32] for kind in prompts for t in prompts[kind]])[: args.batch].to(device)
            plain, base = _timed(lambda: target.generate(ids, max_new_tokens=new_tokens, do_sample=False), device)
            out, seconds = _timed(lambda: target.generate(ids, assistant_model=draft, max_new_tokens=new_tokens,
                                                          do_sample=False), device)
            same = torch.equal(out, plain)
            rows.append({"kind": f"batch{len(ids)}", "method": "ours-0.5b", "seconds": seconds, "identical": same,
                         "speedup": base / seconds if same else None, "plain_seconds": base})
        costs = _costs(target, draft, prompts["code"][0].to(device), device, k=5)
    implied = {kind: _implied_speedup(costs, a) for kind, a in CPU_ACCEPTANCE.items()}
    for row in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    print("costs", costs, "implied speed-up at CPU acceptance", implied)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    result = {"date": str(datetime.date.today()), "card": card, "synthetic": synthetic, "dtype": str(dtype),
              "torch": torch.__version__, "rows": rows, "costs": costs, "implied_speedup": implied}
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "results")
    if args.dry_run and not (args.out or os.environ.get("OUT")):
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"speculative_gpu-{datetime.date.today()}-{card.replace(' ', '-').lower()}.json"
    (out_dir / name).write_text(json.dumps(result, indent=2))
    print("wrote", out_dir / name)


if __name__ == "__main__":
    main()
