"""Long-context training with ring-attention sequence parallelism: no rank ever holds the whole sequence.

    # GPUs (NCCL):
    accelerate launch --num_processes 2 recipes/sp_long_context.py --seq-len 16384
    # CPUs (gloo): `accelerate launch --cpu --num_processes 2` silently starts ONE process; this starts two:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no recipes/sp_long_context.py --seq-len 16384

Each rank takes a zig-zag slice of one ``--seq-len``-token sequence (packaged Wikipedia text), runs the model with
``attn_implementation="ring_attention"`` (keys and values travel around the ranks), and the gradients are
averaged over the ranks. Prints loss, tokens/s and each rank's peak memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from tqdm.auto import tqdm

import hf_plugins  # noqa: F401 - registers ring_attention
from hf_plugins.assets import load_text
from hf_plugins.demo import load_any
from hf_plugins.parallel.sequence import shard_for_group, sharded_next_token_loss


def long_sequence(tokenizer, length: int) -> torch.Tensor:
    """``[1, length]`` tokens of the packaged Wikipedia text, repeated if it is shorter."""
    ids = tokenizer("\n\n".join(load_text("wiki")), return_tensors="pt").input_ids[0]
    return ids.repeat(-(-length // ids.numel()))[:length][None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute layer activations in backward (activation memory ~ one layer)")
    args = parser.parse_args()

    accelerator = Accelerator()
    group, world = dist.group.WORLD, accelerator.num_processes
    if world < 2:
        accelerator.print("One process: the whole sequence stays on it. On CPUs, `accelerate launch --cpu "
                          "--num_processes N` starts one process; see this file's docstring.")
    with accelerator.main_process_first():
        model, tokenizer = load_any(args.model)
    model.to(accelerator.device).train()
    model.set_attn_implementation("ring_attention")
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    ids = long_sequence(tokenizer, args.seq_len + 1).to(accelerator.device)
    shard = shard_for_group(args.seq_len, group, accelerator.device)
    inputs, targets = shard.take(ids[:, :-1]), shard.take(ids[:, 1:])
    accelerator.print(f"{args.seq_len} tokens over {world} rank(s): {inputs.shape[1]} per rank (zig-zag chunks)")

    losses, seconds = [], []
    for _ in tqdm(range(args.steps), desc=f"ring attention x{world}", disable=not accelerator.is_main_process):
        start = time.perf_counter()
        logits = model(inputs, position_ids=shard.position_ids(1), sequence_group=group, use_cache=False).logits
        loss = sharded_next_token_loss(logits, targets, shard, group)
        del logits
        loss.backward()
        for param in model.parameters():  # replicated weights: average the ranks' gradients
            dist.all_reduce(param.grad, group=group)
            param.grad /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        losses.append(total.item() / world)
        seconds.append(time.perf_counter() - start)

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak.to(accelerator.device))
    accelerator.print(f"losses: {' '.join(f'{loss:.3f}' for loss in losses)}; "
                      f"{args.seq_len / (sum(seconds) / len(seconds)):.0f} tokens/s")
    for rank, megabytes in enumerate(peaks):
        accelerator.print(f"rank {rank}: peak RSS {megabytes.item():.0f} MiB")


if __name__ == "__main__":
    main()
