"""AWQ scaling groups of one decoder block, found from the module graph and by probing, never from module names.

A scaling group is a set of linears that read the very same input tensor, plus the op that produced that tensor
(the *producer*). AWQ multiplies the linears' input columns by ``s`` and folds ``1 / s`` into the producer, which
leaves the block function unchanged:

- a norm ``y = f(x) * w (+ b)``: ``w / s`` (and ``b / s``);
- an offset norm ``y = f(x) * (1 + w) (+ b)`` (Gemma family): ``(1 + w) / s - 1`` (and ``b / s``);
- a linear (or a contiguous row slice of a fused one) whose outputs reach the consumers only through per-channel
  products, e.g. ``up -> act(gate) * up -> down``, ``v -> attention -> o``: rows ``W / s, b / s``. Under grouped-query
  attention one value row feeds several output-projection input channels (one per query head sharing the kv head);
  those channels are *tied*: they must share one scale, which is then folded into that single value row. AutoAWQ
  skips ``v -> o`` whenever the shapes differ; tying keeps it for GQA/MQA models.

Every decision is checked on a short probe batch: a norm's fold kind by folding random scales and comparing the
norm's output, a linear producer by scaling its output rows by random factors and checking that every consumer
input channel scales by exactly the factor of one row (which row, per channel, is the channel map), and every
group by folding random scales into the whole block and comparing the block output. A group that fails the last
check is not scaled.

The layout also says which output rows of each linear are safe to clip: rows whose outputs reach their attention
module's output affinely (values, output projection), not through the attention scores (queries, keys).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .calibration import BlockCall, ModuleInputs, StopForward, first_tensor

logger = logging.getLogger(__name__)

# fp32 re-association noise is ~1e-7 relative; a wrong guess is off by O(1).
_EXACT_RTOL = 1e-5
_BLOCK_RTOL = 1e-4


class ProducerKind(enum.Enum):
    NORM = "norm"
    OFFSET_NORM = "offset_norm"
    LINEAR = "linear"


@dataclass(frozen=True)
class Producer:
    """The module whose output (``rows = (start, stop)`` of it, for a slice of a fused linear) is the group's input.

    ``channel_map`` (linear producers under GQA/MQA only): for each consumer input channel, the producer row (within
    ``rows``) it is a copy of; ``None`` means channel ``c`` is row ``c``.
    """

    name: str
    kind: ProducerKind
    rows: tuple[int, int] | None = None
    channel_map: tuple[int, ...] | None = None

    @property
    def row_slice(self) -> slice:
        return slice(None) if self.rows is None else slice(*self.rows)

    def tie(self, values: torch.Tensor) -> torch.Tensor:
        """Per-channel ``values [in_features]`` averaged over the channels copied from one producer row, so that
        scales computed from them can be folded into that row. Identity without a channel map."""
        if self.channel_map is None:
            return values
        return self._reduce_to_rows(values, "mean")[self._index(values.device)]

    def row_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """The factor each producer row is divided by for consumer-channel ``scales [in_features]``: the largest
        of its tied channels' scales (they are all equal when the scales honour the ties)."""
        if self.channel_map is None:
            return scales
        return self._reduce_to_rows(scales, "amax")

    def channel_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """The consumer-channel scales that folding ``scales`` really applies: ``row_scales`` copied back to the
        channels (equal to ``scales`` when they honour the ties)."""
        if self.channel_map is None:
            return scales
        return self.row_scales(scales)[self._index(scales.device)]

    def _index(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.channel_map, device=device)

    def _reduce_to_rows(self, values: torch.Tensor, reduce: str) -> torch.Tensor:
        """``values [in_features]`` reduced per producer row ``[n_rows]``; a row no channel copies gets 1."""
        index = self._index(values.device)
        rows = torch.ones(int(index.max()) + 1, dtype=values.dtype, device=values.device)
        return rows.scatter_reduce(0, index, values, reduce=reduce, include_self=False)

    def __str__(self) -> str:
        return self.name if self.rows is None else f"{self.name}[{self.rows[0]}:{self.rows[1]}]"


@dataclass(frozen=True)
class ScalingGroup:
    """Linears sharing one input, their producer, and the module whose output the scale search compares.

    ``inspect`` is the consumer linear itself for a single linear fed by a linear producer (its output goes
    straight on), otherwise the smallest module enclosing all the linears (``self_attn``, ``mlp``), because q/k/v
    or a fused projection only matter through what that module does with them. ``""`` is the block itself.
    """

    producer: Producer
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class BlockLayout:
    """What AWQ needs to know about one block.

    - ``input_sets``: every linear of the block, grouped by shared input tensor, in execution order.
    - ``groups``: the input sets that have a foldable producer.
    - ``clip_rows``: linear -> output rows safe to clip; linears absent here are not clipped.
    """

    input_sets: tuple[tuple[str, ...], ...]
    groups: tuple[ScalingGroup, ...]
    clip_rows: dict[str, slice]

    @property
    def unscaled_linears(self) -> tuple[str, ...]:
        scaled = {name for group in self.groups for name in group.linears}
        return tuple(name for names in self.input_sets for name in names if name not in scaled)


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScalingGroup, scales: torch.Tensor) -> None:
    """Multiply the group's linear input columns by ``scales [in_features]`` and fold ``1 / scales`` into the
    producer, in place. The block function is unchanged up to float rounding. With tied channels (GQA) the
    columns get :meth:`Producer.channel_scales`, which is ``scales`` itself when they honour the ties."""
    producer = block.get_submodule(group.producer.name)
    rows = group.producer.row_slice
    weight = producer.weight
    scales = scales.to(weight.dtype)
    producer_scales = group.producer.row_scales(scales)
    if group.producer.kind is ProducerKind.LINEAR:
        weight[rows].div_(producer_scales[:, None])
    elif group.producer.kind is ProducerKind.NORM:
        weight.div_(producer_scales)
    else:
        weight.copy_((1 + weight) / producer_scales - 1)
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias[rows].div_(producer_scales)
    column_scales = group.producer.channel_scales(scales)
    for name in group.linears:
        block.get_submodule(name).weight.mul_(column_scales)


@dataclass
class _ModuleCall:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any

    def inputs(self) -> ModuleInputs:
        return ModuleInputs(self.args, self.kwargs)


@dataclass
class _Trace:
    """First call of every submodule during one probe forward of the block, and the linears in call order."""

    calls: dict[str, _ModuleCall]
    linear_order: list[str]
    output: torch.Tensor

    def linear_input(self, name: str) -> torch.Tensor:
        call = self.calls[name]
        return call.args[0] if call.args else call.kwargs["input"]


@torch.inference_mode()
def discover_block_layout(block: nn.Module, probe: BlockCall, seed: int = 0) -> BlockLayout:
    """Scaling groups and clip rows of ``block``, from one traced forward of ``probe`` plus checking forwards.

    ``probe`` should be short (one sample of a few dozen tokens): every check reruns the block or a submodule.
    """
    generator = torch.Generator().manual_seed(seed)
    trace = _trace_block(block, probe)
    input_sets = _group_by_input(trace)
    groups = []
    for linears in input_sets:
        producer = _find_producer(block, probe, trace, linears, generator)
        if producer is None:
            continue
        group = ScalingGroup(producer, linears, _inspected_module(linears, producer))
        if _fold_is_exact(block, probe, trace.output, group, generator):
            groups.append(group)
        else:
            logger.warning(
                "AWQ: folding scales into %s changes the block output; group %s is not scaled.",
                producer,
                ", ".join(linears),
            )
    clip_rows = {}
    for name in trace.linear_order:
        rows = _clippable_rows(block, trace, name)
        if rows is not None:
            clip_rows[name] = rows
    return BlockLayout(tuple(input_sets), tuple(groups), clip_rows)


def _trace_block(block: nn.Module, probe: BlockCall) -> _Trace:
    calls: dict[str, _ModuleCall] = {}
    linear_order: list[str] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name not in calls:
                calls[name] = _ModuleCall(args, dict(kwargs), output)
                if isinstance(module, nn.Linear):
                    linear_order.append(name)

        return hook

    handles = [
        module.register_forward_hook(record(name), with_kwargs=True) for name, module in block.named_modules() if name
    ]
    try:
        output = probe.run(block)
    finally:
        for handle in handles:
            handle.remove()
    return _Trace(calls, linear_order, output)


def _group_by_input(trace: _Trace) -> list[tuple[str, ...]]:
    # The trace holds every input tensor, so their ids cannot be reused while we group.
    sets: dict[int, list[str]] = {}
    for name in trace.linear_order:
        sets.setdefault(id(trace.linear_input(name)), []).append(name)
    return [tuple(names) for names in sets.values()]


def _find_producer(
    block: nn.Module, probe: BlockCall, trace: _Trace, linears: tuple[str, ...], generator: torch.Generator
) -> Producer | None:
    shared_input = trace.linear_input(linears[0])
    for name, module in block.named_modules():
        call = trace.calls.get(name)
        if call is not None and not list(module.children()) and call.output is shared_input:
            kind = _norm_fold_kind(module, call, generator)
            if kind is not None:
                return Producer(name, kind)
    return _find_linear_producer(block, probe, trace, linears, generator)


def _norm_fold_kind(module: nn.Module, call: _ModuleCall, generator: torch.Generator) -> ProducerKind | None:
    """How 1/s folds into this leaf module, found by folding random scales and checking ``output / s``."""
    weight = getattr(module, "weight", None)
    output = call.output
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(output, torch.Tensor)):
        return None
    if weight.numel() != output.shape[-1]:
        return None
    scales = _random_factors(weight.numel(), generator).to(weight)
    bias = getattr(module, "bias", None)
    for kind in (ProducerKind.NORM, ProducerKind.OFFSET_NORM):
        with _restored(module):
            if kind is ProducerKind.NORM:
                weight.div_(scales)
            else:
                weight.copy_((1 + weight) / scales - 1)
            if isinstance(bias, torch.Tensor):
                bias.div_(scales)
            folded = first_tensor(module(*call.args, **call.kwargs))
        if _relative_error(folded, output / scales) <= _EXACT_RTOL:
            return kind
    return None


def _find_linear_producer(
    block: nn.Module, probe: BlockCall, trace: _Trace, linears: tuple[str, ...], generator: torch.Generator
) -> Producer | None:
    """The rows of an earlier linear whose per-row rescaling rescales every consumer input channel by the factor
    of one row: channel ``c`` by row ``c`` (same width), or by the row it was copied from (GQA/MQA: fewer rows)."""
    consumer = linears[0]
    consumer_input = trace.linear_input(consumer)
    width = consumer_input.shape[-1]
    earlier = trace.linear_order[: trace.linear_order.index(consumer)]
    # Nearest first: the producer of a consumer usually runs just before it.
    for name in reversed(earlier):
        if name in linears:
            continue
        out_features = block.get_submodule(name).out_features
        for rows in _candidate_row_slices(out_features, width):
            n_rows = len(range(out_features)[rows])
            factors = _random_factors(n_rows, generator).to(consumer_input)
            scaled_input = _consumer_input_with_scaled_rows(block, probe, name, rows, factors, consumer)
            channel_map = None if n_rows == width else _match_channels(scaled_input, consumer_input, factors)
            channel_factors = factors if channel_map is None else factors[list(channel_map)]
            if channel_factors.shape[-1] != width:
                continue
            if _relative_error(scaled_input, consumer_input * channel_factors) <= _EXACT_RTOL:
                whole = rows == slice(None)
                return Producer(name, ProducerKind.LINEAR, None if whole else (rows.start, rows.stop), channel_map)
    return None


def _candidate_row_slices(out_features: int, width: int) -> list[slice]:
    """Row ranges of a linear that may produce a ``width``-channel input: the whole linear or each ``width``-row
    slice of a fused one (plus the tail slice), then, for tied channels, ``width / k`` rows (the whole linear or
    its tail), widest first."""
    slices = []
    if out_features >= width:
        slices = [slice(start, start + width) for start in range(0, out_features - width + 1, width)]
        if slice(out_features - width, out_features) not in slices:
            slices.append(slice(out_features - width, out_features))
    for copies in range(2, width + 1):
        n_rows = width // copies
        if width % copies or n_rows > out_features:
            continue
        tail = slice(out_features - n_rows, out_features)
        if tail not in slices:
            slices.append(tail)
    return [slice(None) if rows == slice(0, out_features) else rows for rows in slices]


def _match_channels(
    scaled_input: torch.Tensor, consumer_input: torch.Tensor, factors: torch.Tensor
) -> tuple[int, ...] | None:
    """For each consumer channel, the row whose factor its least-squares ratio ``scaled / original`` is nearest
    to (the caller verifies the match exactly); ``None`` when a channel never carries signal."""
    original = consumer_input.reshape(-1, consumer_input.shape[-1]).double()
    scaled = scaled_input.reshape(-1, consumer_input.shape[-1]).double()
    energy = original.pow(2).sum(0)
    if not bool((energy > 0).all()):
        return None
    ratio = (scaled * original).sum(0) / energy
    return tuple((ratio.log()[:, None] - factors.double().log()[None, :]).abs().argmin(dim=1).tolist())


def _consumer_input_with_scaled_rows(
    block: nn.Module, probe: BlockCall, producer: str, rows: slice, factors: torch.Tensor, consumer: str
) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def scale_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        scaled = output.clone()
        scaled[..., rows] *= factors
        return scaled

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["input"])
        raise StopForward

    handles = [
        block.get_submodule(producer).register_forward_hook(scale_rows),
        block.get_submodule(consumer).register_forward_pre_hook(capture, with_kwargs=True),
    ]
    try:
        probe.run(block)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured[0]


def _inspected_module(linears: tuple[str, ...], producer: Producer) -> str:
    if len(linears) == 1 and producer.kind is ProducerKind.LINEAR:
        return linears[0]
    parents = [name.split(".")[:-1] for name in linears]
    common = []
    for parts in zip(*parents):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _fold_is_exact(
    block: nn.Module, probe: BlockCall, reference: torch.Tensor, group: ScalingGroup, generator: torch.Generator
) -> bool:
    width = block.get_submodule(group.linears[0]).in_features
    touched = [block.get_submodule(group.producer.name)] + [block.get_submodule(name) for name in group.linears]
    with _restored(*touched):
        fold_scales(block, group, _random_factors(width, generator).to(reference.device))
        folded = probe.run(block)
    return _relative_error(folded, reference) <= _BLOCK_RTOL


def _clippable_rows(block: nn.Module, trace: _Trace, linear: str) -> slice | None:
    """Rows of ``linear`` whose outputs may be clipped; ``None`` to skip the linear.

    Outside attention modules (submodules called with an ``attention_mask`` kwarg) every row may be clipped. Inside
    one, clipping rows that feed the attention scores (q, k) is skipped, as in AWQ ("due to qk bmm"): only the
    longest tail of rows in which the attention output is affine is clipped. That is all of v or o, nothing of q
    or k, and the v rows of a fused ``[q; k; v]`` projection (a layout interleaving heads gets its last v run).
    """
    attention = _attention_ancestor(trace, linear)
    if attention is None:
        return slice(None)
    out_features = block.get_submodule(linear).out_features
    start = _affine_tail_start(block, trace, attention, linear, out_features)
    if start == 0:
        return slice(None)
    return slice(start, out_features) if start < out_features else None


def _attention_ancestor(trace: _Trace, linear: str) -> str | None:
    """The nearest enclosing submodule (not the block itself) that was called with an ``attention_mask``."""
    parts = linear.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:depth])
        call = trace.calls.get(ancestor)
        if call is not None and "attention_mask" in call.kwargs:
            return ancestor
    return None


def _affine_tail_start(block: nn.Module, trace: _Trace, attention: str, linear: str, out_features: int) -> int:
    """Smallest ``start`` such that the attention output is affine in ``linear``'s rows ``[start:]``.

    Affinity of a tail is monotone in ``start`` (a sub-range of an affine range is affine), so bisection works;
    ``out_features`` means no tail is affine.
    """
    module = block.get_submodule(attention)
    inputs = trace.calls[attention].inputs()
    reference = first_tensor(trace.calls[attention].output)
    linear_module = block.get_submodule(linear)

    def output_with_tail_scaled(start: int, factor: float) -> torch.Tensor:
        def scale_tail(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            scaled = output.clone()
            scaled[..., start:] *= factor
            return scaled

        handle = linear_module.register_forward_hook(scale_tail)
        try:
            return inputs.run(module)
        finally:
            handle.remove()

    def is_affine(start: int) -> bool:
        at_zero = output_with_tail_scaled(start, 0.0)
        at_two = output_with_tail_scaled(start, 2.0)
        return _relative_error(at_two - at_zero, 2 * (reference - at_zero)) <= _BLOCK_RTOL

    if is_affine(0):
        return 0
    if not is_affine(out_features - 1):
        return out_features
    not_affine, affine = 0, out_features - 1
    while affine - not_affine > 1:
        middle = (not_affine + affine) // 2
        if is_affine(middle):
            affine = middle
        else:
            not_affine = middle
    return affine


def _random_factors(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` positive factors in ``[0.5, 2]``, log-uniform, so every channel moves by a distinct amount."""
    return torch.exp((torch.rand(n, generator=generator) * 2 - 1) * 0.6931)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (0 when both vanish)."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    return error / scale if scale > 0 else error


@contextlib.contextmanager
def _restored(*modules: nn.Module) -> Iterator[None]:
    """Undo any in-place change to the modules' parameters on exit."""
    saved = [(param, param.detach().clone()) for module in modules for param in module.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)
