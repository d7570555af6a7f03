"""The AWQ transform (Lin et al., as implemented in llm-awq / AutoAWQ) on a float model, block by block.

:func:`apply_awq` leaves the float model with AWQ-transformed weights: per scaling group, the best activation-aware
input scales are multiplied into the linears and ``1 / s`` is folded into the producing op (the model function is
unchanged), then the weights are clipped. Real quantization (``quantize_groupwise``) and packing come after, from
the caller. Which linears form groups, what produces their input and which rows may be clipped is found from the
module graph (:mod:`.scaling_groups`), so any decoder-only architecture works without a per-model table.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.quantizers.quantizers_utils import should_convert_module

from .calibration import (
    BlockActivations,
    BlockCall,
    capture_block_activations,
    capture_block_inputs,
    find_decoder_blocks,
    held_bytes,
    propagate,
)
from .config import is_clip_choice
from .scaling_groups import BlockLayout, ScalingGroup, discover_block_layout, fold_scales
from .search import (
    ClipResult,
    GramError,
    ReplayError,
    WeightQuantizer,
    apply_clip,
    scaled_gram,
    search_best_clip,
    search_best_scales,
)

logger = logging.getLogger(__name__)

# Graph discovery reruns the block a few dozen times; a short single-sequence probe keeps that negligible.
PROBE_TOKENS = 16


@dataclass(frozen=True)
class GroupReport:
    """One scaling group: ``producer -> linears``, the module whose output was compared, and the search result.

    ``error_rtn`` / ``error_awq``: MSE of ``inspected``'s output with plain RTN (``s = 1``) / with the chosen
    scales, before clipping; ``best_alpha`` is None where plain RTN was best (scales left at 1).
    """

    producer: str
    linears: tuple[str, ...]
    inspected: str
    best_alpha: float | None
    error_rtn: float
    error_awq: float


@dataclass(frozen=True)
class BlockReport:
    """What AWQ did to one decoder block (names are relative to the block).

    - ``unscaled``: linears without a foldable producer; they are only clipped.
    - ``clipped``: linear (``name[start:stop]`` when only those rows may be clipped, e.g. a fused qkv's v rows)
      -> what its clip did (:class:`~.search.ClipResult`).
    - ``clip_skipped``: linears not clipped because their outputs feed attention scores (q, k) or are not
      quantized.
    - ``held_bytes``: calibration activations alive while this block was processed (its inputs, outputs and
      captured module inputs).
    - ``seconds``: wall time of each phase.
    """

    name: str
    groups: tuple[GroupReport, ...]
    unscaled: tuple[str, ...]
    clipped: dict[str, ClipResult]
    clip_skipped: tuple[str, ...]
    held_bytes: int
    seconds: dict[str, float]


@dataclass(frozen=True)
class ClipValidation:
    """The ``clip="auto"`` decision: mean next-token NLL of the quantized model on validation tokens (calibration
    text the searches never saw) with every clip (separate lower / upper bounds) and with none; the clips stay only
    if they lower it."""

    nll_clipped: float
    nll_unclipped: float
    n_tokens: int

    @property
    def kept(self) -> bool:
        return self.nll_clipped < self.nll_unclipped


@dataclass
class AwqReport:
    """Per-block record of an :func:`apply_awq` run; ``print(report)`` shows a table."""

    bits: int
    group_size: int
    n_samples: int
    seq_len: int
    blocks: list[BlockReport] = field(default_factory=list)
    clip_validation: ClipValidation | None = None
    seconds: float = 0.0

    def phase_seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for block in self.blocks:
            for phase, seconds in block.seconds.items():
                totals[phase] = totals.get(phase, 0.0) + seconds
        return totals

    def __str__(self) -> str:
        phases = ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in self.phase_seconds().items())
        peak_mib = max((block.held_bytes for block in self.blocks), default=0) / 2**20
        header = (
            f"AWQ W{self.bits} g{self.group_size}: {len(self.blocks)} blocks, calibration {self.n_samples}x"
            f"{self.seq_len} tokens, {self.seconds:.1f} s ({phases}), peak activations {peak_mib:.0f} MiB"
        )
        if self.clip_validation is not None:
            check = self.clip_validation
            header += (
                f"\nclip {'kept' if check.kept else 'undone'}: validation NLL {check.nll_clipped:.4f} with the clips, "
                f"{check.nll_unclipped:.4f} without ({check.n_tokens} tokens)"
            )
        rows = [("block", "producer", "linears", "inspected", "alpha", "mse rtn", "mse awq")]
        notes = []
        for block in self.blocks:
            for group in block.groups:
                rows.append((
                    block.name, group.producer, ", ".join(group.linears), group.inspected,
                    "s=1" if group.best_alpha is None else f"{group.best_alpha:.2f}",
                    f"{group.error_rtn:.3e}", f"{group.error_awq:.3e}",
                ))
            clipped = ", ".join(
                f"{name} {result.ranges_shrunk} ({result.rows_refused} rows refused)"
                for name, result in block.clipped.items()
            )
            notes.append(
                f"{block.name}: unscaled {', '.join(block.unscaled) or '-'}; clipped (row, group) ranges "
                f"{clipped or '-'}; clip skipped {', '.join(block.clip_skipped) or '-'}"
            )
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        return "\n".join([header, *table, *notes])


@dataclass(frozen=True)
class _Settings:
    quantizer: WeightQuantizer
    scale_search: bool
    n_grid: int
    duo_scaling: bool
    clip: bool
    separate_bounds: bool
    quantized_inputs: bool
    modules_to_not_convert: tuple[str, ...]

    def converts(self, full_name: str) -> bool:
        return should_convert_module(full_name, list(self.modules_to_not_convert))


def apply_awq(
    model: nn.Module,
    calibration_ids: torch.LongTensor,
    *,
    bits: int,
    group_size: int,
    modules_to_not_convert: Iterable[str] = frozenset(),
    scale_search: bool = True,
    n_grid: int = 20,
    duo_scaling: bool = True,
    clip: bool | str = True,
    quantized_inputs: bool = True,
    validation_ids: torch.LongTensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> AwqReport:
    """AWQ-transform the float ``model`` in place with ``calibration_ids [n_samples, seq_len]``.

    Args:
        bits, group_size: the weight quantizer the search optimises for (``group_size=-1``: per channel); the
            caller must quantize with the same ``quantize_groupwise(weight, bits, group_size)``.
        modules_to_not_convert: full-name patterns (transformers' ``should_convert_module`` rules) of linears
            that stay float: they are neither quantized in the search nor clipped.
        scale_search: run the activation-aware scale search (off: only the clipping search runs).
        n_grid: scale candidates ``alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}``.
        duo_scaling: ``s = s_x^alpha / w_mean^(1-alpha)`` (AutoAWQ's default) instead of ``s = s_x^alpha``.
        clip: run AutoAWQ's weight-clipping search after scaling (on every calibration token, through per-group
            Gram matrices, where AutoAWQ samples 512 tokens), keeping a row's clips only where they lower its whole
            output error (:func:`~.search.apply_clip`). ``"auto"`` with ``validation_ids``: the pass applies
            separately refined lower / upper bounds instead (:func:`~.search.search_best_clip`), then keeps them
            only if they lower the quantized model's next-token NLL on ``validation_ids`` (:class:`ClipValidation`);
            ``"auto"`` without them is ``True``.
        quantized_inputs: calibrate each block on the outputs of the blocks before it *as quantized* (what it
            sees at inference; the float reference of its search is the float block on those inputs) instead of
            the float model's outputs (llm-awq / AutoAWQ).
        validation_ids: ``[n_validation, seq_len]`` tokens for ``clip="auto"``, disjoint from
            ``calibration_ids``.
        batch_size: samples per forward when running blocks (bounds the per-forward activation memory).
        progress: show a progress bar over blocks.

    Returns:
        An :class:`AwqReport`. The model is in its original train/eval mode again.
    """
    _validate(calibration_ids, bits, group_size, n_grid, batch_size)
    if not is_clip_choice(clip):
        raise ValueError(f"clip must be True, False or 'auto', got {clip!r}.")
    settings = _Settings(
        WeightQuantizer(bits, group_size),
        scale_search,
        n_grid,
        duo_scaling,
        bool(clip),
        clip == "auto" and validation_ids is not None,
        quantized_inputs,
        tuple(modules_to_not_convert),
    )
    blocks_name, blocks = find_decoder_blocks(model)
    report = AwqReport(bits, group_size, *calibration_ids.shape)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        device = next(blocks[0].parameters()).device
        calls = capture_block_inputs(model, blocks[0], calibration_ids.to(device), batch_size)
        probe = capture_block_inputs(model, blocks[0], calibration_ids[:1, :PROBE_TOKENS].to(device), 1)
        clips = ClipChanges()
        for index, block in enumerate(tqdm(blocks, desc="AWQ", unit="block", disable=not progress)):
            block_report, calls, probe = _transform_block(
                block, f"{blocks_name}.{index}", calls, probe, settings, clips
            )
            report.blocks.append(block_report)
            _log_block(block_report)
        del calls, probe
        if settings.separate_bounds and clips:
            linears = [
                module
                for index, block in enumerate(blocks)
                for name, module in block.named_modules()
                if isinstance(module, nn.Linear) and settings.converts(f"{blocks_name}.{index}.{name}")
            ]
            report.clip_validation = _validate_clips(model, validation_ids.to(device), linears, clips, settings)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


class _Stopwatch:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self._last
        self._last = now


class ClipChanges:
    """The weight entries the clips changed, ``(flat weight view, flat indices, values before, values after)`` per
    clipped linear: few entries (only those beyond a clip bound), so the clips can be undone and redone cheaply."""

    def __init__(self) -> None:
        self._changes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __bool__(self) -> bool:
        return bool(self._changes)

    def record(self, flat_weight: torch.Tensor, before: torch.Tensor) -> None:
        """``flat_weight`` (a view of the weight, already clipped) against its ``before`` values."""
        index = (flat_weight != before).nonzero().squeeze(1)
        if index.numel():
            self._changes.append((flat_weight, index, before[index], flat_weight[index].clone()))

    @torch.no_grad()
    def undo(self) -> None:
        for flat_weight, index, before, _ in self._changes:
            flat_weight[index] = before

    @torch.no_grad()
    def redo(self) -> None:
        for flat_weight, index, _, after in self._changes:
            flat_weight[index] = after


@torch.inference_mode()
def _transform_block(
    block: nn.Module,
    name: str,
    calls: list[BlockCall],
    probe: list[BlockCall],
    settings: _Settings,
    clips: ClipChanges,
) -> tuple[BlockReport, list[BlockCall], list[BlockCall]]:
    """Search, fold and clip one block (recording the clips in ``clips``); returns its report, the next block's
    inputs and the (float) probe."""
    stopwatch = _Stopwatch()
    layout = discover_block_layout(block, probe[0])
    quantized = {linear: settings.converts(f"{name}.{linear}") for names in layout.input_sets for linear in names}
    groups = [group for group in layout.groups if any(quantized[linear] for linear in group.linears)]
    if not settings.scale_search:
        groups = []
    stopwatch.lap("discover")

    # A group inspecting its single linear is scored from that linear's input Gram matrix (exact, cheap); the clip
    # search and its row check use every input's Gram matrix.
    gram_scored = {group.inspect for group in groups if group.inspect in group.linears}
    input_linears = [names[0] for names in layout.input_sets]
    activations = capture_block_activations(
        block,
        calls,
        replay_modules={group.inspect for group in groups if group.inspect not in gram_scored},
        input_linears=input_linears,
        gram_linears=set(input_linears) if settings.clip else gram_scored,
    )
    next_probe = propagate(block, probe)
    held = held_bytes(calls, activations)
    stopwatch.lap("capture")

    group_reports, input_scales = _search_and_fold_scales(block, groups, quantized, activations, settings)
    activations.replay_inputs.clear()
    stopwatch.lap("scale_search")

    clipped = _clip_block(block, layout, quantized, activations.input_gram, input_scales, settings, clips)
    stopwatch.lap("clip_search")

    next_calls = activations.outputs
    if settings.quantized_inputs:
        next_calls = _quantized_block_outputs(block, calls, quantized, settings.quantizer)
        stopwatch.lap("propagate")

    block_report = BlockReport(
        name=name,
        groups=tuple(group_reports),
        unscaled=tuple(linear for linear in layout.unscaled_linears if quantized[linear]),
        clipped=clipped,
        clip_skipped=tuple(
            linear for linear, converts in quantized.items() if not converts or linear not in layout.clip_rows
        ),
        held_bytes=held,
        seconds=stopwatch.laps,
    )
    return block_report, next_calls, next_probe


def _search_and_fold_scales(
    block: nn.Module,
    groups: list[ScalingGroup],
    quantized: dict[str, bool],
    activations: BlockActivations,
    settings: _Settings,
) -> tuple[list[GroupReport], dict[str, torch.Tensor]]:
    """Search every group's scales on the unmodified block, then fold them all (AutoAWQ's order).

    Returns the group reports and linear -> the input scales ``[in_features]`` its weight now carries.
    """
    reports, results = [], []
    for group in groups:
        inspected = block.get_submodule(group.inspect)
        if group.inspect in activations.input_gram:
            output_error = GramError(inspected, activations.input_gram[group.inspect], activations.n_tokens)
        else:
            output_error = ReplayError(inspected, activations.replay_inputs[group.inspect])
        result = search_best_scales(
            output_error,
            [block.get_submodule(linear) for linear in group.linears],
            [quantized[linear] for linear in group.linears],
            activations.input_abs_mean[group.linears[0]],
            settings.quantizer,
            settings.n_grid,
            settings.duo_scaling,
            tie=group.producer.tie,
        )
        results.append(result)
        reports.append(
            GroupReport(
                str(group.producer), group.linears, group.inspect, result.best_alpha, result.error_rtn,
                result.error_awq,
            )
        )
    input_scales = {}
    for group, result in zip(groups, results):
        fold_scales(block, group, result.scales)
        input_scales.update({linear: group.producer.channel_scales(result.scales) for linear in group.linears})
    return reports, input_scales


def _clip_block(
    block: nn.Module,
    layout: BlockLayout,
    quantized: dict[str, bool],
    input_gram: dict[str, torch.Tensor],
    input_scales: dict[str, torch.Tensor],
    settings: _Settings,
    clips: ClipChanges,
) -> dict[str, ClipResult]:
    """Clip every quantized linear's clippable rows (recorded in ``clips``); returns linear -> what its clip did."""
    if not settings.clip:
        return {}
    clipped = {}
    for names in layout.input_sets:
        for linear in names:
            if not quantized[linear] or linear not in layout.clip_rows:
                continue
            # The weights now hold W * s, so the matching inputs are x / s.
            gram = input_gram[names[0]]
            if linear in input_scales:
                gram = scaled_gram(gram, input_scales[linear])
            rows = layout.clip_rows[linear]
            weight = block.get_submodule(linear).weight.detach()[rows]
            before = weight.flatten().clone()
            bounds = search_best_clip(weight, gram, settings.quantizer, separate_bounds=settings.separate_bounds)
            label = linear if rows == slice(None) else f"{linear}[{rows.start}:{rows.stop}]"
            clipped[label] = apply_clip(weight, bounds.refined, gram, settings.quantizer)
            clips.record(weight.view(-1), before)
    return clipped


def _quantized_block_outputs(
    block: nn.Module, calls: list[BlockCall], quantized: dict[str, bool], quantizer: WeightQuantizer
) -> list[BlockCall]:
    """The block's outputs with its quantized linears rounded as the packer will round them."""
    with _fake_quantized([block.get_submodule(name) for name, converts in quantized.items() if converts], quantizer):
        return propagate(block, calls)


@contextlib.contextmanager
def _fake_quantized(linears: list[nn.Linear], quantizer: WeightQuantizer) -> Iterator[None]:
    """Run ``linears`` on their quantized-dequantized weights within the ``with`` statement, restoring the float
    weights after it (on errors too); holds one float copy of their weights meanwhile."""
    originals = [linear.weight.detach().clone() for linear in linears]
    try:
        with torch.no_grad():
            for linear in linears:
                linear.weight.copy_(quantizer.fake(linear.weight))
        yield
    finally:
        with torch.no_grad():
            for linear, original in zip(linears, originals):
                linear.weight.copy_(original)


def _validate_clips(
    model: nn.Module, validation_ids: torch.LongTensor, linears: list[nn.Linear], clips: ClipChanges, settings: _Settings
) -> ClipValidation:
    """Measure the quantized model with and without the clips on ``validation_ids``; leave the better one."""
    nll_clipped, n_tokens = _quantized_nll(model, validation_ids, linears, settings.quantizer)
    clips.undo()
    nll_unclipped, _ = _quantized_nll(model, validation_ids, linears, settings.quantizer)
    check = ClipValidation(nll_clipped, nll_unclipped, n_tokens)
    if check.kept:
        clips.redo()
    logger.info("AWQ clip %s: validation NLL %.4f clipped, %.4f unclipped", "kept" if check.kept else "undone",
                nll_clipped, nll_unclipped)
    return check


@torch.inference_mode()
def _quantized_nll(
    model: nn.Module, ids: torch.LongTensor, linears: list[nn.Linear], quantizer: WeightQuantizer
) -> tuple[float, int]:
    """Mean next-token NLL of ``model`` on ``ids [n, seq]`` with ``linears`` running on their quantized weights,
    and the number of predicted tokens. One sequence per forward: logits are ``[seq, vocab]`` fp32."""
    total, count = 0.0, 0
    with _fake_quantized(linears, quantizer):
        for sequence in ids.split(1):
            logits = model(input_ids=sequence, use_cache=False).logits[0, :-1].float()
            total += F.cross_entropy(logits, sequence[0, 1:], reduction="sum").item()
            count += sequence.shape[1] - 1
    return total / count, count


def _log_block(block: BlockReport) -> None:
    gains = [group.error_awq / group.error_rtn for group in block.groups if group.error_rtn > 0]
    mean_gain = sum(gains) / len(gains) if gains else float("nan")
    logger.info(
        "AWQ %s: %d scaling groups (mean output MSE awq/rtn %.3f), %d linears clipped, %d unscaled, %.1f s",
        block.name,
        len(block.groups),
        mean_gain,
        len(block.clipped),
        len(block.unscaled),
        sum(block.seconds.values()),
    )


def _validate(calibration_ids: torch.Tensor, bits: int, group_size: int, n_grid: int, batch_size: int) -> None:
    is_tensor = isinstance(calibration_ids, torch.Tensor)
    if not is_tensor or calibration_ids.dim() != 2 or calibration_ids.is_floating_point():
        shape = tuple(calibration_ids.shape) if is_tensor else type(calibration_ids)
        raise ValueError(
            f"calibration_ids must be an integer tensor [n_samples, seq_len], got {shape}; tokenize the calibration "
            "text and stack equal-length samples."
        )
    if calibration_ids.numel() == 0:
        raise ValueError(f"calibration_ids is empty ({tuple(calibration_ids.shape)}); pass at least one token.")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}; AWQ is usually run with bits=4.")
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(f"group_size must be a positive integer or -1 (per channel), got {group_size!r}.")
    for name, value in (("n_grid", n_grid), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
