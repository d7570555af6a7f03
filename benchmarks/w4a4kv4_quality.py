"""Held-out perplexity of COMET-style W4A4KV4: FMPQ vs plain W4A4 vs W4A16 and W4A8, with and without the 4-bit
KV cache.

    python benchmarks/w4a4kv4_quality.py [--models smollm2-135m qwen2.5-coder-0.5b] [--wiki-docs 24]
        [--news-docs 73] [--skip ...]

Variants per model (group size 128, the same symmetric 4-bit weights in every W4 row):

- ``fp32`` and ``fp32+kv4``;
- ``w4a16``: the W4 weights with float activations (the W4A4 model with its linears dequantized);
- ``w4a8``: every activation block in 8 bits (``outlier_blocks="all"``);
- ``w4a4-rtn``: plain W4A4 (``outlier_blocks=0``: no reordering, no 8-bit block);
- ``w4a4-fmpq``: FMPQ (``outlier_blocks="auto"``, 8 x 512 tokens of the packaged wiki calibration text), and
  ``w4a4-fmpq+kv4``: the same with attention reading a 4-bit KV cache (``KV4Cache`` defaults).

Targets (issue): FMPQ recovers at least half of the perplexity gap between plain W4A4 and W4A16; KV4 adds < 2%
perplexity. Writes ``benchmarks/results/w4a4kv4_quality-<date>-<machine>.json`` after every variant.
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
from hf_plugins import KV4Cache, W4A4KV4Config  # noqa: E402
from hf_plugins.assets import load_model, load_text  # noqa: E402
from hf_plugins.demo import heldout_perplexity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION = dict(calibration_samples=8, calibration_seq_len=512)


def _w4a16(model, tokenizer):
    hf_plugins.quantize(model, W4A4KV4Config(outlier_blocks=0, kv_bits=16))
    model.dequantize()


def _variants():
    """``(name, quantize(model, tokenizer) or None, KV4 cache on)`` in run order."""
    articles = load_text("wiki", split="calibration")

    def fmpq(model, tokenizer):
        return hf_plugins.quantize(model, W4A4KV4Config(outlier_blocks="auto", kv_bits=16, **CALIBRATION),
                                   calibration_data=articles, tokenizer=tokenizer)

    yield "fp32", None, False
    yield "fp32+kv4", None, True
    yield "w4a16", _w4a16, False
    yield "w4a8", lambda m, t: hf_plugins.quantize(m, W4A4KV4Config(outlier_blocks="all", kv_bits=16)), False
    yield "w4a4-rtn", lambda m, t: hf_plugins.quantize(m, W4A4KV4Config(outlier_blocks=0, kv_bits=16)), False
    yield "w4a4-fmpq", fmpq, False
    yield "w4a4-fmpq+kv4", fmpq, True


def _summary(rows: list[dict]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ppl = {r["variant"]: r for r in rows if r["model"] == model}
        for text in ("wiki_ppl", "news_ppl"):
            if {"w4a16", "w4a4-rtn", "w4a4-fmpq"} <= set(ppl):
                gap = ppl["w4a4-rtn"][text] - ppl["w4a16"][text]
                recovered = (ppl["w4a4-rtn"][text] - ppl["w4a4-fmpq"][text]) / gap if gap > 0 else float("nan")
                lines.append(f"{model} {text}: FMPQ recovers {recovered:.1%} of the W4A4-RTN -> W4A16 gap "
                             f"(target >= 50%: {'ok' if recovered >= 0.5 else 'MISSED'})")
            for base in ("fp32", "w4a4-fmpq"):
                if base in ppl and f"{base}+kv4" in ppl:
                    added = ppl[f"{base}+kv4"][text] / ppl[base][text] - 1
                    lines.append(f"{model} {text}: KV4 on {base} adds {added:+.2%} (target < 2%: "
                                 f"{'ok' if added < 0.02 else 'MISSED'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--skip", nargs="*", default=[], help="variants not to run (e.g. fp32)")
    parser.add_argument("--wiki-docs", type=int, default=24)
    parser.add_argument("--news-docs", type=int, default=73)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or RESULTS / f"w4a4kv4_quality-{datetime.date.today()}-{machine_name()}.json"
    rows: list[dict] = []
    for name in args.models:
        for variant, apply, kv4 in _variants():
            if variant in args.skip:
                continue
            model, tokenizer = load_model(name)
            start = time.perf_counter()
            report = apply(model, tokenizer) if apply is not None else None
            seconds = time.perf_counter() - start
            cache = (lambda m=model: KV4Cache(m.config)) if kv4 else None
            row = {"model": name, "variant": variant, "quantize_s": seconds,
                   "wiki_ppl": heldout_perplexity(model, tokenizer, "wiki", args.wiki_docs, cache_factory=cache),
                   "news_ppl": heldout_perplexity(model, tokenizer, "news", args.news_docs, cache_factory=cache),
                   "eval_s": time.perf_counter() - start - seconds}
            if isinstance(report, dict):
                blocks = [entry["outlier_blocks"] for entry in report.values()]
                row["outlier_blocks"] = {"mean": sum(blocks) / len(blocks), "max": max(blocks),
                                         "layers_with_8bit": sum(b > 0 for b in blocks), "layers": len(blocks)}
            rows.append(row)
            print(f"{name:<20}{variant:<16} wiki {row['wiki_ppl']:9.3f}  news {row['news_ppl']:9.3f}  "
                  f"({seconds:.0f} s quantize, {row['eval_s']:.0f} s eval)", flush=True)
            del model
            out.write_text(json.dumps({"date": str(datetime.date.today()), "machine": machine_name(),
                                       "args": {k: v for k, v in vars(args).items() if k != "out"},
                                       "rows": rows, "summary": _summary(rows)}, indent=2, default=str))
    print("\n".join(_summary(rows)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
