"""``hf-plugins demo``: float vs RTN vs AWQ on a packaged real model, and the helpers the CLI shares."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

PROMPT = "The history of the printing press"


def load_any(model: str):
    """``(model, tokenizer)`` from a local folder or a packaged model id, in fp32 eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets

    if Path(model).is_dir():
        return AutoModelForCausalLM.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(model)
    loaded, tokenizer = assets.load_model(model)
    return loaded.eval(), tokenizer


def save_atomically(model, tokenizer, out: Path) -> None:
    """Write model and tokenizer to a temporary sibling folder, then rename it to ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} exists and is not empty; pass a new folder or remove it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_and_reload(model, tokenizer, out: Path, probe: str):
    """Save ``model`` and ``tokenizer`` to ``out`` (atomically), reload the model with plain transformers and
    compare logits on ``probe``: returns ``(reloaded model, whether the logits are bit-identical)``."""
    from transformers import AutoModelForCausalLM

    save_atomically(model, tokenizer, out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = tokenizer(probe, return_tensors="pt")
    with torch.inference_mode():
        return reloaded, torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def heldout_perplexity(model, tokenizer, text: str, docs: int, window: int = 512, cache_factory=None) -> float:
    """Perplexity on the first ``docs`` held-out documents of a packaged text (first 6000 chars of each);
    ``cache_factory`` makes attention read keys and values through that cache (e.g. a 4-bit one)."""
    from . import assets
    from .evaluation import perplexity

    documents = assets.load_text(text, split="evaluation")[:docs]
    return perplexity(model, tokenizer, documents, window=window, max_chars=6000, progress=False,
                      cache_factory=cache_factory).perplexity


def greedy_sample(model, tokenizer, prompt: str, new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def decode_tokens_per_second(model, tokenizer, new_tokens: int) -> float:
    """Greedy decode speed (prefill excluded by timing a 1-token run first)."""
    inputs = tokenizer(PROMPT, return_tensors="pt")
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        start = time.perf_counter()
        model.generate(**inputs, **{**kwargs, "min_new_tokens": 1, "max_new_tokens": 1})
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(**inputs, **kwargs)
        total = time.perf_counter() - start
    return (new_tokens - 1) / max(total - prefill, 1e-9)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the decoder-block linears (float or quantized), excluding the output embedding."""
    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        if module is head or not hasattr(module, "in_features"):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _measure(name, model, tokenizer, args, seconds, out_dir) -> dict:
    linears = linear_weight_bytes(model)
    checkpoint = out_dir / name
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    save_atomically(model, tokenizer, checkpoint)
    return {
        "variant": name,
        "wiki_ppl": heldout_perplexity(model, tokenizer, "wiki", args.eval_docs),
        "news_ppl": heldout_perplexity(model, tokenizer, "news", args.eval_docs * 4),
        "linear_weight_mb": linears / 2**20,
        "decode_tok_s": decode_tokens_per_second(model, tokenizer, args.new_tokens),
        "calibration_s": seconds,
        "checkpoint_mb": _folder_bytes(checkpoint) / 2**20,
        "sample": greedy_sample(model, tokenizer, PROMPT, 24),
    }


def _print_table(rows: list[dict]) -> None:
    header = f"{'variant':<10}{'wiki ppl':>10}{'news ppl':>10}{'linears MB':>12}{'decode tok/s':>14}{'calib s':>9}{'ckpt MB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['variant']:<10}{r['wiki_ppl']:>10.3f}{r['news_ppl']:>10.3f}{r['linear_weight_mb']:>12.1f}"
            f"{r['decode_tok_s']:>14.2f}{r['calibration_s']:>9.1f}{r['checkpoint_mb']:>9.1f}"
        )
    for r in rows:
        print(f"\n[{r['variant']}] {r['sample']}")


def _plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["linear_weight_mb"], r["wiki_ppl"], s=60)
        ax.annotate(r["variant"], (r["linear_weight_mb"], r["wiki_ppl"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("decoder linear weights (MB)")
    ax.set_ylabel("held-out wiki perplexity")
    ax.set_title("quality vs memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args, quant_config) -> int:
    """Quantize the packaged model two ways, measure all three variants, print and save the comparison."""
    from . import quantize

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in ("fp32", "rtn", "awq"):
        model, tokenizer = load_any(args.model)
        start = time.perf_counter()
        if variant != "fp32":
            quantize(model, quant_config(args, variant), tokenizer=tokenizer)
        seconds = time.perf_counter() - start if variant == "awq" else 0.0
        name = variant if variant == "fp32" else f"{variant}-w{args.bits}g{args.group_size}"
        rows.append(_measure(name, model, tokenizer, args, seconds, out_dir))
        del model
    _print_table(rows)
    result = {"model": args.model, "threads": torch.get_num_threads(), "results": rows}
    (out_dir / "demo-results.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out_dir / 'demo-results.json'}")
    if _plot(rows, out_dir / "quality-vs-memory.png"):
        print(f"wrote {out_dir / 'quality-vs-memory.png'}")
    else:
        print("chart skipped: pip install 'hf-plugins[plot]' for the PNG")
    return 0
