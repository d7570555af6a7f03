"""Speculative decoding on CPU: plain greedy vs transformers' assisted generation vs ours, per draft kind.

    python benchmarks/speculative_cpu.py [--threads 1 2] [--new-tokens 128] [--methods ...] [--batch 8]

``plain-fastlinear`` is plain greedy with the target's linears on the oneDNN path our loop uses on CPU (a
stronger baseline; ``plain`` is what ``generate`` does by default). Target qwen2.5-coder-1.5b (fp32), draft
qwen2.5-coder-0.5b, one prose prompt (held-out Wikipedia) and one code
prompt (Python standard-library source). Every speculative output is checked token-identical to plain greedy in
the same process before its ratio is reported. Draft kinds of ours:

- ``ours-0.5b``: the 0.5B checkpoint in fp32;
- ``ours-0.5b-int4``: ``self_draft(draft, bits=4)``, the 0.5B model with int4 linears and head;
- ``ours-0.5b-int4-easyspec{G}``: the same draft with EasySpec layer-parallel groups of G layers;
- ``ours-0.5b-int4-ctx{N}``: the same draft reading only the last N prompt tokens (``draft_context=N``), which
  cuts its prefill (large for batches);
- ``ours-self-int4``: ``self_draft(target, bits=4)``, no second checkpoint;
- ``ours-self-int4-skip{N}``: ``self_draft(target, bits=4, layers=N)`` (not run by default: without training, a
  20-of-28-layer draft is accepted about 25% of the time and loses to plain greedy).

Targets (issue): ours >= 1.3x plain greedy on code and >= 1.1x on prose at 1 thread, faster than transformers'
assisted generation everywhere; batch 8 >= 1.5x plain batched greedy.
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
from hf_plugins import SpeculativeConfig  # noqa: E402
from hf_plugins.assets import load_model, load_text  # noqa: E402
from hf_plugins.kernels.dense_linear import fast_linears  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS = 192
METHODS = (
    "plain",
    "plain-fastlinear",
    "transformers",
    "ours-0.5b",
    "ours-0.5b-int4",
    "ours-0.5b-int4-easyspec2",
    "ours-0.5b-int4-easyspec4",
    "ours-0.5b-int4-ctx64",
    "ours-self-int4",
    "ours-self-int4-skip20",
)
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("ours-self-int4-skip20", "ours-0.5b-int4-ctx64"))


def prompts(tokenizer, count: int) -> dict[str, list[torch.Tensor]]:
    """``count`` prompts per kind: the first PROMPT_TOKENS tokens of held-out documents."""
    out = {}
    for kind, text in (("prose", "wiki"), ("code", "code")):
        docs = [d for d in load_text(text, "evaluation") if len(d) > 4 * PROMPT_TOKENS][:count]
        out[kind] = [tokenizer(d, return_tensors="pt").input_ids[:, :PROMPT_TOKENS] for d in docs]
    return out


def build_drafts(target, draft, methods) -> dict[str, tuple[object, SpeculativeConfig]]:
    """Method name -> (assistant model, our config) for the methods requested."""
    drafts = {}
    int4 = hf_plugins.self_draft(draft, bits=4) if any("0.5b-int4" in m for m in methods) else None
    for method in methods:
        if method == "transformers" or method == "ours-0.5b":
            drafts[method] = (draft, SpeculativeConfig())
        elif method == "ours-0.5b-int4":
            drafts[method] = (int4, SpeculativeConfig())
        elif method.startswith("ours-0.5b-int4-easyspec"):
            group = int(method.removeprefix("ours-0.5b-int4-easyspec"))
            drafts[method] = (int4, SpeculativeConfig(layer_parallel_group_size=group))
        elif method.startswith("ours-0.5b-int4-ctx"):
            context = int(method.removeprefix("ours-0.5b-int4-ctx"))
            drafts[method] = (int4, SpeculativeConfig(draft_context=context))
        elif method == "ours-self-int4":
            drafts[method] = (hf_plugins.self_draft(target, bits=4), SpeculativeConfig())
        elif method.startswith("ours-self-int4-skip"):
            layers = int(method.removeprefix("ours-self-int4-skip"))
            drafts[method] = (hf_plugins.self_draft(target, bits=4, layers=layers), SpeculativeConfig())
    return drafts


def generate(target, method, drafts, input_ids, attention_mask, new_tokens):
    """``(sequences, seconds, speculative stats or None)`` of one run."""
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False)
    start = time.perf_counter()
    with torch.inference_mode():
        if method == "plain":
            out, stats = target.generate(input_ids, **kwargs), None
        elif method == "plain-fastlinear":
            with fast_linears(target):
                out, stats = target.generate(input_ids, **kwargs), None
        elif method == "transformers":
            hf_plugins.disable_speculative(target)
            try:
                out, stats = target.generate(input_ids, assistant_model=drafts[method][0], **kwargs), None
            finally:
                hf_plugins.enable_speculative(target)
        else:
            draft, config = drafts[method]
            result = target.generate(input_ids, assistant_model=draft, speculative_config=config,
                                     return_dict_in_generate=True, **kwargs)
            out, stats = result.sequences, result.speculative_stats
    return out, time.perf_counter() - start, stats


def run_setting(target, drafts, methods, input_ids, attention_mask, new_tokens, label) -> list[dict]:
    rows = []
    reference, base_seconds, _ = generate(target, "plain", drafts, input_ids, attention_mask, new_tokens)
    for method in methods:
        if method == "plain":
            seconds = base_seconds
            out, stats = reference, None
        else:
            out, seconds, stats = generate(target, method, drafts, input_ids, attention_mask, new_tokens)
        identical = torch.equal(out, reference)
        row = {
            "setting": label,
            "method": method,
            "seconds": seconds,
            "identical_to_greedy": identical,
            "speedup_vs_plain": base_seconds / seconds if identical else None,
            "new_tokens": int(reference.shape[1] - input_ids.shape[1]),
            "loadavg_1m": os.getloadavg()[0],
        }
        if stats:
            row.update({k: stats[k] for k in ("acceptance_rate", "tokens_per_target_forward", "draft_fraction")})
            row["mean_draft_length"] = sum(stats["draft_lengths"]) / max(1, len(stats["draft_lengths"]))
        rows.append(row)
        print(_format(row), flush=True)
    by_method = {r["method"]: r for r in rows}
    if "transformers" in by_method:
        for r in rows:
            if r["method"].startswith("ours") and r["identical_to_greedy"]:
                r["speedup_vs_transformers"] = by_method["transformers"]["seconds"] / r["seconds"]
    return rows


def _format(row: dict) -> str:
    extra = ""
    if "acceptance_rate" in row:
        extra = (f"  accept {row['acceptance_rate']:.2f}  tok/fwd {row['tokens_per_target_forward']:.2f}"
                 f"  k {row['mean_draft_length']:.1f}  draft {row['draft_fraction']:.0%}")
    speed = f"{row['speedup_vs_plain']:.2f}x" if row["speedup_vs_plain"] else "MISMATCH"
    return f"{row['setting']:<22} {row['method']:<28} {row['seconds']:7.1f} s  {speed}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--kinds", nargs="*", default=["prose", "code"], help="single-prompt settings (none: skip)")
    parser.add_argument("--batch", type=int, default=8, help="rows of the batched setting (0 skips it)")
    parser.add_argument("--batch-methods", nargs="+",
                        default=["plain", "plain-fastlinear", "ours-0.5b-int4", "ours-0.5b-int4-ctx64"],
                        choices=METHODS)
    parser.add_argument("--batch-threads", type=int, nargs="+", default=[1])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    target, tokenizer = load_model("qwen2.5-coder-1.5b")
    draft, _ = load_model("qwen2.5-coder-0.5b")
    hf_plugins.enable_speculative(target)
    drafts = build_drafts(target, draft, set(args.methods) | set(args.batch_methods))
    texts = prompts(tokenizer, max(1, args.batch // 2))
    rows = []
    for threads in args.threads:
        with pinned_threads(threads):
            for kind in args.kinds:
                ids = texts[kind][0]
                rows += run_setting(target, drafts, args.methods, ids, torch.ones_like(ids), args.new_tokens,
                                    f"{kind} {threads}t")
    if args.batch:
        tokenizer.padding_side = "left"
        docs = [tokenizer.decode(t[0]) for kind in ("prose", "code") for t in texts[kind]][: args.batch]
        batch = tokenizer(docs, return_tensors="pt", padding=True)
        for threads in args.batch_threads:
            with pinned_threads(threads):
                rows += run_setting(target, drafts, args.batch_methods, batch.input_ids, batch.attention_mask,
                                    args.new_tokens, f"batch{args.batch} {threads}t")
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"speculative_cpu-{datetime.date.today()}-{machine_name()}.json"
    out.write_text(json.dumps({"date": str(datetime.date.today()), "machine": machine_name(),
                               "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
