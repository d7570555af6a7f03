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

from ...kernels.w4ax_gemm.reference import BLOCK, num_blocks, quantize_activations, quantize_weight

SAMPLE_TOKENS = 256  # calibration tokens per linear on which "auto" measures output error
AUTO_MAX_FRACTION = 0.25  # "auto" keeps at most a quarter of a layer's blocks in 8 bits (COMET's 3:1 mix)
AUTO_SLACK = 1.1  # "auto" takes the cheapest layout whose output error is within this factor of the best one


@dataclass
class InputStats:
    """What calibration saw at one linear's input: channel absmax ``[K]`` and a token sample ``[<=S, K]``."""

    absmax: torch.Tensor
    sample: torch.Tensor


@dataclass
class LayerPlan:
    """One linear's layout: ``perm [K]`` (the original channel at each position) and its 8-bit channel count.

    ``errors`` are the relative output errors (``||y_q - y||^2 / ||y||^2`` on the calibration sample, against the
    float layer) of the layouts ``"auto"`` compared: ``errors[0]`` the original order without 8-bit blocks,
    ``errors[1 + n]`` the reordered layer with ``n`` blocks in 8 bits.
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
    every linear in ``names``, the per-channel absmax and up to ``SAMPLE_TOKENS`` tokens spread over the samples."""
    per_sequence = -(-SAMPLE_TOKENS // ids.shape[0])
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def recorder(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            peak = x.abs().amax(0)
            absmax[name] = peak if name not in absmax else torch.maximum(absmax[name], peak)
            rows = torch.linspace(0, x.shape[0] - 1, min(per_sequence, x.shape[0]), device=x.device).long()
            samples[name].append(x[rows].cpu())

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    try:
        for row in tqdm(ids, desc="FMPQ calibration", unit="seq", leave=False):
            model(row[None].to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: InputStats(absmax[name].cpu(), torch.cat(samples[name])[:SAMPLE_TOKENS]) for name in names}


def _output_error(sample: torch.Tensor, weight: torch.Tensor, perm: torch.Tensor, a8_channels: int,
                  group_size: int) -> float:
    """``||Q(x[perm]) Q(W[:, perm])^T - x W^T||^2 / ||x W^T||^2`` on ``sample [S, K]``: the layer's whole output
    error in one layout, weight and activation rounding together (the order changes the weight groups too)."""
    in_features = weight.shape[1]
    codes, scales = quantize_weight(weight[:, perm], group_size)
    group = in_features if group_size == -1 else group_size
    w_hat = codes.float() * scales.repeat_interleave(group, dim=1)[:, :in_features]
    x_codes, x_scales = quantize_activations(sample[:, perm], a8_channels)
    x_hat = x_codes.float() * x_scales.repeat_interleave(BLOCK, dim=1)[:, :in_features]
    exact = sample @ weight.float().t()
    return float((x_hat @ w_hat.t() - exact).pow(2).sum() / exact.pow(2).sum().clamp_min(1e-30))


def plan_layer(weight: torch.Tensor, stats: InputStats | None, outlier_blocks: int | str,
               group_size: int) -> LayerPlan:
    """The layout of a linear with ``weight [N, K]``.

    ``outlier_blocks`` 0 or ``"all"``: the original order, no or every block in 8 bits. An int: reorder by
    descending calibration absmax, that many blocks in 8 bits. ``"auto"``: from the candidates, cheapest first,
    the original order without 8-bit blocks, then the reordered layer with 0, 1, ... up to a quarter of its
    blocks in 8 bits, the first whose measured output error is within ``AUTO_SLACK`` of the best candidate's.
    """
    in_features = weight.shape[1]
    identity = torch.arange(in_features)
    if outlier_blocks in (0, "all"):
        return LayerPlan(identity, in_features if outlier_blocks == "all" else 0)
    if stats is None:
        raise ValueError(f"outlier_blocks={outlier_blocks!r} reorders channels from calibration statistics; "
                         "pass calibration data, or use outlier_blocks=0 (plain W4A4) or 'all' (W4A8).")
    perm = torch.argsort(stats.absmax, descending=True, stable=True)
    if outlier_blocks != "auto":
        return LayerPlan(perm, min(outlier_blocks * BLOCK, in_features))
    cap = max(1, round(num_blocks(in_features) * AUTO_MAX_FRACTION))
    candidates = [(identity, 0)] + [(perm, min(n * BLOCK, in_features)) for n in range(cap + 1)]
    sample = stats.sample.float()
    errors = [_output_error(sample, weight.detach(), order, a8, group_size) for order, a8 in candidates]
    best = min(errors)
    chosen = next(index for index, error in enumerate(errors) if error <= AUTO_SLACK * best)
    return LayerPlan(*candidates[chosen], errors)
