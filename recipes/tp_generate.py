"""Tensor-parallel generation: every rank holds a shard of each layer, and the ranks decode one batch together.

    # GPUs (NCCL):
    accelerate launch --num_processes 2 recipes/tp_generate.py --model smollm2-135m
    # CPUs (gloo): `accelerate launch --cpu --num_processes 2` silently starts ONE process; this starts two:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no recipes/tp_generate.py --model smollm2-135m

The plan comes from ``hf_plugins.parallel.auto_tp_plan`` (derived from the model's dataflow; for SmolLM2-135M's 9
query heads in 3 key/value groups, 2 ranks hold 2 and 1 groups). ``--check`` (default) first decodes unsharded
on every rank and reports whether the tensor-parallel tokens are identical. ``--model`` is a packaged model id
(see hf_plugins.assets) or a local folder.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_plugins.assets import load_text
from hf_plugins.demo import load_any
from hf_plugins.parallel import auto_tp_plan, tensor_parallel


class _Progress(StoppingCriteria):
    """Advances a progress bar once per decoding step; never stops generation."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds (its shards, not the full tensors)."""
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def decode(model, batch, new_tokens: int, show: bool, label: str) -> tuple[torch.Tensor, float]:
    with tqdm(total=new_tokens, desc=label, unit="tok", disable=not show) as bar, torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([_Progress(bar)]))
        return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the batch (held-out Wikipedia)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="decode unsharded first and compare the tokens")
    args = parser.parse_args()

    accelerator = Accelerator()
    main_rank = accelerator.is_main_process
    if accelerator.num_processes < 2:
        accelerator.print("One process: nothing to shard. On CPUs, `accelerate launch --cpu --num_processes N` starts "
                          "one process; use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
                          "--num_machines 1 ...` (see this file's docstring).")
    with accelerator.main_process_first():  # the first rank fills the model cache, the others read it
        model, tokenizer = load_any(args.model)
    model.to(accelerator.device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    docs = [doc[:400] for doc in load_text("wiki", "evaluation")[: args.prompts]]
    batch = tokenizer(docs, return_tensors="pt", padding=True).to(accelerator.device)

    reference = None
    if args.check:
        reference, single_seconds = decode(model, batch, args.new_tokens, main_rank, "unsharded")
    full_bytes = local_parameter_bytes(model)
    if accelerator.num_processes > 1:
        plan = auto_tp_plan(model)
        accelerator.print("plan:", *(f"  {key}: {style}" for key, style in plan.items()), sep="\n")
        tensor_parallel(model)  # verifies the sharded logits against the unsharded ones
    out, seconds = decode(model, batch, args.new_tokens, main_rank, f"tensor-parallel x{accelerator.num_processes}")

    local_bytes = local_parameter_bytes(model)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = out.shape[0] * args.new_tokens
    stats = torch.tensor([local_bytes / 2**20, peak_rss_mb], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(accelerator.num_processes)]
    if accelerator.num_processes > 1:
        dist.all_gather(gathered, stats)
    else:
        gathered = [stats]
    for row in out[:, batch.input_ids.shape[1] :][:2]:
        accelerator.print("---", tokenizer.decode(row, skip_special_tokens=True)[:200])
    accelerator.print(f"\n{args.model}: {out.shape[0]} prompts x {args.new_tokens} tokens on "
                      f"{accelerator.num_processes} rank(s) ({accelerator.device.type}): {tokens / seconds:.1f} tok/s")
    if reference is not None:
        accelerator.print(f"unsharded: {tokens / single_seconds:.1f} tok/s; tensor-parallel tokens identical: "
                          f"{torch.equal(out, reference)}")
    for rank, (weights_mb, rss_mb) in enumerate(gathered):
        accelerator.print(f"rank {rank}: weights {weights_mb:.0f} MiB (unsharded {full_bytes / 2**20:.0f} MiB), "
                          f"peak RSS {rss_mb:.0f} MiB")


if __name__ == "__main__":
    main()
