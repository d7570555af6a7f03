"""Pipeline-parallel training of a causal LM: automatic stage split, GPipe / 1F1B / interleaved 1F1B schedules.

    # GPUs (NCCL):
    accelerate launch --num_processes 2 recipes/pp_train.py --schedule interleaved-1f1b
    # CPUs (gloo): `accelerate launch --cpu --num_processes 2` silently starts ONE process; this starts two:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no recipes/pp_train.py --schedule interleaved-1f1b

Each rank keeps only its stages' layers (balanced by FLOPs, or by memory with ``--balance params``); the batch
is cut into ``--microbatches`` microbatches. Prints the loss per step, tokens/s, the measured bubble fraction of
each rank next to Megatron-LM's ``(p-1)/m`` (``(p-1)/(v m)`` interleaved), and each rank's parameter memory.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from accelerate import Accelerator
from tqdm.auto import tqdm

from hf_plugins.assets import load_text
from hf_plugins.demo import load_any
from hf_plugins.parallel.pipeline import BALANCES, SCHEDULES, build_pipeline


def token_blocks(tokenizer, seq_len: int, count: int) -> torch.Tensor:
    """``[count, seq_len + 1]`` consecutive token blocks of the packaged Wikipedia training text."""
    ids = tokenizer("\n\n".join(load_text("wiki", "calibration")), return_tensors="pt").input_ids[0]
    blocks = ids[: (ids.numel() // (seq_len + 1)) * (seq_len + 1)].view(-1, seq_len + 1)
    if blocks.shape[0] < count:
        raise ValueError(f"the text gives {blocks.shape[0]} blocks of {seq_len + 1} tokens; lower --batch/--steps.")
    return blocks[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--stages-per-rank", type=int, default=None, help="virtual stages (interleaved 1F1B)")
    parser.add_argument("--balance", default="flops", choices=BALANCES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-5)
    args = parser.parse_args()

    accelerator = Accelerator()
    world = accelerator.num_processes
    if world < 2:
        raise SystemExit("Pipeline parallelism needs 2+ processes. On CPUs, `accelerate launch --cpu --num_processes "
                         "N` starts one; use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
                         "--num_machines 1 ...` (see this file's docstring).")
    with accelerator.main_process_first():
        model, tokenizer = load_any(args.model)
    model.to(accelerator.device).train()
    pipeline = build_pipeline(model, schedule=args.schedule, microbatches=args.microbatches,
                              stages_per_rank=args.stages_per_rank, balance=args.balance, seq_len=args.seq_len)
    del model  # layers of other ranks' stages are freed
    virtual = len(pipeline.stages)
    accelerator.print(f"{args.schedule}: {world * virtual} stages over {world} ranks, decoder layers per stage "
                      f"{[b - a for a, b in pipeline.ranges]}")
    optimizer = torch.optim.AdamW(pipeline.parameters(), lr=args.lr)
    blocks = token_blocks(tokenizer, args.seq_len, args.batch * args.steps).to(accelerator.device)
    holds_last = any(stage.last for stage in pipeline.stages)

    losses, bubbles, seconds = [], [], []
    with tqdm(range(args.steps), desc=f"pipeline x{world}", disable=not holds_last) as bar:
        for step in bar:
            batch = blocks[step * args.batch : (step + 1) * args.batch]
            optimizer.zero_grad(set_to_none=True)
            step_losses = pipeline.step(batch[:, :-1], batch[:, 1:])
            optimizer.step()
            seconds.append(pipeline.step_seconds)
            bubbles.append(pipeline.bubble_fraction)
            if step_losses:
                losses.append(torch.stack(step_losses).mean().item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")

    measured = seconds[1:] or seconds  # the first step also infers stage shapes
    summary = torch.tensor([
        sum(bubbles[1:] or bubbles) / len(bubbles[1:] or bubbles),
        sum(p.numel() * p.element_size() for p in pipeline.parameters()) / 2**20,
    ], dtype=torch.float64)
    gathered = [torch.zeros_like(summary) for _ in range(world)]
    dist.all_gather(gathered, summary.to(accelerator.device))
    if holds_last:
        tokens = args.batch * args.seq_len
        print(f"losses: {' '.join(f'{loss:.3f}' for loss in losses)}")
        print(f"{tokens * len(measured) / sum(measured):.0f} tokens/s over steps 2..{args.steps}")
    theory = (world - 1) / (virtual * args.microbatches)
    accelerator.print(f"bubble fraction (idle / busy time), theory (p-1)/({'v m' if virtual > 1 else 'm'}) = "
                      f"{theory:.3f}:")
    for rank, (bubble, megabytes) in enumerate(gathered):
        accelerator.print(f"  rank {rank}: bubble {bubble.item():.3f}, stage parameters {megabytes.item():.0f} MiB")


if __name__ == "__main__":
    main()
