"""Calibration activations for AWQ: find the decoder blocks, catch block 0's inputs, walk the blocks one by one.

Memory model: the caller holds one block's inputs (mini-batches of ``hidden_states [batch, seq, hidden]``) at a
time; :func:`capture_block_activations` adds that block's outputs (the next block's inputs) and the activations
the current block's search needs. Nothing is kept across blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook once the wanted activation is captured, so the rest of the forward is skipped."""


@dataclass
class BlockCall:
    """One mini-batch of a decoder block's inputs.

    ``hidden_states`` is ``[batch, seq, hidden]``; ``kwargs`` holds everything else the model passed to the block
    (attention mask, position embeddings / ids, ``use_cache=False`` ...), reused unchanged for every block.
    """

    hidden_states: torch.Tensor
    kwargs: dict[str, Any]

    def run(self, module: nn.Module) -> torch.Tensor:
        """``module(hidden_states, **kwargs)``, reduced to the hidden states ``[batch, seq, hidden]``."""
        return first_tensor(module(self.hidden_states, **self.kwargs))

    def with_hidden_states(self, hidden_states: torch.Tensor) -> BlockCall:
        return BlockCall(hidden_states, self.kwargs)


@dataclass
class ModuleInputs:
    """The positional and keyword arguments of one call of a module (one mini-batch), to replay it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, module: nn.Module) -> torch.Tensor:
        return first_tensor(module(*self.args, **self.kwargs))

    @property
    def hidden(self) -> torch.Tensor:
        """The first tensor argument: the hidden states ``[batch, seq, hidden]``."""
        return next(value for value in (*self.args, *self.kwargs.values()) if isinstance(value, torch.Tensor))

    def leading(self, rows: int) -> ModuleInputs:
        """The same call on its first ``rows`` samples: tensors of 2+ dims whose leading dim is the batch are sliced
        (inside tuples too); broadcast tensors (leading dim 1) and 1-D ones (positions) are kept."""
        batch = self.hidden.shape[0]

        def sliced(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
                return value[:rows]
            if isinstance(value, tuple):
                return tuple(sliced(item) for item in value)
            return value

        return ModuleInputs(tuple(sliced(a) for a in self.args), {k: sliced(v) for k, v in self.kwargs.items()})


@dataclass
class BlockActivations:
    """What one block's search needs, captured in one pass over the calibration mini-batches.

    - ``replay_inputs``: inspected module name -> its inputs, one :class:`ModuleInputs` per mini-batch.
    - ``input_abs_mean``: linear name -> ``[in_features]`` mean ``|x|`` of its input over all calibration tokens.
    - ``input_gram``: linear name -> ``[in_features, in_features]`` ``sum_t x_t x_t^T`` over all tokens (fp32).
    - ``n_tokens``: calibration tokens seen by each linear.
    - ``outputs``: the block's outputs as the next block's inputs (computed before the block is modified).
    """

    replay_inputs: dict[str, list[ModuleInputs]] = field(default_factory=dict)
    input_abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    input_gram: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: int = 0
    outputs: list[BlockCall] = field(default_factory=list)


def first_tensor(output: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple such as ``(attn_out, weights)``."""
    return output[0] if isinstance(output, (tuple, list)) else output


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ``nn.ModuleList`` whose children all share one class: the decoder blocks, and its name."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of identical decoder blocks; AWQ needs a decoder-only "
            "transformer whose blocks live in one ModuleList."
        )
    return best


@torch.inference_mode()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, input_ids: torch.LongTensor, batch_size: int
) -> list[BlockCall]:
    """Run ``model`` on ``input_ids [n_samples, seq]`` in mini-batches and catch what reaches ``first_block``.

    A pre-hook stops each forward at the first block, so the embeddings (and mask / rotary set-up) run once and
    nothing after block 0 does. ``use_cache=False`` keeps caches out of the captured kwargs.
    """
    calls: list[BlockCall] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden_states = args[0] if args else kwargs.pop("hidden_states", None)
        if not isinstance(hidden_states, torch.Tensor):
            raise ValueError(
                f"{type(module).__name__} was called without hidden states as its first argument or as "
                "`hidden_states=`; AWQ cannot replay this decoder block."
            )
        if len(args) > 1:
            raise ValueError(
                f"{type(module).__name__} was called with {len(args)} positional arguments; AWQ replays decoder "
                "blocks as block(hidden_states, **kwargs) and needs the other inputs passed by keyword."
            )
        calls.append(BlockCall(hidden_states, kwargs))
        raise StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return calls


@torch.inference_mode()
def propagate(block: nn.Module, calls: list[BlockCall]) -> list[BlockCall]:
    """The block's outputs as the next block's inputs, one :class:`BlockCall` per mini-batch."""
    return [call.with_hidden_states(call.run(block)) for call in calls]


class _InputStatistics:
    """Forward pre-hook: running ``sum |x|`` per input channel and, when asked, the Gram matrix ``sum_t x_t x_t^T``
    over every token."""

    def __init__(self, with_gram: bool):
        self.abs_sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.with_gram = with_gram
        self.n_tokens = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = (args[0] if args else kwargs["input"]).reshape(-1, module.in_features)
        batch_abs_sum = tokens.abs().sum(0, dtype=torch.float64)
        self.abs_sum = batch_abs_sum if self.abs_sum is None else self.abs_sum + batch_abs_sum
        if self.with_gram:
            batch_gram = tokens.T.float() @ tokens.float()
            self.gram = batch_gram if self.gram is None else self.gram + batch_gram
        self.n_tokens += tokens.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.n_tokens).float()


@torch.inference_mode()
def capture_block_activations(
    block: nn.Module,
    calls: list[BlockCall],
    replay_modules: Iterable[str],
    input_linears: Iterable[str],
    gram_linears: Iterable[str],
) -> BlockActivations:
    """One hooked pass of ``block`` over all mini-batches (see :class:`BlockActivations`).

    ``replay_modules`` are block-relative names of modules to replay later; ``input_linears`` are block-relative
    linear names whose input statistics are kept, ``gram_linears`` (a subset) those whose input Gram matrix is kept
    too.
    """
    activations = BlockActivations()
    activations.n_tokens = sum(call.hidden_states.shape[:-1].numel() for call in calls)
    gram_linears = set(gram_linears)
    statistics = {name: _InputStatistics(name in gram_linears) for name in input_linears}

    def keep_inputs(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            activations.replay_inputs[name].append(ModuleInputs(args, dict(kwargs)))

        return hook

    handles = []
    try:
        for name in replay_modules:
            activations.replay_inputs[name] = []
            module = block.get_submodule(name)
            handles.append(module.register_forward_pre_hook(keep_inputs(name), with_kwargs=True))
        for name, hook in statistics.items():
            handles.append(block.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        activations.outputs = [call.with_hidden_states(call.run(block)) for call in calls]
    finally:
        for handle in handles:
            handle.remove()
    for name, stats in statistics.items():
        activations.input_abs_mean[name] = stats.mean_abs()
        if stats.gram is not None:
            activations.input_gram[name] = stats.gram
    return activations


def held_bytes(*objects: Any) -> int:
    """Bytes of the distinct tensor storages reachable through tuples, lists, dicts and dataclasses above."""
    seen: set[int] = set()
    total = 0
    stack = list(objects)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, (BlockCall, ModuleInputs, BlockActivations)):
            stack.extend(vars(item).values())
    return total
