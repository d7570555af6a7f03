"""A Hyena model's whole training step with our FFT convolution vs the same model on a plain torch.fft convolution.

Model: ``HyenaForCausalLM`` (default width 768, 12 blocks, order 2; bf16 autocast, fp32 AdamW), batch B, sequence
T. The baseline swaps every long convolution for ``irfft(rfft(u, n) * rfft(k, n), n)[:T]`` with ``n = 2 *
next_pow2(T)`` (what a Hyena implementation without a fused kernel runs); nothing else changes. First the two
losses on one batch are compared (bf16 tolerance; a failed check reports no speed-up), then
forward + backward + optimizer step is timed (``do_bench`` median). Prints a table; writes JSON to ``$OUT`` if
set, else ``benchmarks/results/``.

    python benchmarks/gpu/hyena_train.py                                # GPU
    TRITON_INTERPRET=1 python benchmarks/gpu/hyena_train.py --dry-run   # CPU: a tiny model, checks and table

Target (issue): >= 2x end to end for the training step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import hf_plugins  # noqa: E402
from hf_plugins.attention import hyena as hyena_module  # noqa: E402
from tests.tolerances import FLOAT_KERNEL_RTOL  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_timing import benchmark_parser, finish, ratio_text, timer_for  # noqa: E402

SIZES = {"hidden": 768, "layers": 12, "batch": 8, "lengths": (1024, 4096, 16384)}
DRY_SIZES = {"hidden": 32, "layers": 2, "batch": 2, "lengths": (64,)}
VOCAB = 32000


def torch_fft_conv(u: torch.Tensor, k: torch.Tensor, kernel_len: int | None = None,
                   keep_frequencies: float | None = None, pre_gate: torch.Tensor | None = None,
                   post_gate: torch.Tensor | None = None) -> torch.Tensor:
    """The baseline gated causal long convolution ``[batch, channels, T]`` in fp32 torch.fft, the spectrum
    recomputed per call and the gates multiplied in torch (``keep_frequencies`` unused: the model is dense)."""
    seq = u.shape[-1]
    n = 2 * (1 << max(0, seq - 1).bit_length())
    taps = k[:, : kernel_len or k.shape[-1]].float()
    w = u if pre_gate is None else u * pre_gate
    y = torch.fft.irfft(torch.fft.rfft(taps, n=n) * torch.fft.rfft(w.float(), n=n), n=n)[..., :seq].to(u.dtype)
    return y if post_gate is None else y * post_gate


def training_step(model, optimizer, batch: torch.Tensor, device: str):
    """One forward + backward + AdamW step; returns the loss."""
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def bench_length(sizes: dict, seq: int, device: str, dry_run: bool) -> dict:
    timer = timer_for(dry_run)
    torch.manual_seed(0)
    config = hf_plugins.HyenaConfig(vocab_size=VOCAB, hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"],
                                    max_position_embeddings=seq)
    model = hf_plugins.HyenaForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, VOCAB, (sizes["batch"], seq), device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        ours = model(input_ids=batch, labels=batch, use_cache=False).loss.item()
        with mock.patch.object(hyena_module, "fft_conv", torch_fft_conv):
            baseline = model(input_ids=batch, labels=batch, use_cache=False).loss.item()
    error = abs(ours - baseline) / abs(baseline)
    checked = error <= FLOAT_KERNEL_RTOL[torch.bfloat16]
    ours_ms = timer(lambda: training_step(model, optimizer, batch, device)) if checked else None
    with mock.patch.object(hyena_module, "fft_conv", torch_fft_conv):
        baseline_ms = timer(lambda: training_step(model, optimizer, batch, device))
    row = {"seq": seq, **{k: v for k, v in sizes.items() if k != "lengths"}, "loss_ours": ours,
           "loss_baseline": baseline, "rel_error": error, "checked": checked, "ms": ours_ms,
           "baseline_ms": baseline_ms, "speedup": None if ours_ms is None else baseline_ms / ours_ms}
    status = "" if checked else f"  CHECK FAILED (loss rel error {error:.2e})"
    print(f"T={seq:<6} ours {'-' if ours_ms is None else f'{ours_ms:.2f}'} ms  torch.fft {baseline_ms:.2f} ms  "
          f"speed-up {ratio_text(row['speedup'])}{status}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, "a tiny model under the Triton interpreter (CPU)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["HF_PLUGINS_BACKEND"] = "triton"  # the interpreter runs our Triton kernels on CPU tensors
    device = "cpu" if args.dry_run else "cuda"
    sizes = DRY_SIZES if args.dry_run else SIZES
    rows = [bench_length(sizes, seq, device, args.dry_run) for seq in (args.lengths or sizes["lengths"])]
    summary = [f"T={row['seq']}: {row['speedup']:.2f}x torch.fft (target >= 2x): "
               f"{'ok' if row['speedup'] >= 2 else 'MISSED'}" for row in rows if row["speedup"] is not None]
    return finish("hyena_train", rows, summary, args, all(row["checked"] for row in rows))


if __name__ == "__main__":
    raise SystemExit(main())
