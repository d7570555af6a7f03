"""Held-out perplexity of bipolar-INT weights x activations bit widths, next to AWQ at the same weight bits.

    python benchmarks/bipolar_quality.py [--models smollm2-135m qwen2.5-coder-0.5b] [--w-bits 2 3 4 8]
        [--a-bits 4 8 16] [--search-bits 3 4] [--rtn-bits] [--wiki-docs 24] [--news-docs 73]

Variants per model, all with group size 128: fp32; AWQ's RTN and AWQ (scale search + clip, 8 x 512 tokens of the
packaged wiki calibration text) at ``--search-bits``; bipolar RTN at every ``w x a`` (a 16 = weight-only); bipolar
with AWQ scales (``scale_search="awq"``) weight-only at ``--search-bits``. Layers run the CPU packed path.

Targets (issue): bipolar W4A16 within 2% of AWQ-W4's perplexity; bipolar W3A16 with AWQ scales better than RTN-W3.
Writes ``benchmarks/results/bipolar_quality-<date>-<machine>.json`` after every variant (a cut run keeps its rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_name  # noqa: E402

import hf_plugins  # noqa: E402
from hf_plugins import AwqConfig, BipolarIntConfig  # noqa: E402
from hf_plugins.assets import load_model, load_text  # noqa: E402
from hf_plugins.demo import heldout_perplexity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 128


def _variants(args):
    """``(name, quantize(model, tokenizer) or None)`` in run order."""
    articles = load_text("wiki", split="calibration")
    calibration = dict(calibration_samples=8, calibration_seq_len=512)
    yield "fp32", None
    for bits in sorted(set(args.search_bits) | set(args.rtn_bits)):
        yield f"awq-rtn-w{bits}", lambda m, t, b=bits: hf_plugins.quantize(
            m, AwqConfig(bits=b, group_size=GROUP, scale_search=False, clip=False))
    for bits in args.search_bits:
        yield f"awq-w{bits}", lambda m, t, b=bits: hf_plugins.quantize(
            m, AwqConfig(bits=b, group_size=GROUP, **calibration), calibration_data=articles, tokenizer=t)
        yield f"bipolar-awq-w{bits}a16", lambda m, t, b=bits: hf_plugins.quantize(
            m, BipolarIntConfig(w_bits=b, group_size=GROUP, scale_search="awq", **calibration),
            calibration_data=articles, tokenizer=t)
    for w_bits in args.w_bits:
        for a_bits in args.a_bits:
            activations = None if a_bits == 16 else a_bits
            yield f"bipolar-w{w_bits}a{a_bits}", lambda m, t, w=w_bits, a=activations: hf_plugins.quantize(
                m, BipolarIntConfig(w_bits=w, a_bits=a, group_size=GROUP))


def _summary(rows: list[dict]) -> list[str]:
    """Bipolar vs AWQ on the same integer grid (ratios; the issue's bound is 2% at W4), and AWQ scales vs RTN."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ppl = {r["variant"]: r for r in rows if r["model"] == model}
        for text in ("wiki_ppl", "news_ppl"):
            for bits in range(1, 9):
                for ours, theirs in ((f"bipolar-w{bits}a16", f"awq-rtn-w{bits}"),
                                     (f"bipolar-awq-w{bits}a16", f"awq-w{bits}")):
                    if ours in ppl and theirs in ppl:
                        ratio = ppl[ours][text] / ppl[theirs][text]
                        lines.append(f"{model} {text}: {ours} / {theirs} = {ratio:.4f} "
                                     f"(within 2%: {'ok' if ratio <= 1.02 else 'MISSED'})")
                if f"bipolar-awq-w{bits}a16" in ppl and f"bipolar-w{bits}a16" in ppl:
                    searched, rtn = ppl[f"bipolar-awq-w{bits}a16"][text], ppl[f"bipolar-w{bits}a16"][text]
                    lines.append(f"{model} {text}: bipolar W{bits}A16 AWQ scales {searched:.3f} vs RTN {rtn:.3f} "
                                 f"(target better: {'ok' if searched < rtn else 'MISSED'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--w-bits", type=int, nargs="*", default=[2, 3, 4, 8])
    parser.add_argument("--a-bits", type=int, nargs="+", default=[4, 8, 16], help="16: weight-only")
    parser.add_argument("--search-bits", type=int, nargs="*", default=[3, 4], help="AWQ and bipolar-AWQ searches")
    parser.add_argument("--rtn-bits", type=int, nargs="*", default=[], help="AWQ RTN only, at these bits too")
    parser.add_argument("--skip", nargs="*", default=[], help="variants already measured (e.g. fp32)")
    parser.add_argument("--wiki-docs", type=int, default=24)
    parser.add_argument("--news-docs", type=int, default=73)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or RESULTS / f"bipolar_quality-{datetime.date.today()}-{machine_name()}.json"
    rows: list[dict] = []
    for name in args.models:
        for variant, apply in _variants(args):
            if variant in args.skip:
                continue
            model, tokenizer = load_model(name)
            start = time.perf_counter()
            if apply is not None:
                apply(model, tokenizer)
            seconds = time.perf_counter() - start
            row = {"model": name, "variant": variant, "quantize_s": seconds,
                   "wiki_ppl": heldout_perplexity(model, tokenizer, "wiki", args.wiki_docs),
                   "news_ppl": heldout_perplexity(model, tokenizer, "news", args.news_docs),
                   "eval_s": time.perf_counter() - start - seconds}
            rows.append(row)
            print(f"{name:<20}{variant:<20} wiki {row['wiki_ppl']:9.3f}  news {row['news_ppl']:9.3f}  "
                  f"({seconds:.0f} s quantize, {row['eval_s']:.0f} s eval)", flush=True)
            del model
            summary = _summary(rows)
            out.write_text(json.dumps({"date": str(datetime.date.today()), "machine": machine_name(),
                                       "args": {k: v for k, v in vars(args).items() if k != "out"},
                                       "rows": rows, "summary": summary}, indent=2, default=str))
    print("\n".join(_summary(rows)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
