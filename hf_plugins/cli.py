"""The ``hf-plugins`` command: demo, quantize, eval, generate (plain or speculative), bench hw. Uses only the public
API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import demo as demo_job
from .cli_generate import add_generate_parser, run_generate

logger = logging.getLogger("hf_plugins.cli")


def _add_quant_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    parser.add_argument("--group-size", type=int, default=128, help="32, 64, 128 or -1 per-channel (default 128)")
    parser.add_argument("--calibration", default="wiki", help="packaged text: wiki, news or code (default wiki)")
    parser.add_argument("--calibration-samples", type=int, default=None, help="calibration sequences")
    parser.add_argument("--calibration-seq-len", type=int, default=None, help="tokens per calibration sequence")
    parser.add_argument(
        "--clip", choices=["auto", "on", "off"], default="auto",
        help="AWQ weight clipping: auto keeps it only if it lowers the loss on held-out calibration text (default)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-plugins", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fp32 vs RTN vs AWQ on a packaged real model: quality, memory, speed")
    demo.add_argument("--model", default="smollm2-135m", help="packaged model id (default smollm2-135m)")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for JSON, chart, checkpoints")
    demo.add_argument("--eval-docs", type=int, default=8, help="held-out documents per text (default 8)")
    demo.add_argument("--new-tokens", type=int, default=32, help="tokens for the decode-speed sample")
    _add_quant_args(demo)

    quant = sub.add_parser("quantize", help="quantize a model folder or packaged model id and save it")
    quant.add_argument("model", help="a model folder or a packaged model id (e.g. smollm2-135m)")
    quant.add_argument("--method", choices=["awq", "rtn", "bipolar-int", "w4a4kv4"], default="awq")
    quant.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    _add_quant_args(quant)
    quant.add_argument("--w-bits", type=int, default=None, help="bipolar-int weight bits, 1..8 (default --bits)")
    quant.add_argument("--a-bits", type=int, default=None, help="bipolar-int activation bits, 1..8 (default: float)")
    quant.add_argument("--scale-search", choices=["awq", "none"], default="awq",
                       help="bipolar-int: AWQ's activation-aware scales on the integer grid, or plain RTN")
    quant.add_argument("--outlier-blocks", default="auto",
                       help="w4a4kv4: 128-channel activation blocks per linear kept in 8 bits: auto (FMPQ picks per "
                            "layer), all (W4A8) or a count (0: plain W4A4)")
    quant.add_argument("--kv-bits", type=int, choices=[4, 16], default=4, help="w4a4kv4: KV cache bits (default 4)")

    evaluate = sub.add_parser("eval", help="held-out perplexity of a model folder or packaged model id")
    evaluate.add_argument("model")
    evaluate.add_argument("--text", action="append", choices=["wiki", "news", "code"], help="repeatable; default wiki")
    evaluate.add_argument("--docs", type=int, default=8, help="documents per text")
    evaluate.add_argument("--window", type=int, default=512)
    evaluate.add_argument("--json", type=Path, help="also write the results here")

    add_generate_parser(sub)

    bench = sub.add_parser("bench", help="measure this machine")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    hardware = bench_sub.add_parser("hw", help="this machine's roofline: matmul peak per dtype, memory bandwidth, "
                                               "host cost of one op call")
    hardware.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    hardware.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    hardware.add_argument("--json", type=Path, help="also write the figures here (atomically)")
    return parser


def _quant_config(args: argparse.Namespace, method: str):
    from . import AwqConfig, BipolarIntConfig, W4A4KV4Config

    extra = {}
    if args.calibration_samples is not None:
        extra["calibration_samples"] = args.calibration_samples
    if args.calibration_seq_len is not None:
        extra["calibration_seq_len"] = args.calibration_seq_len
    if method == "w4a4kv4":
        blocks = args.outlier_blocks if args.outlier_blocks in ("auto", "all") else _int_arg(args.outlier_blocks)
        calibration = None if blocks in (0, "all") else args.calibration  # fixed layouts need no calibration
        return W4A4KV4Config(group_size=args.group_size, outlier_blocks=blocks, kv_bits=args.kv_bits,
                             calibration=calibration, **extra)
    searches = method == "awq" or (method == "bipolar-int" and getattr(args, "scale_search", "none") == "awq")
    clip = {"auto": "auto", "on": True, "off": False}[args.clip] if searches else False
    if method == "bipolar-int":
        return BipolarIntConfig(
            w_bits=args.w_bits or args.bits, a_bits=args.a_bits, group_size=args.group_size,
            calibration=args.calibration if searches else None, scale_search="awq" if searches else None,
            clip=clip, **extra,
        )
    return AwqConfig(
        bits=args.bits, group_size=args.group_size, calibration=args.calibration if searches else None,
        scale_search=searches, clip=clip, **extra,
    )


def _int_arg(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--outlier-blocks must be auto, all or an int >= 0, got {value!r}") from None


def _bits_label(config) -> str:
    if hasattr(config, "outlier_blocks"):
        return f"W4A4 (outlier blocks {config.outlier_blocks}) KV{config.kv_bits}"
    if hasattr(config, "w_bits"):
        return f"W{config.w_bits}" + (f"A{config.a_bits}" if config.a_bits else "")
    return f"W{config.bits}"


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import quantize
    from .demo import load_any, save_atomically

    model, tokenizer = load_any(args.model)
    config = _quant_config(args, args.method)
    report = quantize(model, config, tokenizer=tokenizer)
    if report is not None:
        print(report)
    save_atomically(model, tokenizer, args.out)
    print(f"saved {args.method.upper()} {_bits_label(config)} g{args.group_size} model to {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .demo import heldout_perplexity, load_any

    model, tokenizer = load_any(args.model)
    results = {
        text: heldout_perplexity(model, tokenizer, text, args.docs, window=args.window)
        for text in (args.text or ["wiki"])
    }
    for text, ppl in results.items():
        print(f"{text:>6}: perplexity {ppl:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _cmd_bench_hw(args: argparse.Namespace) -> int:
    import torch

    from . import hardware
    from .assets._store import atomic_write_json

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    roofline = hardware.measure(args.device)
    print(f"{roofline.device}, {roofline.threads} thread(s)")
    for dtype, routes in roofline.matmul_tflops.items():
        unit = "TOPS" if dtype == "int8" else "TFLOPS"
        print(f"  matmul {dtype:>5}: " + ", ".join(f"{route} {value:.3f} {unit}" for route, value in routes.items()))
    print("  bandwidth: " + ", ".join(f"{name} {value:.1f} GB/s" for name, value in roofline.bandwidth_gbs.items()))
    print("  one call: " + ", ".join(f"{name} {value:.1f} us" for name, value in roofline.call_us.items()))
    if roofline.reference:
        print(f"  published ({roofline.reference['source']}, {roofline.reference['card']}): " + ", ".join(
            f"{name} {value}" for name, value in roofline.reference.items() if name not in ("source", "card")))
    if args.json:
        atomic_write_json(args.json, roofline.as_dict())
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .demo import load_any

    return run_generate(args, load_any)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {
        "demo": lambda a: demo_job.run(a, _quant_config),
        "quantize": _cmd_quantize,
        "eval": _cmd_eval,
        "generate": _cmd_generate,
        "bench": _cmd_bench_hw,
    }
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as error:
        print(f"hf-plugins {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
