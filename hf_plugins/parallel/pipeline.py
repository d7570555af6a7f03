"""Pipeline parallelism for causal LMs: automatic stage splits and torch.distributed.pipelining schedules.

A stage is the model itself with the modules it does not own replaced by identities (as transformers' own
pipeline split does), so every architecture's embedding scaling, masks and rotary tables stay its own code: the
first stage runs ``input_ids`` through embedding and its layers, later stages take the previous stage's hidden
states as ``inputs_embeds``, and the last stage adds the final norm and the LM head. Stages are balanced by
parameter count or by a per-token FLOP model; schedules are GPipe, 1F1B and interleaved 1F1B (Megatron-LM).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from transformers import PreTrainedModel
from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
BALANCES = ("params", "flops")


def layer_costs(
    model: PreTrainedModel, balance: str = "params", seq_len: int = 1024
) -> tuple[list[float], float, float]:
    """``(per-layer costs, first-stage extra, last-stage extra)`` used to balance stages.

    ``params``: parameter counts (memory balance); the embedding goes to the first stage, norm and head to the
    last (a tied head costs no extra memory). ``flops``: forward FLOPs per token: ``2 x`` each layer's matmul
    parameters plus ``4 x seq_len x attention width`` for scores and values (causal: half of that), the head's
    ``2 x hidden x vocab`` on the last stage; the embedding lookup is free.
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}.")
    base = model.base_model
    layers = list(base.layers)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    norm_params = sum(p.numel() for p in getattr(base, "norm", nn.Identity()).parameters())
    head_params = 0 if head is None else head.weight.numel()
    if balance == "params":
        costs = [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
        first = float(embedding.weight.numel()) if embedding is not None else 0.0
        return costs, first, float(norm_params + (0 if tied else head_params))
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 2.0 * seq_len * heads * head_dim  # causal: half of 4 x seq x width
    costs = [
        2.0 * sum(p.numel() for p in layer.parameters() if p.ndim >= 2) + attention for layer in layers
    ]
    return costs, 0.0, 2.0 * head_params


def balanced_ranges(costs: Sequence[float], parts: int, first_extra: float = 0.0,
                    last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Split ``costs`` into ``parts`` contiguous non-empty ``[start, stop)`` ranges minimising the largest total,
    with ``first_extra``/``last_extra`` added to the first/last range (exact dynamic programme, O(n^2 parts))."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"Cannot split {n} layers into {parts} pipeline stages: use 1 to {n} stages.")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def total(start: int, stop: int, index: int) -> float:
        extra = (first_extra if index == 0 else 0.0) + (last_extra if index == parts - 1 else 0.0)
        return prefix[stop] - prefix[start] + extra

    inf = float("inf")
    # best[k][i]: smallest max-stage cost covering layers [0, i) with k stages; cut[k][i] the last stage's start.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], total(j, i, k - 1))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    ranges, stop = [], n
    for k in range(parts, 0, -1):
        start = cut[k][stop]
        ranges.append((start, stop))
        stop = start
    return ranges[::-1]


def stage_ranges(model: PreTrainedModel, num_stages: int, balance: str = "params",
                 seq_len: int = 1024) -> list[tuple[int, int]]:
    """Decoder-layer ``[start, stop)`` of each of ``num_stages`` stages, balanced by ``balance``."""
    costs, first, last = layer_costs(model, balance, seq_len)
    return balanced_ranges(costs, num_stages, first, last)


class CausalLMStage(nn.Module):
    """One pipeline stage: ``input_ids [batch, seq]`` (first stage) or hidden states ``[batch, seq, hidden]``
    in, hidden states or (last stage) logits ``[batch, seq, vocab]`` out.

    Holds the model's own modules for its layers (shared, not copied) and identities elsewhere.
    """

    def __init__(self, model: PreTrainedModel, start: int, stop: int, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.model = _stage_view(model, start, stop, first, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        if self.last:  # the model's own head path: final norm, LM head, logit soft-capping (Gemma-2) ...
            return self.model(**inputs, use_cache=False).logits
        return self.model.base_model(**inputs, use_cache=False).last_hidden_state


def _stage_view(model: PreTrainedModel, start: int, stop: int, first: bool, last: bool) -> PreTrainedModel:
    """A shallow copy of ``model`` whose modules outside layers ``[start, stop)`` (embedding unless ``first``;
    norm and head unless ``last``) are identities; owned modules are the original objects."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    base = copy.copy(model.base_model)
    base._modules = dict(model.base_model._modules)
    view._modules[model.base_model_prefix] = base
    base.layers = nn.ModuleList(
        layer if start <= index < stop else PipelineIdentityLayer()
        for index, layer in enumerate(model.base_model.layers)
    )
    if not first:
        base.embed_tokens = PipelineIdentityLayer()
    if not last:
        base.norm = PipelineIdentityLayer()
        view._modules["lm_head"] = PipelineIdentityLayer()
    return view


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [batch, seq, vocab]`` against ``targets [batch, seq]`` (already shifted)."""
    upcast = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half logits: fp32 loss
    return F.cross_entropy(upcast.flatten(0, 1), targets.flatten())


class Pipeline:
    """This rank's pipeline stages and their schedule; :meth:`step` runs one training step's forward/backward.

    Attributes:
        schedule: the ``torch.distributed.pipelining`` schedule.
        stages: this rank's :class:`CausalLMStage` modules (one, or ``v`` for interleaved 1F1B).
        stage_indices: their global stage indices.
        ranges: every stage's decoder-layer ``[start, stop)``.
        step_seconds / busy_seconds: the last step's wall time and this rank's compute time in it.
    """

    def __init__(self, schedule, pipeline_stages: list[PipelineStage], ranges: list[tuple[int, int]],
                 group: dist.ProcessGroup, tied: nn.Parameter | None) -> None:
        stages = [stage.submod for stage in pipeline_stages]
        stage_indices = [stage.stage_index for stage in pipeline_stages]
        self.schedule, self.stages, self.stage_indices, self.ranges = schedule, stages, stage_indices, ranges
        self.group = group
        self._tied = tied
        self.step_seconds = 0.0
        self.busy_seconds = 0.0
        for stage in pipeline_stages:  # compute only: the schedule sends and receives outside these calls
            stage.forward_one_chunk = self._timed(stage.forward_one_chunk)
            stage.backward_one_chunk = self._timed(stage.backward_one_chunk)

    def _timed(self, run: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self.busy_seconds += time.perf_counter() - start

        return timed

    @property
    def bubble_fraction(self) -> float:
        """Idle over busy time of this rank in the last step: Megatron-LM's bubble fraction, ``(p-1)/m`` in
        theory for GPipe/1F1B and ``(p-1)/(v m)`` for interleaved 1F1B (equal stage times, free communication)."""
        return (self.step_seconds - self.busy_seconds) / self.busy_seconds if self.busy_seconds else 0.0

    def parameters(self) -> list[nn.Parameter]:
        """The distinct parameters of this rank's stages (what its optimizer steps)."""
        seen, params = set(), []
        for stage in self.stages:
            for param in stage.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        return params

    def step(self, input_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Forward and backward over all microbatches of ``input_ids [batch, seq]`` (needed on the first stage)
        with ``targets [batch, seq]`` (needed on the last); returns the per-microbatch losses on the rank holding
        the last stage, else an empty list."""
        losses: list[torch.Tensor] = []
        args = (input_ids,) if any(stage.first for stage in self.stages) else ()
        self.busy_seconds = 0.0
        start = time.perf_counter()
        self.schedule.step(*args, target=targets, losses=losses)
        self.step_seconds = time.perf_counter() - start
        self._sync_tied_gradient()
        return losses

    def _sync_tied_gradient(self) -> None:
        """A tied embedding/head weight lives on the first and the last stage: sum its two gradient halves."""
        if self._tied is None:
            return
        owned = [p for stage in self.stages for p in stage.parameters() if p is self._tied]
        grad = owned[0].grad if owned and owned[0].grad is not None else None
        buffer = grad if grad is not None else torch.zeros_like(self._tied)
        dist.all_reduce(buffer, group=self.group)
        if owned and grad is None:
            owned[0].grad = buffer


def build_pipeline(
    model: PreTrainedModel,
    group: dist.ProcessGroup | None = None,
    schedule: str = "1f1b",
    microbatches: int = 4,
    stages_per_rank: int | None = None,
    balance: str = "params",
    seq_len: int = 1024,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = next_token_loss,
) -> Pipeline:
    """Split ``model`` into pipeline stages and return this rank's :class:`Pipeline`.

    Args:
        model: a causal LM with ``base_model.layers`` (every rank holds the same weights; each keeps its stages).
        group: the pipeline process group (default: the whole world).
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved-1f1b"`` (Megatron-LM's virtual stages).
        microbatches: microbatches per step (``m``); interleaved needs a multiple of the number of ranks.
        stages_per_rank: virtual stages per rank (``v``); default 2 for interleaved, else 1.
        balance: ``"params"`` or ``"flops"`` (see :func:`layer_costs`); ``seq_len`` feeds the FLOP model.
        loss_fn: ``loss_fn(logits, targets)`` on the last stage.

    Gradients land in the stage modules' parameters, averaged over microbatches (``scale_grads``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    virtual = stages_per_rank or (2 if schedule == "interleaved-1f1b" else 1)
    if schedule != "interleaved-1f1b" and virtual != 1:
        raise ValueError(f"{schedule} runs one stage per rank; stages_per_rank={virtual} needs interleaved-1f1b.")
    if schedule == "interleaved-1f1b" and microbatches % world:
        raise ValueError(
            f"interleaved-1f1b needs microbatches divisible by the {world} pipeline ranks, got {microbatches}."
        )
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}.")
    num_stages = world * virtual
    ranges = stage_ranges(model, num_stages, balance, seq_len)
    device = next(model.parameters()).device
    # Megatron's interleaving: stage s runs on rank s % world, so each rank holds every world-th chunk.
    indices = list(range(rank, num_stages, world))
    modules = [CausalLMStage(model, *ranges[i], first=i == 0, last=i == num_stages - 1) for i in indices]
    stages = [PipelineStage(module, i, num_stages, device, group=group) for module, i in zip(modules, indices)]
    if schedule == "gpipe":
        runner = ScheduleGPipe(stages[0], microbatches, loss_fn=loss_fn)
    elif schedule == "1f1b":
        runner = Schedule1F1B(stages[0], microbatches, loss_fn=loss_fn)
    else:
        runner = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight if head is not None and embedding is not None and head.weight is embedding.weight else None
    return Pipeline(runner, stages, ranges, group, tied if num_stages > 1 else None)
