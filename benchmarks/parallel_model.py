"""Cost model of tensor x pipeline x data parallel training (Megatron-LM's PTD-P), checked against the paper.

    python benchmarks/parallel_model.py [--out benchmarks/results/parallel_model.json]

Predicts time per iteration, per-GPU throughput and memory per GPU from per-layer FLOPs, bytes communicated by
each parallelism and the pipeline bubble; the hardware constants are A100/Selene specifications and one fitted
constant (achieved fraction of peak in the matmuls). It first reproduces the ten weak-scaling configurations of
Narayanan et al. (SC'21, arXiv 2104.04473, Table 1) and prints the error per row, then predicts 7B and 70B
Llama-style models on 8-1024 GPUs. See ``benchmarks/parallel_model.md`` for the derivation.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

# A100 SXM 80 GB in DGX A100 nodes of 8 (Selene): bf16 dense peak, NVLink (per GPU, one direction), InfiniBand
# (8 x 200 Gb/s HDR per node = 25 GB/s per GPU), HBM capacity.
PEAK_FLOPS = 312e12
NVLINK_BYTES_PER_S = 300e9
IB_BYTES_PER_S = 25e9
GPUS_PER_NODE = 8
HBM_BYTES = 80e9
HBM_BYTES_PER_S = 2.0e12
BYTES_PER_PARAM_STATE = 16  # bf16 weight + bf16 grad + fp32 master, Adam m and v (mixed precision)


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    ffn: int = 0  # 0: 4 x hidden (GPT); Llama's SwiGLU uses 3 matrices of ffn

    @property
    def params(self) -> float:
        """Weights: attention 4h^2 plus the MLP per layer, and the embedding (tied head)."""
        mlp = 3 * self.hidden * self.ffn if self.ffn else 8 * self.hidden**2
        return self.layers * (4 * self.hidden**2 + mlp) + self.vocab * self.hidden

    def flops_per_token(self, recompute: bool = True) -> float:
        """Training FLOPs per token: 3 passes (fwd + 2x bwd) of 2 FLOPs per weight and attention's
        ``2 x 2 x seq x hidden`` per layer, plus one more forward with full activation recomputation. For GPT
        this is Narayanan et al.'s ``96 B s l h^2 (1 + s/(6h) + V/(16 l h))`` per iteration divided by ``B s``."""
        passes = 4 if recompute else 3
        layer_weights = self.params - self.vocab * self.hidden
        per_layer_attention = 4 * self.seq * self.hidden  # QK^T and AV, 2 FLOPs per multiply-add
        body = passes * (2 * layer_weights + self.layers * per_layer_attention)
        head = 3 * 2 * self.vocab * self.hidden  # the logit layer is not recomputed
        return body + head


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    batch: int  # global batch (sequences)
    microbatch: int = 1
    interleave: int = 1

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def microbatches(self) -> int:
        return self.batch // (self.microbatch * self.data)


def _all_reduce_seconds(nbytes: float, ranks: int, bandwidth: float) -> float:
    """Ring all-reduce: each rank sends and receives ``2 (n-1)/n`` of the buffer."""
    return 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * nbytes / bandwidth


def predict(model: Model, layout: Layout, matmul_efficiency: float, elementwise_bytes: float) -> dict:
    """Seconds per iteration and its parts, per-GPU TFLOP/s and memory per GPU for ``model`` on ``layout``.

    ``matmul_efficiency``: achieved fraction of peak in the matmuls; ``elementwise_bytes``: HBM bytes moved per
    token, layer and pass per hidden unit by the memory-bound ops (norms, residuals, dropout, activations), which
    Megatron's tensor parallelism (without sequence parallelism) repeats on every tensor rank.
    """
    t, p, d, m, b, v = (layout.tensor, layout.pipeline, layout.data, layout.microbatches, layout.microbatch,
                        layout.interleave)
    tokens = layout.batch * model.seq
    flops = model.flops_per_token() * tokens
    matmuls = flops / (layout.gpus * PEAK_FLOPS * matmul_efficiency)
    elementwise = 4 * tokens / (d * p) * model.layers * elementwise_bytes * model.hidden / HBM_BYTES_PER_S
    compute = matmuls + elementwise
    # Tensor parallelism: 2 all-reduces in the forward, 2 in the backward, 2 more in the recomputed forward, of
    # the [b, s, h] activation in bf16, inside a node (NVLink), for each of this stage's layers and microbatches.
    layers_per_stage = model.layers / p
    activation_bytes = 2 * b * model.seq * model.hidden
    tp_bandwidth = NVLINK_BYTES_PER_S if t <= GPUS_PER_NODE else IB_BYTES_PER_S
    tensor_comm = 6 * layers_per_stage * m * _all_reduce_seconds(activation_bytes, t, tp_bandwidth)
    # Pipeline: one activation forward and one gradient backward per microbatch and stage boundary (v per rank),
    # over InfiniBand once stages leave the node; Megatron's scatter/gather splits it over the t tensor ranks.
    pipeline_bandwidth = IB_BYTES_PER_S if t * p > GPUS_PER_NODE else NVLINK_BYTES_PER_S
    pipeline_comm = 0.0 if p == 1 else 2 * v * m * activation_bytes / t / pipeline_bandwidth
    # Bubble: (p - 1) / (v m) of the ideal time (compute + tensor-parallel communication).
    bubble = (p - 1) / (v * m) * (compute + tensor_comm)
    # Data parallelism: one all-reduce of this GPU's bf16 gradients per iteration (not overlapped).
    gradient_bytes = 2 * model.params / (t * p)
    data_comm = _all_reduce_seconds(gradient_bytes, d, IB_BYTES_PER_S)
    seconds = compute + tensor_comm + pipeline_comm + bubble + data_comm
    # Memory: weights, gradients and Adam states of this GPU's shard; with full recomputation, one [b, s, h]
    # input per layer for each in-flight microbatch (p for 1F1B) plus one layer's working set (~34 s b h / t
    # bytes + 5 a s^2 b / t for attention, Korthikanti et al.).
    states = BYTES_PER_PARAM_STATE * model.params / (t * p)
    in_flight = min(p, m)
    checkpoints = activation_bytes * layers_per_stage * in_flight
    working = (34 * model.seq * b * model.hidden + 5 * model.heads * model.seq**2 * b) / t
    memory = states + checkpoints + working
    return {
        "seconds": seconds,
        "compute_s": compute,
        "elementwise_s": elementwise,
        "tensor_comm_s": tensor_comm,
        "pipeline_comm_s": pipeline_comm,
        "bubble_s": bubble,
        "data_comm_s": data_comm,
        "tflops_per_gpu": flops / seconds / layout.gpus / 1e12,
        "tokens_per_s": tokens / seconds,
        "memory_gb": memory / 1e9,
        "fits": memory <= HBM_BYTES,
    }


# Narayanan et al. 2021, Table 1 (GPT, vocab 51,200, sequence 2048, microbatch 1, 1F1B without interleaving,
# full activation recomputation; A100 80 GB on Selene): achieved TFLOP/s per GPU.
PUBLISHED = [
    ("1.7B", Model("gpt-1.7b", 24, 2304, 24, 51200, 2048), Layout(1, 1, 32, 512), 137),
    ("3.6B", Model("gpt-3.6b", 30, 3072, 32, 51200, 2048), Layout(2, 1, 32, 512), 138),
    ("7.5B", Model("gpt-7.5b", 36, 4096, 32, 51200, 2048), Layout(4, 1, 32, 512), 142),
    ("18.4B", Model("gpt-18.4b", 40, 6144, 48, 51200, 2048), Layout(8, 1, 32, 1024), 135),
    ("39.1B", Model("gpt-39.1b", 48, 8192, 64, 51200, 2048), Layout(8, 2, 32, 1536), 138),
    ("76.1B", Model("gpt-76.1b", 60, 10240, 80, 51200, 2048), Layout(8, 4, 32, 1792), 140),
    ("145.6B", Model("gpt-145.6b", 80, 12288, 96, 51200, 2048), Layout(8, 8, 24, 2304), 148),
    ("310.1B", Model("gpt-310.1b", 96, 16384, 128, 51200, 2048), Layout(8, 16, 15, 2160), 155),
    ("529.6B", Model("gpt-529.6b", 105, 20480, 128, 51200, 2048), Layout(8, 35, 9, 2520), 163),
    ("1008B", Model("gpt-1t", 128, 25600, 160, 51200, 2048), Layout(8, 64, 6, 3072), 163),
]

LLAMA_7B = Model("llama-7b", 32, 4096, 32, 32000, 4096, ffn=11008)
LLAMA_70B = Model("llama-70b", 80, 8192, 64, 32000, 4096, ffn=28672)


def fit_constants() -> tuple[float, float]:
    """``(matmul_efficiency, elementwise_bytes)`` minimising the squared relative error of the predicted TFLOP/s
    over the published rows (grid search, then a finer grid around the best point)."""
    def loss(efficiency: float, elementwise: float) -> float:
        return sum((predict(model, layout, efficiency, elementwise)["tflops_per_gpu"] / published - 1) ** 2
                   for _, model, layout, published in PUBLISHED)

    best = (1.0, 0.5, 0.0)
    span_e, span_b = (0.3, 1.0), (0.0, 200.0)
    for _ in range(4):
        grid_e = [span_e[0] + (span_e[1] - span_e[0]) * i / 40 for i in range(41)]
        grid_b = [span_b[0] + (span_b[1] - span_b[0]) * i / 40 for i in range(41)]
        best = min((loss(e, bb), e, bb) for e in grid_e for bb in grid_b)
        step_e, step_b = (span_e[1] - span_e[0]) / 20, (span_b[1] - span_b[0]) / 20
        span_e = (max(0.05, best[1] - step_e), min(1.0, best[1] + step_e))
        span_b = (max(0.0, best[2] - step_b), best[2] + step_b)
    return best[1], best[2]


def best_layout(model: Model, gpus: int, batch: int, constants: tuple[float, float]) -> tuple[Layout, dict]:
    """The fastest (tensor <= 8, pipeline, data) layout of ``gpus`` that fits in memory, with interleaving v=2
    where the stage count allows."""
    best = None
    for t in (1, 2, 4, 8):
        for p in (1, 2, 4, 8, 16, 32, 64):
            if gpus % (t * p) or model.layers % p or model.heads % t:
                continue
            d = gpus // (t * p)
            if batch % d:
                continue
            v = 2 if p > 1 and model.layers % (2 * p) == 0 and (batch // d) % p == 0 else 1
            layout = Layout(t, p, d, batch, interleave=v)
            result = predict(model, layout, *constants)
            if result["fits"] and (best is None or result["seconds"] < best[1]["seconds"]):
                best = (layout, result)
    if best is None:
        raise ValueError(f"{model.name} does not fit on {gpus} GPUs in any layout.")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the tables as JSON here")
    args = parser.parse_args()

    constants = fit_constants()
    print(f"fitted: matmul efficiency {constants[0]:.3f} of the {PEAK_FLOPS / 1e12:.0f} TFLOP/s peak, "
          f"{constants[1]:.0f} bytes per hidden unit, token, layer and pass in memory-bound ops\n")
    print(f"{'model':>8} {'t':>2} {'p':>3} {'d':>3} {'GPUs':>5} {'published':>9} {'predicted':>9} {'error':>7} "
          f"{'bubble':>7} {'TP comm':>7} {'memory GB':>9}")
    checks = []
    for name, model, layout, published in PUBLISHED:
        result = predict(model, layout, *constants)
        error = result["tflops_per_gpu"] / published - 1
        checks.append({"model": name, **asdict(layout), "published_tflops": published, **result, "error": error})
        print(f"{name:>8} {layout.tensor:>2} {layout.pipeline:>3} {layout.data:>3} {layout.gpus:>5} {published:>9} "
              f"{result['tflops_per_gpu']:>9.1f} {error:>+7.1%} {result['bubble_s'] / result['seconds']:>7.1%} "
              f"{result['tensor_comm_s'] / result['seconds']:>7.1%} {result['memory_gb']:>9.1f}")
    mean_abs = sum(abs(c["error"]) for c in checks) / len(checks)
    print(f"mean |error| {mean_abs:.1%}\n")

    predictions = []
    print(f"{'model':>10} {'GPUs':>5} {'t':>2} {'p':>3} {'v':>2} {'d':>4} {'tokens/s':>11} {'TFLOP/s/GPU':>11} "
          f"{'memory GB':>9}")
    for model, batch in ((LLAMA_7B, 1024), (LLAMA_70B, 1024)):
        for gpus in (8, 16, 32, 64, 128, 256, 512, 1024):
            try:
                layout, result = best_layout(model, gpus, batch, constants)
            except ValueError as error:
                print(f"{model.name:>10} {gpus:>5}  {error}")
                continue
            predictions.append({"model": model.name, **asdict(layout), **result})
            print(f"{model.name:>10} {gpus:>5} {layout.tensor:>2} {layout.pipeline:>3} {layout.interleave:>2} "
                  f"{layout.data:>4} {result['tokens_per_s']:>11.0f} {result['tflops_per_gpu']:>11.1f} "
                  f"{result['memory_gb']:>9.1f}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"matmul_efficiency": constants[0], "elementwise_bytes": constants[1],
                       "published_checks": checks, "mean_abs_error": mean_abs, "predictions": predictions},
                      file, indent=2)


if __name__ == "__main__":
    main()
