"""Gated linear attention (GLA) training step, forward and forward+backward, on one GPU (H100 / H200).

Three routes over the same bf16 inputs, B*T = 16384 tokens in B sequences of T = 1k..16k tokens, head dims
D = 64 and 128 (key_dim = value_dim = D) with the hidden size held at heads * D = 2048 (32 heads of 64, 16 of
128); ``q, k, v ~ N(0, 1)``, the log forget gate ``gk = logsigmoid(N(0, 1)) / 16`` (bf16, as a bf16 model feeds
it):

- ``ours``: :func:`chunk_gla_triton` (Triton forward and backward kernels);
- ``fla``: flash-linear-attention's ``fla.ops.gla.chunk_gla`` (``pip install fla-core einops``), when importable;
- ``sdpa``: causal softmax attention, torch SDPA on its flash backend over q, k, v as ``[B, H, T, D]``.

``ours`` and ``fla`` are first checked, output and the gradients of q, k, v, gk, on the first 512 tokens of every
sequence against the float32 step recurrence (:func:`gla_recurrence_reference`); a route that fails reports no
timing. Each route is then timed forward (inputs requiring grad, as in training) and forward+backward
(``torch.autograd.grad`` of a random output gradient) with ``do_bench`` medians. Prints a table (``vs sdpa`` and
``vs fla``: the other route's forward+backward time over this route's, above 1x when this route is faster) and
the issue's targets; writes JSON to ``$OUT`` if set, else ``benchmarks/results/``. Exit code 1 if a check failed.

    python benchmarks/gpu/gla.py                                # GPU, a few minutes (fla's autotuning included)
    TRITON_INTERPRET=1 python benchmarks/gpu/gla.py --dry-run   # CPU: tiny shapes, checks and table

Targets (issue): forward+backward within 1.25x of flash-linear-attention's time, and faster than SDPA at
T >= 8k.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from hf_plugins.kernels.gla.reference import gla_recurrence_reference  # noqa: E402
from hf_plugins.kernels.gla.triton import chunk_gla_triton  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL, max_rel_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_timing import benchmark_parser, finish, ratio_text, timer_for  # noqa: E402

try:
    from fla.ops.gla import chunk_gla as fla_chunk_gla
except ImportError:
    fla_chunk_gla = None

DTYPE = torch.bfloat16
TOKENS, HIDDEN = 16384, 2048  # B * T and heads * D
LENGTHS, HEAD_DIMS = (1024, 2048, 4096, 8192, 16384), (64, 128)
LONG = 8192  # the SDPA target's shortest T
DRY_TOKENS, DRY_HIDDEN, DRY_LENGTHS, DRY_HEAD_DIMS, DRY_LONG = 256, 64, (64, 128), (16, 32), 128
CHECK_TOKENS = 512  # prefix of each sequence checked against the step recurrence
FLA_GOAL = 1.25


def gla_inputs(batch: int, length: int, heads: int, dim: int, device: str) -> dict[str, torch.Tensor]:
    """bf16 ``q, k, v, gk [batch, length, heads, dim]`` and the output gradient ``do``."""
    generator = torch.Generator().manual_seed(length * dim)
    shape = (batch, length, heads, dim)
    tensors = {name: torch.randn(shape, generator=generator) for name in ("q", "k", "v", "do")}
    tensors["gk"] = F.logsigmoid(torch.randn(shape, generator=generator)) / 16
    return {name: value.to(device=device, dtype=DTYPE) for name, value in tensors.items()}


def ours(q, k, v, gk):
    return chunk_gla_triton(q, k, v, gk, q.shape[-1] ** -0.5)[0]


def fla(q, k, v, gk):
    return fla_chunk_gla(q, k, v, gk, scale=q.shape[-1] ** -0.5)[0]


def reference(q, k, v, gk):
    """The step recurrence in the inputs' dtype (float32 here)."""
    return gla_recurrence_reference(q, k, v, gk, q.shape[-1] ** -0.5)[0]


def sdpa(q, k, v, gk):
    """Causal softmax attention on the flash backend (``gk`` unused)."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def _leaves(inputs: dict[str, torch.Tensor], tokens: int, dtype: torch.dtype = DTYPE) -> list[torch.Tensor]:
    """Fresh leaves requiring grad: the first ``tokens`` of each sequence of q, k, v, gk in ``dtype``."""
    return [inputs[name][:, :tokens].to(dtype).detach().contiguous().requires_grad_()
            for name in ("q", "k", "v", "gk")]


def forward_backward(route, leaves: list[torch.Tensor], do: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(o, dq, dk, dv, dgk)``; ``dgk`` is None for SDPA, which takes no gate."""
    o = route(*leaves)
    return (o, *torch.autograd.grad(o, leaves, do[:, :o.shape[1]], allow_unused=True))


def check(route, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative errors of ``o`` and the gradients against the float32 step recurrence (on the bf16 inputs) over
    the first ``CHECK_TOKENS`` tokens of each sequence."""
    tokens = min(CHECK_TOKENS, inputs["q"].shape[1])
    actual = forward_backward(route, _leaves(inputs, tokens), inputs["do"])
    expected = forward_backward(reference, _leaves(inputs, tokens, torch.float32), inputs["do"].float())
    return {name: max_rel_error(a, e) for name, a, e in zip(("o", "dq", "dk", "dv", "dgk"), actual, expected)}


def measure(name: str, route, inputs: dict[str, torch.Tensor], timer, checked: bool = True) -> dict:
    """Check (when ``checked``), then time forward and forward+backward: a row without the shape."""
    errors = check(route, inputs) if checked else None
    if errors is not None and max(errors.values()) > FLOAT_KERNEL_RTOL[DTYPE]:
        return {"route": name, "status": "CHECK FAILED", "errors": errors, "fwd_ms": None, "fwd_bwd_ms": None}
    leaves = _leaves(inputs, inputs["q"].shape[1])
    return {"route": name, "status": "ok" if errors is not None else "unchecked", "errors": errors,
            "fwd_ms": timer(lambda: route(*leaves)),
            "fwd_bwd_ms": timer(lambda: forward_backward(route, leaves, inputs["do"]))}


def measure_fla(inputs: dict[str, torch.Tensor], timer) -> dict:
    if fla_chunk_gla is None:
        return {"route": "fla", "status": "fla not installed", "errors": None, "fwd_ms": None, "fwd_bwd_ms": None}
    try:
        return measure("fla", fla, inputs, timer)
    except RuntimeError as error:  # out of memory, or (fla 0.6) its autotuner needing a GPU driver: interpreter
        reason = str(error).splitlines()[0]
        return {"route": "fla", "status": f"fla failed: {type(error).__name__}: {reason}", "errors": None,
                "fwd_ms": None, "fwd_bwd_ms": None}


def _speedup(baseline: dict, row: dict) -> float | None:
    if baseline["fwd_bwd_ms"] is None or row["fwd_bwd_ms"] is None:
        return None
    return baseline["fwd_bwd_ms"] / row["fwd_bwd_ms"]


def bench_shape(tokens: int, hidden: int, length: int, dim: int, device: str, dry_run: bool) -> list[dict]:
    timer = timer_for(dry_run)
    shape = {"T": length, "batch": tokens // length, "heads": hidden // dim, "head_dim": dim}
    inputs = gla_inputs(shape["batch"], length, shape["heads"], dim, device)
    routes = [measure("ours", ours, inputs, timer), measure_fla(inputs, timer),
              measure("sdpa", sdpa, inputs, timer, checked=False)]
    rows = [{**shape, **row, "vs_sdpa": _speedup(routes[2], row), "vs_fla": _speedup(routes[1], row)}
            for row in routes]
    for row in rows:
        print(_format(row), flush=True)
    return rows


def _format(row: dict) -> str:
    ms = {key: "-" if row[key] is None else f"{row[key]:.4f}" for key in ("fwd_ms", "fwd_bwd_ms")}
    status = "" if row["status"] in ("ok", "unchecked") else f"  {row['status']}"
    if row["status"] == "CHECK FAILED":
        status += " (rel errors " + ", ".join(f"{k} {e:.2e}" for k, e in row["errors"].items()) + ")"
    return (f"T={row['T']:<5} B={row['batch']:<3} D={row['head_dim']:<3} H={row['heads']:<2} {row['route']:<4}  "
            f"fwd {ms['fwd_ms']:>9} ms  fwd+bwd {ms['fwd_bwd_ms']:>9} ms  vs sdpa {ratio_text(row['vs_sdpa'])}  "
            f"vs fla {ratio_text(row['vs_fla'])}{status}")


def targets(rows: list[dict], long_from: int) -> list[str]:
    """Forward+backward time of ours over fla's (target <= 1.25) at every shape, and over SDPA's (target < 1) at
    ``T >= long_from``."""
    by_key = {(row["T"], row["head_dim"], row["route"]): row for row in rows}
    lines = []
    for row in rows:
        if row["route"] != "ours":
            continue
        shape = (row["T"], row["head_dim"])
        goals = [("fla", f"<= {FLA_GOAL}", lambda r: r <= FLA_GOAL)]
        if row["T"] >= long_from:
            goals.append(("sdpa", "< 1", lambda r: r < 1))
        for other, goal, met in goals:
            baseline = by_key[(*shape, other)]
            head = f"T={row['T']} D={row['head_dim']}: ours/{other} fwd+bwd"
            speedup = _speedup(baseline, row)
            if speedup is None:
                lines.append(f"{head} not measured (ours: {row['status']}, {other}: {baseline['status']})")
            else:
                lines.append(f"{head} {1 / speedup:.2f} (target {goal}): {'ok' if met(1 / speedup) else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    tokens, hidden = (DRY_TOKENS, DRY_HIDDEN) if args.dry_run else (TOKENS, HIDDEN)
    lengths, dims = (DRY_LENGTHS, DRY_HEAD_DIMS) if args.dry_run else (LENGTHS, HEAD_DIMS)
    rows = [row for dim in dims for length in lengths
            for row in bench_shape(tokens, hidden, length, dim, device, args.dry_run)]
    summary = targets(rows, DRY_LONG if args.dry_run else LONG)
    return finish("gla", rows, summary, args, all(row["status"] != "CHECK FAILED" for row in rows))


if __name__ == "__main__":
    raise SystemExit(main())
