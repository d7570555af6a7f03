"""Tensor, pipeline and sequence parallelism at 2 ranks on CPU: communication, bubble, memory, time per step.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no benchmarks/parallel_cpu.py [--parts tp pp sp]

Real model: SmolLM2-135M (fp32). Each part first checks correctness against one process, then measures:

- ``tp``: greedy decoding of 4 prompts. Per decode step: time (TP=2 against the unsharded model on one rank's
  core), collectives and bytes (profiler), and weights per rank against the unsharded model.
- ``pp``: training steps with GPipe, 1F1B and interleaved 1F1B at m = 4 and 8 microbatches. Measured bubble
  fraction against ``(p-1)/m`` or ``(p-1)/(v m)``, point-to-point bytes per step, and stage parameters per rank.
- ``sp``: a ring-attention forward and backward over one sequence. Time and bytes per step, and activation
  memory per rank (bytes autograd saves for the backward pass, weights excluded) at SP=2 against the whole
  sequence on one rank.

Rank 0 writes ``results/parallel_cpu-<date>-<machine>.json``. Ratios compare runs on this machine only; gloo on
one host is not a network.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_plugins  # noqa: E402,F401 - registers ring_attention
from _timing import machine_name  # noqa: E402
from hf_plugins.assets import load_model, load_text  # noqa: E402
from hf_plugins.parallel import tensor_parallel  # noqa: E402
from hf_plugins.parallel.pipeline import build_pipeline, next_token_loss  # noqa: E402
from hf_plugins.parallel.sequence import shard_for_group, sharded_next_token_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_ELEMENT_BYTES = {"float": 4, "double": 8, "long int": 8, "int": 4, "c10::Half": 2, "c10::BFloat16": 2}


def communication(profile) -> dict[str, dict[str, float]]:
    """``{collective: {"calls", "bytes"}}`` from the gloo/nccl events of a ``torch.profiler`` run."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "bytes": 0})
    for event in profile.events():
        if not event.name.startswith(("gloo:", "nccl:")):
            continue
        entry = totals[event.name]
        entry["calls"] += 1
        for shape, dtype in zip(event.input_shapes or [], event.input_dtypes or []):
            if shape:
                entry["bytes"] += _ELEMENT_BYTES.get(dtype, 4) * int(torch.tensor(shape).prod())
    return {name: dict(entry) for name, entry in totals.items()}


class SavedActivations:
    """Bytes autograd keeps for the backward pass during a forward (distinct storages): the activation memory,
    independent of how the allocator reuses freed blocks (a process's RSS high-water mark is not)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def release_freed_memory() -> None:
    """Collect cycles and hand freed heap pages back to the OS (glibc keeps them otherwise), so one part's peak
    does not stack on the next one's on a 24 GB machine."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def tensor_parallel_part(model, tokenizer, new_tokens: int = 16) -> dict:
    tokenizer.padding_side = "left"
    batch = tokenizer([d[:300] for d in load_text("wiki", "evaluation")[:4]], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        start = time.perf_counter()
        reference = model.generate(**batch, **kwargs)
        single = (time.perf_counter() - start) / new_tokens
    full_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    tensor_parallel(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        sharded = (time.perf_counter() - start) / new_tokens
        with torch.profiler.profile(record_shapes=True) as profile:
            model(out)  # one full forward: the prefill's collectives
        with torch.profiler.profile(record_shapes=True) as step_profile:
            model.generate(**batch, max_new_tokens=2, do_sample=False)
    local_mib = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters()) / 2**20
    return {
        "identical_tokens": bool(torch.equal(out, reference)),
        "decode_step_ms_unsharded": single * 1e3,
        "decode_step_ms_tp2": sharded * 1e3,
        "forward_collectives": communication(profile),
        "two_token_generate_collectives": communication(step_profile),
        "weights_mib_unsharded": full_mib,
        "weights_mib_this_rank": local_mib,
    }


def pipeline_part(model, tokenizer, seq_len: int = 128, batch: int = 8, steps: int = 3) -> list[dict]:
    ids = tokenizer("\n\n".join(load_text("wiki", "calibration")), return_tensors="pt").input_ids[0]
    blocks = ids[: batch * (seq_len + 1)].view(batch, seq_len + 1)
    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    rows = []
    for schedule in ("gpipe", "1f1b", "interleaved-1f1b"):
        for microbatches in (4, 8):
            replica = copy.deepcopy(model).train()
            expected = None
            if dist.get_rank() == dist.get_world_size() - 1:
                expected = [next_token_loss(replica(x).logits, y).item()
                            for x, y in zip(inputs.chunk(microbatches), targets.chunk(microbatches))]
                replica.zero_grad()
            pipeline = build_pipeline(replica, schedule=schedule, microbatches=microbatches, balance="flops",
                                      seq_len=seq_len)
            bubbles, seconds, loss_error = [], [], None
            for step in range(steps):
                losses = pipeline.step(inputs, targets)
                if step == 0 and expected is not None:
                    loss_error = max(abs(a.item() - b) / abs(b) for a, b in zip(losses, expected))
                bubbles.append(pipeline.bubble_fraction)
                seconds.append(pipeline.step_seconds)
            with torch.profiler.profile(record_shapes=True) as profile:
                pipeline.step(inputs, targets)
            virtual = len(pipeline.stages)
            rows.append({
                "schedule": schedule,
                "microbatches": microbatches,
                "stages": [b - a for a, b in pipeline.ranges],
                "step_s": sum(seconds[1:]) / (steps - 1),
                "bubble_measured": sum(bubbles[1:]) / (steps - 1),
                "bubble_theory": (dist.get_world_size() - 1) / (virtual * microbatches),
                "loss_rel_error_vs_one_process": loss_error,
                "collectives": communication(profile),
                "stage_parameters_mib": sum(p.numel() * 4 for p in pipeline.parameters()) / 2**20,
            })
            del pipeline, replica
            gc.collect()  # schedules and stages hold reference cycles: free each replica before the next
    return rows


def sequence_part(model, tokenizer, seq_len: int) -> dict:
    model = copy.deepcopy(model).train()
    ids = tokenizer("\n\n".join(load_text("wiki")), return_tensors="pt").input_ids[:, : seq_len + 1]
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def measure(run) -> tuple[float, float, float]:
        model.zero_grad(set_to_none=True)
        saved = SavedActivations(model)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
            loss = run()
        loss.backward()
        return time.perf_counter() - start, saved.mib, loss.item()

    full_seconds, full_mib, full_loss = measure(
        lambda: next_token_loss(model(inputs, use_cache=False).logits, targets))
    group = dist.group.WORLD
    model.set_attn_implementation("ring_attention")
    shard = shard_for_group(seq_len, group)

    def ring_step():
        logits = model(shard.take(inputs), position_ids=shard.position_ids(1), sequence_group=group,
                       use_cache=False).logits
        return sharded_next_token_loss(logits, shard.take(targets), shard, group)

    ring_seconds, ring_mib, ring_loss = measure(ring_step)
    total = torch.tensor(ring_loss)
    dist.all_reduce(total)
    with torch.profiler.profile(record_shapes=True) as profile:
        ring_step().backward()
    del model
    gc.collect()
    return {
        "seq_len": seq_len,
        "loss_rel_error_vs_one_process": abs(total.item() / dist.get_world_size() - full_loss) / full_loss,
        "step_s_one_rank_full_sequence": full_seconds,
        "step_s_sp2": ring_seconds,
        "activation_mib_one_rank": full_mib,
        "activation_mib_sp2": ring_mib,
        "activation_ratio": full_mib / ring_mib,
        "collectives": communication(profile),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["tp", "pp", "sp"], choices=["tp", "pp", "sp"])
    parser.add_argument("--sp-seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    accelerator = Accelerator()
    if accelerator.num_processes != 2:
        raise SystemExit("Run with 2 processes (see the docstring for the CPU launch line).")
    torch.set_num_threads(1)
    with accelerator.main_process_first():
        model, tokenizer = load_model("smollm2-135m")
    results = {"date": str(datetime.date.today()), "machine": machine_name(), "torch": torch.__version__,
               "ranks": 2, "model": "smollm2-135m"}
    # The long-sequence part first, in a fresh heap; tensor parallelism last (it shards the model in place).
    if "sp" in args.parts:
        results["sp"] = sequence_part(model, tokenizer, args.sp_seq_len)
        accelerator.print(json.dumps(results["sp"], indent=1))
        release_freed_memory()
    if "pp" in args.parts:
        results["pp"] = pipeline_part(model, tokenizer)
        accelerator.print(json.dumps(results["pp"], indent=1))
        release_freed_memory()
    if "tp" in args.parts:
        results["tp"] = tensor_parallel_part(model, tokenizer)
        accelerator.print(json.dumps(results["tp"], indent=1))
    per_rank = [None] * 2
    dist.all_gather_object(per_rank, results)
    if accelerator.is_main_process:
        RESULTS.mkdir(exist_ok=True)
        out = args.out or RESULTS / f"parallel_cpu-{datetime.date.today()}-{machine_name()}.json"
        out.write_text(json.dumps({"per_rank": per_rank}, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
