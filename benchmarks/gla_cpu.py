"""GLA on CPU: the chunkwise path vs the naive recurrence vs causal softmax attention (SDPA), after a check.

    python benchmarks/gla_cpu.py [--threads 1] [--lengths 512 1024 2048 4096 8192] [--batch 1] [--heads 4]
                                 [--key-dim 64] [--value-dim 64] [--naive-max-len 2048] [--no-save | --out PATH]

For each length T, fp32 inputs ``[batch, T, heads, dim]`` with gates ``logsigmoid(x) / 16`` (the paper's
normaliser). First :func:`hf_plugins.kernels.gla.cpu.chunk_gla_cpu` is checked against the float64 recurrence:
the forward over all T tokens and the gradients over the first ``--check-len`` tokens (the chunk code is the
same at every length); no timing is reported for a length whose check failed. Then the median time of the
forward (no grad) and of forward + backward for: the chunk path, the naive recurrence in fp32 (up to
``--naive-max-len``: it is one Python step per token) and ``F.scaled_dot_product_attention(is_causal=True)``.
Ratios are baseline time / chunk time (> 1: the chunk path is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._timing import add_ratios, fwd_and_fwd_bwd, sweep_and_save, sweep_parser  # noqa: E402
from hf_plugins.kernels.gla.cpu import chunk_gla_cpu  # noqa: E402
from hf_plugins.kernels.gla.reference import gla_recurrence_reference  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402


def make_inputs(batch: int, seq: int, heads: int, key_dim: int, value_dim: int) -> dict[str, torch.Tensor]:
    """fp32 ``q, k, gk [batch, seq, heads, key_dim]``, ``v`` and the upstream gradient ``do``
    ``[batch, seq, heads, value_dim]``."""
    gen = torch.Generator().manual_seed(seq)
    qk, vv = (batch, seq, heads, key_dim), (batch, seq, heads, value_dim)
    return {"q": torch.randn(qk, generator=gen), "k": torch.randn(qk, generator=gen),
            "v": torch.randn(vv, generator=gen), "gk": F.logsigmoid(torch.randn(qk, generator=gen)) / 16,
            "do": torch.randn(vv, generator=gen)}


def gla_fn(fn, inputs: dict[str, torch.Tensor]):
    """``fn`` as a GLA of the inputs (default scale, no state) -> ``o``."""
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["gk"], inputs["q"].shape[-1] ** -0.5)[0]


def sdpa_fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Causal softmax attention on the same q, k, v (heads first, as SDPA takes them)."""
    q, k, v = (inputs[name].transpose(1, 2) for name in ("q", "k", "v"))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def gradients(forward, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``d sum(forward(inputs) * do) / d (q, k, v, gk)``."""
    leaves = {name: inputs[name].detach().requires_grad_() for name in ("q", "k", "v", "gk")}
    (forward({**inputs, **leaves}) * inputs["do"]).sum().backward()
    return [leaves[name].grad for name in ("q", "k", "v", "gk")]


def check(inputs: dict[str, torch.Tensor], check_len: int) -> float:
    """Max relative error of the chunk path against the float64 recurrence: forward on all tokens, gradients on
    the first ``check_len``."""
    as64 = {name: value.double() for name, value in inputs.items()}
    errors = [max_rel_error(gla_fn(chunk_gla_cpu, inputs), gla_fn(gla_recurrence_reference, as64))]
    head = {name: value[:, :check_len] for name, value in inputs.items()}
    head64 = {name: value[:, :check_len] for name, value in as64.items()}
    for got, expected in zip(gradients(lambda x: gla_fn(chunk_gla_cpu, x), head),
                             gradients(lambda x: gla_fn(gla_recurrence_reference, x), head64)):
        errors.append(max_rel_error(got, expected))
    return max(errors)


def timed(forward, inputs: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Forward (no grad) and forward + backward timings of ``forward(inputs) -> o``."""
    def forward_only():
        with torch.no_grad():
            forward(inputs)

    return fwd_and_fwd_bwd(forward_only, lambda: gradients(forward, inputs))


def run(seq: int, args: argparse.Namespace) -> dict:
    inputs = make_inputs(args.batch, seq, args.heads, args.key_dim, args.value_dim)
    error = check(inputs, min(seq, args.check_len))
    row = {"T": seq, "rel_error": error, "checked": error <= FLOAT_KERNEL_RTOL[torch.float32]}
    if not row["checked"]:
        return row
    row["chunk"] = timed(lambda x: gla_fn(chunk_gla_cpu, x), inputs)
    row["sdpa"] = timed(sdpa_fn, inputs)
    if seq <= args.naive_max_len:
        row["naive"] = timed(lambda x: gla_fn(gla_recurrence_reference, x), inputs)
    add_ratios(row, "chunk", ('sdpa', 'naive'))
    return row


def main() -> None:
    parser = sweep_parser(__doc__, [512, 1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--naive-max-len", type=int, default=2048)
    parser.add_argument("--check-len", type=int, default=256)
    sweep_and_save("gla_cpu", parser.parse_args(), run, "T", "chunk", ("sdpa", "naive"),
                   ("heads", "key_dim", "value_dim"), REPO_ROOT / "benchmarks" / "results")


if __name__ == "__main__":
    main()
