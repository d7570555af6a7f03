"""Train a small gated-linear-attention LM (or a same-size Hyena or softmax Llama) on real text with Accelerate.

    accelerate launch recipes/train_gla.py --text wiki --steps 300                 # GLA
    accelerate launch recipes/train_gla.py --text wiki --steps 300 --arch softmax  # the same-size softmax baseline
    accelerate launch recipes/train_gla.py --text wiki --steps 300 --arch hyena    # Hyena (recipes/train_hyena.py)
    python recipes/train_gla.py --steps 20 --hidden 128 --layers 2                 # a quick CPU run

The packaged text's "calibration" documents are packed into ``--seq-len`` token blocks (SmolLM2's tokenizer) for
training, its "evaluation" documents for held-out perplexity. Cosine schedule with warmup, gradient clipping, a
progress bar, ``accelerator.save_state`` checkpoints every ``--save-every`` steps (``--resume`` continues from
one) and a final ``save_pretrained`` model + tokenizer that ``AutoModelForCausalLM.from_pretrained`` reloads after
``import hf_plugins``. Prints and writes ``summary.json`` (losses, held-out perplexity, tokens/s).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

import hf_plugins
from hf_plugins.assets import load_text
from hf_plugins.assets.models import model_path
from hf_plugins.demo import save_atomically


def token_blocks(tokenizer, text: str, split: str, seq_len: int) -> torch.Tensor:
    """``[blocks, seq_len]`` consecutive tokens of the packaged ``text`` documents in ``split``."""
    ids = tokenizer("\n\n".join(load_text(text, split)), return_tensors="pt").input_ids[0]
    blocks = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    if blocks.shape[0] == 0:
        raise ValueError(f"the {text} {split} text has fewer than {seq_len} tokens; lower --seq-len.")
    return blocks


ARCHS = ("gla", "hyena", "softmax")


def build_model(args, vocab_size: int) -> torch.nn.Module:
    """A GLA LM (``--arch gla``), a Hyena LM or a Llama of the same width, depth and MLP width."""
    common = dict(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  intermediate_size=args.hidden * 8 // 3 // 64 * 64, tie_word_embeddings=True)
    if args.arch == "softmax":
        return LlamaForCausalLM(LlamaConfig(num_attention_heads=args.heads, max_position_embeddings=args.seq_len,
                                            **common))
    if args.arch == "hyena":
        return hf_plugins.HyenaForCausalLM(hf_plugins.HyenaConfig(max_position_embeddings=args.seq_len, **common))
    return hf_plugins.GLAForCausalLM(hf_plugins.GLAConfig(num_heads=args.heads, attn_layers=args.attn_layers,
                                                          use_short_conv=args.short_conv, **common))


@torch.no_grad()
def heldout_perplexity(model, blocks: torch.Tensor, batch: int, accelerator: Accelerator) -> float:
    """exp of the mean next-token loss over every held-out block."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch):
        chunk = blocks[start : start + batch].to(accelerator.device)
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
        total += loss.item() * chunk.shape[0]
        count += chunk.shape[0]
    model.train()
    return math.exp(total / count)


def parse_args(argv: list[str] | None = None, arch: str = "gla") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=arch, choices=ARCHS, help="the token mixer (default: %(default)s)")
    parser.add_argument("--text", default="wiki", choices=("wiki", "news", "code"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--attn-layers", type=int, nargs="*", default=[], help="softmax blocks of a hybrid")
    parser.add_argument("--short-conv", action="store_true", help="short convolutions on q, k, v")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks for perplexity")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--out", default="gla-run")
    parser.add_argument("--resume", default=None, help="a checkpoint folder written by --save-every")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, arch: str = "gla") -> dict:
    args = parse_args(argv, arch)
    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    train = token_blocks(tokenizer, args.text, "calibration", args.seq_len)
    heldout = token_blocks(tokenizer, args.text, "evaluation", args.seq_len)[: args.eval_blocks]
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(args.seed))
    model = build_model(args, len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, min(args.warmup, args.steps), args.steps)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    out = Path(args.out)
    first_step = 0
    if args.resume:
        accelerator.load_state(args.resume)
        first_step = int(Path(args.resume).name.removeprefix("step-"))

    losses, started = [], time.perf_counter()
    model.train()
    with tqdm(range(first_step, args.steps), desc=args.arch, unit="step",
              disable=not accelerator.is_main_process) as bar:
        for step in bar:
            rows = order[torch.arange(step * args.batch, (step + 1) * args.batch) % train.shape[0]]
            batch = train[rows].to(accelerator.device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                accelerator.save_state(str(out / f"step-{step + 1}"))
    seconds = time.perf_counter() - started

    summary = {
        "model": args.arch,
        "parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "steps": args.steps, "losses": losses,
        "heldout_perplexity": heldout_perplexity(model, heldout, args.batch, accelerator),
        "tokens_per_second": len(losses) * args.batch * args.seq_len / max(seconds, 1e-9),
        "args": vars(args),
    }
    if accelerator.is_main_process:
        save_atomically(accelerator.unwrap_model(model), tokenizer, out / "final")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"{summary['model']}: {summary['parameters'] / 1e6:.1f}M parameters, loss "
                          f"{losses[0]:.3f} -> {losses[-1]:.3f}, held-out perplexity "
                          f"{summary['heldout_perplexity']:.1f}, {summary['tokens_per_second']:.0f} tokens/s")
    return summary


if __name__ == "__main__":
    main()
