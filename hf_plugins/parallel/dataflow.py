"""Which linear layers feed which: read from one real forward pass, the graph the automatic TP rules work on.

Every tensor a linear layer produces is tagged with that layer's name, and a ``TorchFunctionMode`` carries the
tags through every other op (views, RoPE, attention, activations, norms ...). Each linear thus sees which
linears its input derives from since the last all-reduce. Classification happens online, in call order, because
a row-parallel layer's all-reduce makes its output replicated again (untagged), which decides its consumers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# Products of two activations: attention scores and attention-weighted values. Linears whose outputs meet here
# hold heads, which must be split whole.
_ACTIVATION_PRODUCTS = {
    F.scaled_dot_product_attention,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.einsum,
}
# Ops that cut a tensor's last dimension into parts: on a column-parallel output each rank would cut its own
# shard instead of the whole width (a fused q|k|v or gate|up projection).
_SPLITS = {torch.split, torch.Tensor.split, torch.chunk, torch.Tensor.chunk, torch.Tensor.__getitem__,
           torch.tensor_split, torch.Tensor.tensor_split, torch.Tensor.unbind, torch.unbind}


def is_linear(module: nn.Module) -> bool:
    """A leaf module computing ``x @ W^T (+ b)``: ``nn.Linear`` or a quantized linear exposing its feature sizes."""
    if isinstance(module, nn.Linear):
        return True
    return (
        hasattr(module, "in_features") and hasattr(module, "out_features") and next(module.children(), None) is None
    )


def is_norm(module: nn.Module) -> bool:
    """A normalisation module: ``nn.LayerNorm``/``nn.RMSNorm`` or a model's own ``*Norm`` class with a weight."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    return type(module).__name__.endswith("Norm") and isinstance(getattr(module, "weight", None), torch.Tensor)


@dataclass
class LinearFlow:
    """What one forward showed about the model's linear layers (names as in ``named_modules``).

    Fields:
        order: every linear, in first-call order.
        sources: per linear, the linears its input derived from (empty: a replicated input).
        heads: linears whose outputs met another activation in an attention product.
        split: linears whose outputs were cut into parts along the last dimension.
        norm_inputs: per norm module that saw linear outputs, those linears.
        norm_widths: per such norm, how many features it normalises together (its weight's size).
        reaches_output: linears whose tags reached the model's output.
        in_features / out_features: per linear.
    """

    order: list[str] = field(default_factory=list)
    sources: dict[str, frozenset[str]] = field(default_factory=dict)
    heads: set[str] = field(default_factory=set)
    split: set[str] = field(default_factory=set)
    norm_inputs: dict[str, frozenset[str]] = field(default_factory=dict)
    norm_widths: dict[str, int] = field(default_factory=dict)
    reaches_output: set[str] = field(default_factory=set)
    in_features: dict[str, int] = field(default_factory=dict)
    out_features: dict[str, int] = field(default_factory=dict)


class _TagPropagation(TorchFunctionMode):
    """Carries linear-name tags from op inputs to op outputs; records attention products and splits."""

    def __init__(self, flow: LinearFlow) -> None:
        super().__init__()
        self.flow = flow
        self.tags: dict[int, frozenset[str]] = {}
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self._alive: list[torch.Tensor] = []  # keeps tagged tensors alive so their ids stay unique

    def tags_of(self, tree) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                found |= self.tags.get(id(leaf), frozenset())
        return found

    def tag(self, tree, tags: frozenset[str] | None) -> None:
        """Give every tensor in ``tree`` exactly ``tags`` (None or empty: untagged)."""
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                if tags:
                    self.tags[id(leaf)] = tags
                    self._alive.append(leaf)
                else:
                    self.tags.pop(id(leaf), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tagged = [self.tags.get(id(t), frozenset()) for t in tensors]
        sources = frozenset().union(*tagged) if tagged else frozenset()
        if not sources:
            return out
        if func in _ACTIVATION_PRODUCTS and sum(1 for t in tagged if t) >= 2:
            self.flow.heads |= sources
        if func in _SPLITS and _cuts_last_dim(func, args, kwargs):
            # Only a cut of the projection's output as it left the layer, not of head_dim after a view (RoPE).
            shape = tuple(args[0].shape)
            self.flow.split |= {name for name in sources if self.output_shapes.get(name) == shape}
        self.tag(out, sources)
        return out


def _cuts_last_dim(func, args, kwargs) -> bool:
    """Whether a split/chunk/index op cuts the last dimension of its tensor into parts."""
    tensor = args[0]
    if func in (torch.Tensor.__getitem__,):
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if Ellipsis in index:
            last = index[-1] if index[-1] is not Ellipsis else slice(None)
        elif len(index) == tensor.ndim:
            last = index[-1]
        else:
            return False
        return isinstance(last, slice) and last != slice(None)
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    return dim in (-1, tensor.ndim - 1)


def trace_linear_flow(model: nn.Module, example_inputs: dict, replicated: frozenset[str] = frozenset()) -> LinearFlow:
    """Run ``model(**example_inputs)`` once and record its :class:`LinearFlow`.

    Args:
        model: any module (a causal LM); its linears are the leaves accepted by :func:`is_linear`.
        example_inputs: keyword inputs of one small forward (e.g. ``{"input_ids": [1, 8]}``).
        replicated: linears to treat as unsharded: their outputs stay untagged.
    """
    flow = LinearFlow()
    mode = _TagPropagation(flow)
    names = {module: name for name, module in model.named_modules()}
    handles = []

    def before_linear(module, args, kwargs):
        name = names[module]
        if name not in flow.sources:
            flow.order.append(name)
            flow.in_features[name] = int(module.in_features)
            flow.out_features[name] = int(module.out_features)
        flow.sources[name] = flow.sources.get(name, frozenset()) | mode.tags_of((args, kwargs))

    def after_linear(module, args, kwargs, output):
        name = names[module]
        # A linear with a sharded input is row-parallel: its all-reduce leaves a replicated output.
        sharded_out = name not in replicated and not flow.sources[name]
        mode.output_shapes[name] = tuple(output.shape)
        mode.tag(output, frozenset({name}) if sharded_out else None)
        return output

    def before_norm(module, args, kwargs):
        sources = mode.tags_of((args, kwargs))
        if sources:
            name = names[module]
            flow.norm_inputs[name] = flow.norm_inputs.get(name, frozenset()) | sources
            flow.norm_widths[name] = module.weight.numel()

    for module in names:
        if is_linear(module):
            handles.append(module.register_forward_pre_hook(before_linear, with_kwargs=True))
            handles.append(module.register_forward_hook(after_linear, with_kwargs=True))
        elif is_norm(module):
            handles.append(module.register_forward_pre_hook(before_norm, with_kwargs=True))
    try:
        with torch.no_grad(), mode:
            output = model(**example_inputs)
        flow.reaches_output = set(mode.tags_of(output))
    finally:
        for handle in handles:
            handle.remove()
    return flow

