"""FMPQ (COMET's fine-grained mixed-precision quantization): per linear, reorder input channels so the outlier
channels gather in the first 128-channel blocks, and choose how many of those blocks keep 8-bit activations.

The reordering is exact: the activation kernel gathers the input channels in the new order and the weight
columns are stored in the same order, so before quantization ``W[:, perm] x[perm] = W x``. Nothing upstream is
changed, so one rule serves every linear (norm-fed, attention-fed, MLP-fed) of any architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ...kernels.w4ax_gemm.reference import (
    BLOCK,
    dequantize_activations,
    dequantize_weight,
    num_blocks,
    quantize_activations,
    quantize_weight,
)

SAMPLE_TOKENS = 256  # evenly spaced calibration tokens per linear on which "auto" measures output error
AUTO_MAX_FRACTION = 0.25  # "auto" keeps at most a quarter of a layer's blocks in 8 bits (COMET's 3:1 mix)
AUTO_SLACK = 1.25  # "auto" takes the fewest 8-bit blocks whose error is within this factor of the cap's


@dataclass
class InputStats:
    """What calibration saw at one linear's input: channel absmax ``[K]`` and a token sample ``[S, K]``."""

    absmax: torch.Tensor
    sample: torch.Tensor


@dataclass
class LayerPlan:
    """One linear's layout: ``perm [K]`` (the original channel at each position) and its 8-bit channel count.

    ``errors[n]`` is the relative output error the activation rounding adds with ``n`` outlier blocks
    (``||y_q - y||^2 / ||y||^2`` on the calibration sample, the quantized weight in both), for the counts
    ``"auto"`` compared.
    """

    perm: torch.Tensor
    a8_channels: int
    errors: list[float] = field(default_factory=list)

    @property
    def outlier_blocks(self) -> int:
        return num_blocks(self.a8_channels)


@torch.no_grad()
def collect_input_stats(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, InputStats]:
    """Run ``ids [n_samples, seq_len]`` through the float model one sequence at a time and record, at the input of
    every linear in ``names``, the per-channel absmax and a token sample: about ``SAMPLE_TOKENS`` evenly spaced
    over the sequences plus each sequence's most extreme token."""
    per_sequence = -(-SAMPLE_TOKENS // ids.shape[0])
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def recorder(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            peak = x.abs().amax(0)
            absmax[name] = peak if name not in absmax else torch.maximum(absmax[name], peak)
            # Evenly spaced tokens plus the one with the largest activation: rare outlier tokens (attention sinks,
            # massive activations) decide how much an 8-bit block is worth and an even sample would miss them.
            rows = torch.linspace(0, x.shape[0] - 1, min(per_sequence, x.shape[0]), device=x.device).long()
            rows = torch.unique(torch.cat([rows, x.abs().amax(1).argmax().view(1)]))
            samples[name].append(x[rows].cpu())

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    try:
        for row in tqdm(ids, desc="FMPQ calibration", unit="seq", leave=False):
            model(row[None].to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: InputStats(absmax[name].cpu(), torch.cat(samples[name])) for name in names}


def _activation_error(sample: torch.Tensor, w_hat: torch.Tensor, a8_channels: int) -> float:
    """``||Q(x) W^T - x W^T||^2 / ||x W^T||^2`` for reordered ``sample [S, K]`` and the layer's dequantized
    reordered weight ``w_hat [N, K]``: the output error the activation rounding adds."""
    x_hat = dequantize_activations(*quantize_activations(sample, a8_channels))
    exact = sample @ w_hat.t()
    return float((x_hat @ w_hat.t() - exact).pow(2).sum() / exact.pow(2).sum().clamp_min(1e-30))


def plan_layer(weight: torch.Tensor, stats: InputStats | None, outlier_blocks: int | str,
               group_size: int) -> LayerPlan:
    """The layout of a linear with ``weight [N, K]``.

    ``outlier_blocks`` 0 or ``"all"``: the original order, no or every block in 8 bits. Otherwise the channels
    are reordered by descending calibration absmax and the first blocks are 8-bit: an int fixes how many;
    ``"auto"`` takes the fewest, up to a quarter of the layer's blocks, whose measured activation error is within
    ``AUTO_SLACK`` of the error at that cap.
    """
    in_features = weight.shape[1]
    if outlier_blocks in (0, "all"):
        return LayerPlan(torch.arange(in_features), in_features if outlier_blocks == "all" else 0)
    if stats is None:
        raise ValueError(f"outlier_blocks={outlier_blocks!r} reorders channels from calibration statistics; "
                         "pass calibration data, or use outlier_blocks=0 (plain W4A4) or 'all' (W4A8).")
    perm = torch.argsort(stats.absmax, descending=True, stable=True)
    if outlier_blocks != "auto":
        return LayerPlan(perm, min(outlier_blocks * BLOCK, in_features))
    cap = max(1, round(num_blocks(in_features) * AUTO_MAX_FRACTION))
    w_hat = dequantize_weight(*quantize_weight(weight.detach()[:, perm], group_size), group_size)
    sample = stats.sample[:, perm].float()
    errors = [_activation_error(sample, w_hat, min(n * BLOCK, in_features)) for n in range(cap + 1)]
    chosen = next(n for n, error in enumerate(errors) if error <= AUTO_SLACK * errors[-1])
    return LayerPlan(perm, min(chosen * BLOCK, in_features), errors)
