"""AWQ searches: per-group activation-aware scales and per-(row, group) weight clipping (llm-awq / AutoAWQ).

Both searches quantize with :func:`~hf_plugins.quantizers.awq.int_quant.fake_quantize`, the very quantizer used for
the final weights, so what the search measures is what the model gets. All math is fp32.

Where the compared output is linear in the weights (a single inspected linear, the clip search's group-partial
products), the squared error is computed from the input Gram matrix instead of replaying tokens: the same number
(up to float rounding) at a cost that does not grow with the number of calibration tokens, so both use them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .calibration import ModuleInputs
from .int_quant import fake_quantize, group_columns

# AutoAWQ: clip search shrinks max|w| by i/20 for i < 10, i.e. down to 0.55 of the original range.
CLIP_GRID = 20
CLIP_STEPS = 10


@dataclass(frozen=True)
class WeightQuantizer:
    """Group-wise asymmetric RTN of ``[out, in]`` weights along ``in`` (``group_size=-1``: per channel)."""

    bits: int
    group_size: int

    def fake(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.bits, self.group_size)

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """``[rows, in]`` -> ``[rows, n_groups, width]``; a partial last group is zero-padded, like the quantizer."""
        return group_columns(weight, self.group_size)


@dataclass(frozen=True)
class ScaleSearchResult:
    """Best input-channel scales ``[in_features]`` of one group and the inspected module's output MSE.

    ``error_rtn`` is the MSE with plain round-to-nearest (``s = 1``), ``error_awq`` with the chosen scales.
    ``best_alpha`` is None when no candidate beat plain RTN and the scales stay 1.
    """

    scales: torch.Tensor
    best_alpha: float | None
    error_rtn: float
    error_awq: float


def weight_magnitude(weights: list[torch.Tensor], quantizer: WeightQuantizer) -> torch.Tensor:
    """AutoAWQ's ``w_mean [in]``: ``|W|`` normalised by each quantization group's max, averaged over all rows of
    the group's linears (``weights`` are ``[out_i, in]``, concatenated along rows)."""
    weight = torch.cat(weights).float()
    grouped = quantizer.grouped(weight.abs())
    normalised = grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)
    return normalised.reshape(weight.shape[0], -1)[:, : weight.shape[1]].mean(0)


def candidate_scales(
    input_magnitude: torch.Tensor, weight_mean: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """``s = s_x^alpha`` (or ``s_x^alpha / w_mean^(1 - alpha)`` with duo scaling), normalised so that
    ``max(s) * min(s) = 1``; non-finite entries become 1. Inputs and result are ``[in_features]``."""
    if weight_mean is None:
        scales = input_magnitude.pow(alpha).clamp(min=1e-4)
    else:
        scales = (input_magnitude.pow(alpha) / (weight_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    return torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))


REPLAY_TOKENS = 2048
"""Calibration tokens a :class:`ReplayError` replays (whole leading samples; at least one): the scale search's
candidates are ranked on these (8 x 512 by default calibrate, so half), while every statistic and Gram matrix uses
all tokens. Halves the replayed groups' time, AWQ's largest cost."""


def leading_tokens(replay_inputs: list[ModuleInputs], tokens: int) -> list[ModuleInputs]:
    """The leading samples of ``replay_inputs`` (mini-batches of ``[batch, seq, ...]``) holding about ``tokens``
    tokens: whole samples, at least one."""
    kept, total = [], 0
    for inputs in replay_inputs:
        hidden = inputs.hidden
        batch, per_sample = hidden.shape[0], hidden.shape[1] if hidden.dim() >= 3 else 1
        rows = min(batch, max(1, -(-(tokens - total) // per_sample)))
        kept.append(inputs if rows == batch else inputs.leading(rows))
        total += rows * per_sample
        if total >= tokens:
            break
    return kept


class ReplayError:
    """MSE of ``module``'s output against its float output, replaying its captured mini-batch inputs (the leading
    :data:`REPLAY_TOKENS` tokens of them).

    The float reference is computed at construction, so construct it before any weight is changed.
    """

    def __init__(self, module: nn.Module, replay_inputs: list[ModuleInputs], tokens: int = REPLAY_TOKENS):
        self.module = module
        self.replay_inputs = leading_tokens(replay_inputs, tokens)
        self.reference = [inputs.run(module) for inputs in self.replay_inputs]

    def __call__(self) -> float:
        squared_error = 0.0
        count = 0
        for inputs, expected in zip(self.replay_inputs, self.reference):
            difference = inputs.run(self.module) - expected
            squared_error += difference.pow(2).sum(dtype=torch.float64).item()
            count += difference.numel()
        return squared_error / count


class GramError:
    """MSE of one linear's output against its float output, from the input Gram matrix ``G [in, in]``.

    ``mean_{t,o} ((W0 - W) x_t)_o^2 = sum((D @ G) * D) / (n_tokens * out)`` with ``D = W0 - W`` and
    ``G = sum_t x_t x_t^T``: the same number as replaying the linear (bias cancels), at ``out * in^2`` per
    evaluation whatever the number of calibration tokens. ``W0`` is the weight at construction.
    """

    def __init__(self, linear: nn.Linear, gram: torch.Tensor, n_tokens: int):
        self.linear = linear
        self.original = linear.weight.detach().float().clone()
        self.gram = gram
        self.normaliser = n_tokens * linear.out_features

    def __call__(self) -> float:
        difference = self.original - self.linear.weight.float()
        return ((difference @ self.gram) * difference).sum(dtype=torch.float64).item() / self.normaliser


@torch.inference_mode()
def search_best_scales(
    output_error: Callable[[], float],
    linears: list[nn.Linear],
    quantized: list[bool],
    input_magnitude: torch.Tensor,
    quantizer: WeightQuantizer,
    n_grid: int,
    duo_scaling: bool,
    tie: Callable[[torch.Tensor], torch.Tensor] | None = None,
    exhaustive: bool = False,
) -> ScaleSearchResult:
    """Grid-search ``alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}`` for the group ``linears`` (sharing one input).

    For each candidate ``s``, every quantized linear gets ``W <- Q(W * s) / s`` and ``output_error()`` (a
    :class:`ReplayError` or :class:`GramError` of the inspected module) is measured. Plain RTN (``s = 1``) is a
    candidate too: with duo scaling no alpha gives ``s = 1``, and AutoAWQ then keeps its best alpha even where that
    is worse than not scaling at all (measured: a third of Qwen2.5-Coder-0.5B's groups). Weights are restored before
    returning; linears marked not ``quantized`` keep their float weights during the trials. ``input_magnitude`` is
    ``mean |x| [in]`` over all calibration tokens. ``tie`` (e.g. :meth:`.scaling_groups.Producer.tie`) averages
    both statistics over channels that must share a scale, so every candidate honours the ties.

    The grid is searched coarse to fine unless ``exhaustive``: every fourth point, then the best one's neighbours
    two points away, then one point away: 9 evaluations for ``n_grid = 20`` instead of 20 (an evaluation replays the
    inspected module over the calibration tokens, most of AWQ's time). Where the error is unimodal along alpha, as
    AWQ's curves are, that is the exhaustive search's choice; ties go to the smaller alpha either way.
    """
    tie = tie or (lambda values: values)
    originals = [linear.weight.detach().clone() for linear in linears]
    input_magnitude = tie(input_magnitude)
    weight_mean = None
    if duo_scaling:
        weight_mean = tie(weight_magnitude([w for w, flag in zip(originals, quantized) if flag], quantizer))

    def error_with(scales: torch.Tensor) -> float:
        for linear, original, flag in zip(linears, originals, quantized):
            if flag:
                linear.weight.copy_(quantizer.fake(original * scales) / scales)
        error = output_error()
        for linear, original in zip(linears, originals):
            linear.weight.copy_(original)
        return error

    identity = torch.ones_like(input_magnitude)
    error_rtn = error_with(identity)
    errors: dict[int, float] = {}

    def evaluate(step: int) -> None:
        if 0 <= step < n_grid and step not in errors:
            scales = candidate_scales(input_magnitude, weight_mean, step / n_grid)
            # Without duo scaling alpha = 0 is plain RTN, already measured.
            errors[step] = error_rtn if torch.equal(scales, identity) else error_with(scales)

    def best_step() -> int:
        return min(errors, key=lambda step: (errors[step], step))

    stride = 1 if exhaustive else 4
    for step in range(0, n_grid, stride):
        evaluate(step)
    while stride > 1:
        stride //= 2
        center = best_step()
        evaluate(center - stride)
        evaluate(center + stride)
    step = best_step()
    if errors[step] < error_rtn:
        alpha = step / n_grid
        return ScaleSearchResult(candidate_scales(input_magnitude, weight_mean, alpha), alpha, error_rtn, errors[step])
    return ScaleSearchResult(identity, None, error_rtn, error_rtn)


def diagonal_blocks(gram: torch.Tensor, quantizer: WeightQuantizer) -> torch.Tensor:
    """The quantization groups' diagonal blocks ``[n_groups, width, width]`` of ``gram [in, in]`` (fp32): ``G_g =
    sum_t x_t,g^T x_t,g``. A partial last group is zero-padded, like the quantizer pads weights."""
    in_features = gram.shape[0]
    width = quantizer.group_width(in_features)
    n_groups = -(-in_features // width)
    padding = n_groups * width - in_features
    padded = torch.nn.functional.pad(gram.float(), (0, padding, 0, padding))
    return padded.reshape(n_groups, width, n_groups, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


class ClipBounds(NamedTuple):
    """Clip bounds ``[2, out, n_groups]`` (lower, upper) from :func:`search_best_clip`: AutoAWQ's symmetric clip,
    and the separately refined bounds (None when not searched)."""

    symmetric: torch.Tensor
    separate: torch.Tensor | None

    @property
    def refined(self) -> torch.Tensor:
        """The most refined bounds searched: the separate ones where searched, else the symmetric ones."""
        return self.symmetric if self.separate is None else self.separate


@torch.inference_mode()
def search_best_clip(
    weight: torch.Tensor,
    gram: torch.Tensor,
    quantizer: WeightQuantizer,
    separate_bounds: bool = True,
    max_batch_elements: int = 2**24,
) -> ClipBounds:
    """Best clip bounds of ``weight [out, in]`` for the input Gram matrix ``gram [in, in]`` (``sum_t x_t x_t^T``
    over the calibration tokens).

    Scored per (output row, quantization group) by the squared error of the group-partial dot products over the
    tokens, ``sum_t (x_t,g . (w_g - q(w_g)))^2 = d_g G_g d_g^T`` with ``G_g`` the group's diagonal block of
    ``gram``: AutoAWQ's token loop on every calibration token (AutoAWQ samples 512) at a cost independent of their
    number. Stages of 10 candidates each, the first lowest error winning:

    1. AutoAWQ's symmetric clip: ``[-m, m]`` with ``m = max|w| * (1 - i / 20)``, ``i = 0..9`` (returned tightened
       to the group's own ``[min w, max w]``, which clamps identically);
    2. with ``separate_bounds``, the lower bound alone, ``lo * (1 - i / 20)`` with the upper one fixed;
    3. then the upper bound alone, likewise.

    An asymmetric quantizer's range is set by both ends, and the symmetric clip ties them: where a group's weights
    are skewed, the long side is clipped only as far as the short side allows. Stages 2 and 3 start from the
    previous stage's bounds (``i = 0``), so no group's calibration error ends above the symmetric clip's; they fit
    the calibration tokens more tightly, though (on tiny models calibrated on 128 tokens they cost held-out
    accuracy), so callers check them on held-out text. All candidates of as many rows as keep ``10 * rows * in``
    within ``max_batch_elements`` floats are evaluated at once (few large ops: a busy CPU makes small ops wait).
    """
    group_gram = diagonal_blocks(gram, quantizer)
    n_groups, width = group_gram.shape[0], group_gram.shape[1]
    rows_per_batch = max(1, max_batch_elements // (CLIP_STEPS * n_groups * width))
    shrink = 1 - torch.arange(CLIP_STEPS, dtype=torch.float32, device=weight.device) / CLIP_GRID
    shrink = shrink[:, None, None]
    symmetric, separate = [], []
    for rows in weight.float().split(rows_per_batch):
        grouped = quantizer.grouped(rows)
        lowest, highest = grouped.amin(dim=-1), grouped.amax(dim=-1)
        # [steps, rows, n_groups] candidates; clamping to [-m, m] equals clamping to these tightened bounds.
        magnitude = grouped.abs().amax(dim=-1) * shrink
        lower, upper = _best_bounds(
            grouped, torch.maximum(-magnitude, lowest), torch.minimum(magnitude, highest), quantizer, group_gram
        )
        symmetric.append(torch.stack([lower, upper]))
        if separate_bounds:
            fixed = (CLIP_STEPS, -1, -1)
            lower, upper = _best_bounds(grouped, lower * shrink, upper.expand(fixed), quantizer, group_gram)
            lower, upper = _best_bounds(grouped, lower.expand(fixed), upper * shrink, quantizer, group_gram)
            separate.append(torch.stack([lower, upper]))
    return ClipBounds(torch.cat(symmetric, dim=1), torch.cat(separate, dim=1) if separate_bounds else None)


def _best_bounds(
    grouped: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    quantizer: WeightQuantizer,
    group_gram: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) the candidate bounds ``lower, upper [steps, rows, n_groups]`` of ``grouped [rows,
    n_groups, width]`` with the lowest group-partial product error (the first on ties): two ``[rows, n_groups]``."""
    n_steps, n_rows, n_groups = lower.shape
    clipped = torch.clamp(grouped, lower[..., None], upper[..., None])
    quantized = quantizer.fake(clipped.reshape(n_steps * n_rows, -1)).reshape(n_steps, n_rows, n_groups, -1)
    # [n_groups, steps * rows, width]: quantization error of every candidate, group-major for the Gram product
    difference = quantized.neg_().add_(grouped).permute(2, 0, 1, 3).reshape(n_groups, n_steps * n_rows, -1)
    error = ((difference @ group_gram) * difference).sum(dim=-1).unflatten(-1, (n_steps, n_rows))
    best_step = error.argmin(dim=1).T[None]
    return lower.gather(0, best_step).squeeze(0), upper.gather(0, best_step).squeeze(0)


def scaled_gram(gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The Gram matrix ``[in, in]`` of the inputs ``x / scales`` from that of ``x``: ``G / (s s^T)``."""
    inverse = 1 / scales.float()
    return gram * inverse[:, None] * inverse[None, :]


def clamp_rows(weight: torch.Tensor, bounds: torch.Tensor, quantizer: WeightQuantizer) -> torch.Tensor:
    """``weight [out, in]`` clamped per ``(row, group)`` to the clip ``bounds [2, out, n_groups]`` (lower, upper)."""
    lower, upper = bounds.repeat_interleave(quantizer.group_width(weight.shape[1]), dim=2)[..., : weight.shape[1]]
    return torch.minimum(torch.maximum(weight, lower), upper)


@dataclass(frozen=True)
class ClipResult:
    """What :func:`apply_clip` did: ``(row, group)`` ranges shrunk, rows clipped, and rows whose clip the full-row
    check refused."""

    ranges_shrunk: int
    rows_clipped: int
    rows_refused: int


@torch.no_grad()
def apply_clip(
    weight: torch.Tensor, bounds: torch.Tensor, gram: torch.Tensor, quantizer: WeightQuantizer
) -> ClipResult:
    """Clamp ``weight [out, in]`` in place to the clip ``bounds [2, out, n_groups]`` (lower, upper) per ``(row,
    group)``, keeping each row's clip only where it lowers that row's whole output error ``d G d^T`` (``d = w -
    q(w)``, ``gram [in, in]``).

    The clip search scores every group alone; a row's output is the sum of its groups' partial products, and the
    cross-group terms it ignores can make a row's clips worse together than none (SmolLM2-135M W4, held-out wiki /
    news perplexity: 23.32 / 38.80 with every clip, 23.21 / 38.45 with this check). A refused row keeps its float
    weights unchanged.
    """
    original = weight.float()
    clipped = clamp_rows(original, bounds, quantizer)
    changed = (clipped != original).any(dim=1)
    error_plain = _row_errors(original - quantizer.fake(original), gram)
    error_clipped = _row_errors(original - quantizer.fake(clipped), gram)
    keep = changed & (error_clipped < error_plain)
    grouped = quantizer.grouped(original)
    shrunk = ((bounds[0] > grouped.amin(dim=-1)) | (bounds[1] < grouped.amax(dim=-1))) & keep[:, None]
    weight.copy_(torch.where(keep[:, None], clipped, original))
    return ClipResult(int(shrunk.sum()), int(keep.sum()), int((changed & ~keep).sum()))


def _row_errors(difference: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``[out]`` squared output error of each row of ``difference [out, in]`` over the tokens of ``gram [in, in]``."""
    return ((difference @ gram.float()) * difference).sum(dim=1)
