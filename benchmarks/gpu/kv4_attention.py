"""Decode attention over the packed 4-bit KV cache vs torch SDPA over an fp16 cache, on one GPU (H100 / H200).

Shapes are Llama-3-8B's attention (32 query heads, 8 kv heads, head dim 128) at batch B and cached tokens T,
with 1 query token (decoding) and 4 (speculative verification). Three routes:

- ``kv4``: :func:`kv4_attention_triton`, reading nibbles and scales straight from the cache;
- ``dequant+sdpa``: dequantize the whole cache to fp16, then SDPA (what a cache returning dense tensors costs);
- baseline ``fp16 sdpa``: SDPA over an fp16 cache holding the same (dequantized) values.

Each route is first checked against fp32 attention over the dequantized cache (a failed check reports no
speed-up), then timed with ``do_bench`` medians; caches rotate so each call reads HBM, not L2. Prints a table;
writes JSON to ``$OUT`` if set, else ``benchmarks/results/``.

    python benchmarks/gpu/kv4_attention.py                                # GPU, about two minutes
    TRITON_INTERPRET=1 python benchmarks/gpu/kv4_attention.py --dry-run   # CPU: tiny shapes, checks and table

Target (ours, not the issue's): decoding at T >= 4k faster than fp16 SDPA, since it reads 4.5-5 bits per cached
element instead of 16.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_plugins.kernels.kv4_attention.reference import PackedKV, dequantize_packed  # noqa: E402
from hf_plugins.kernels.kv4_attention.triton import kv4_attention_triton  # noqa: E402
from hf_plugins.kernels.w4ax_gemm.reference import pack_int4  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_timing import benchmark_parser, cycled, finish, ratio_text, rotating, timer_for  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
KEY_GROUP, VALUE_GROUP = 32, 64  # the KV4 cache's defaults
SIZES = [(batch, tokens) for batch in (1, 8, 32) for tokens in (1024, 4096, 16384, 32768)
         if batch * tokens <= 8 * 32768]
DRY_SIZES = [(1, 37), (2, 130)]
QUERIES = (1, 4)


def random_cache(batch: int, tokens: int, group: int, device: str, generator: torch.Generator) -> PackedKV:
    """A packed cache of random codes with scales and minima like real keys/values (fp16, per token and group)."""
    codes = torch.randint(-8, 8, (batch, KV_HEADS, tokens, HEAD_DIM), generator=generator, dtype=torch.int8)
    scale = (torch.rand(batch, KV_HEADS, tokens, HEAD_DIM // group, generator=generator) * 0.1 + 0.01).half()
    minimum = (-8 * scale.float() + 0.05 * torch.randn(scale.shape, generator=generator)).half()
    return PackedKV(pack_int4(codes).to(device), scale.to(device), minimum.to(device), group, torch.float16)


def bench_size(batch: int, tokens: int, device: str, dry_run: bool) -> list[dict]:
    timer = timer_for(dry_run)
    generator = torch.Generator().manual_seed(batch * tokens)
    make = lambda: (random_cache(batch, tokens, KEY_GROUP, device, generator),  # noqa: E731
                    random_cache(batch, tokens, VALUE_GROUP, device, generator))
    packed_bytes = batch * KV_HEADS * tokens * HEAD_DIM  # two halves of a byte per element, keys and values
    caches = rotating(make, packed_bytes, dry_run)
    dense = [(dequantize_packed(k), dequantize_packed(v)) for k, v in caches]
    rows = []
    for queries in QUERIES:
        query = torch.randn(batch, HEADS, queries, HEAD_DIM, generator=generator).half().to(device)
        key, value = caches[0]
        exact = F.scaled_dot_product_attention(query.float(), dequantize_packed(key, torch.float32),
                                               dequantize_packed(value, torch.float32), is_causal=False,
                                               enable_gqa=True).transpose(1, 2)
        routes = {
            "kv4": lambda kv: kv4_attention_triton(query, kv[0], kv[1]),
            "dequant+sdpa": lambda kv: F.scaled_dot_product_attention(
                query, dequantize_packed(kv[0]), dequantize_packed(kv[1]), enable_gqa=True).transpose(1, 2),
        }
        # Every query sees every cached token: T cached tokens end with the queries' own.
        baseline = timer(cycled(lambda kv: F.scaled_dot_product_attention(query, kv[0], kv[1], enable_gqa=True),
                                dense))
        for name, route in routes.items():
            error = max_rel_error(route(caches[0]), exact) if queries == 1 else max_rel_error(
                route(caches[0])[:, -1], exact[:, -1])
            checked = error <= FLOAT_KERNEL_RTOL[torch.float16]
            ms = timer(cycled(route, caches)) if checked else None
            rows.append({"batch": batch, "tokens": tokens, "queries": queries, "route": name, "rel_error": error,
                         "checked": checked, "ms": ms, "fp16_sdpa_ms": baseline,
                         "vs_fp16_sdpa": None if ms is None else baseline / ms})
            print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    status = "" if row["checked"] else f"  CHECK FAILED (rel error {row['rel_error']:.2e})"
    ms = "-" if row["ms"] is None else f"{row['ms']:.4f}"
    return (f"B={row['batch']:<3} T={row['tokens']:<6} q={row['queries']} {row['route']:<13} {ms:>9} ms  "
            f"vs fp16 sdpa {ratio_text(row['vs_fp16_sdpa'])}{status}")


def targets(rows: list[dict]) -> list[str]:
    return [f"B={row['batch']} T={row['tokens']} q=1: kv4 {row['vs_fp16_sdpa']:.2f}x fp16 SDPA (target > 1x): "
            f"{'ok' if row['vs_fp16_sdpa'] > 1 else 'MISSED'}"
            for row in rows if row["route"] == "kv4" and row["queries"] == 1 and row["tokens"] >= 4096
            and row["ms"] is not None]


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    rows = [row for batch, tokens in (DRY_SIZES if args.dry_run else SIZES)
            for row in bench_size(batch, tokens, device, args.dry_run)]
    summary = targets(rows)
    return finish("kv4_attention", rows, summary, args, all(row["checked"] for row in rows))


if __name__ == "__main__":
    raise SystemExit(main())
