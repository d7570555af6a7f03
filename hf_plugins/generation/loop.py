"""The batched speculative decoding loop, run by ``generate`` as a ``custom_generate`` callable.

``generate`` prepares everything (processors with warpers, stopping criteria, the target cache, masks); this loop
drafts with a ``DraftModelCandidates``, verifies all rows in one target forward per step, accepts per row
(greedy matching or exact rejection sampling) and keeps ragged rows aligned with masked holes (see drafting.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput


from ..kernels.dense_linear import FastLinear
from .acceptance import greedy_accept, rejection_sample
from .cache_ops import check_croppable, crop_to, mask_or_none, positions_from_mask
from .config import SpeculativeConfig
from .draft_length import DraftLengthPolicy
from .drafting import DraftModelCandidates
from .scoring import choose, prefix_free, score_positions
from .stats import SpeculativeStats


@contextlib.contextmanager
def fast_linears_during(*models, enabled: bool):
    """Route the models' plain ``nn.Linear`` layers through the oneDNN CPU path for the block, then restore them.

    Verification multiplies ``k + 1`` rows per layer, where oneDNN is 1.8x faster than MKL's ``F.linear`` on the
    development CPU (see ``kernels/dense_linear/cpu.py``); plain ``generate`` calls stay on the stock kernels.
    """
    switched = [m for model in models if enabled for m in model.modules() if type(m) is nn.Linear]
    for module in switched:
        module.__class__ = FastLinear
    try:
        yield
    finally:
        for module in switched:
            module.__class__ = nn.Linear


@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """``generate``'s decoder-only output plus ``speculative_stats`` (see ``SpeculativeStats.as_dict``)."""

    speculative_stats: dict | None = None


class _Rows:
    """Per-row output tokens (left-padded prompt + generated), their lengths and which rows are done."""

    def __init__(self, input_ids: torch.Tensor, max_length: int, eos: torch.Tensor | None, pad: int, extra_stops) -> None:
        batch, prompt = input_ids.shape
        self.tokens = input_ids.new_full((batch, max_length), pad)
        self.tokens[:, :prompt] = input_ids
        self.lengths = [prompt] * batch
        self.done = [False] * batch
        self.max_length = max_length
        self.eos = set(eos.tolist()) if eos is not None else set()
        self.extra_stops = extra_stops

    def prefix(self, row: int) -> torch.Tensor:
        return self.tokens[row, : self.lengths[row]]

    def append(self, row: int, new_tokens: list[int]) -> list[int]:
        """Append tokens to an unfinished row up to EOS / max length / a stop criterion; returns those kept."""
        kept = []
        for token in new_tokens:
            if self.done[row]:
                break
            self.tokens[row, self.lengths[row]] = token
            self.lengths[row] += 1
            kept.append(token)
            if token in self.eos or self.lengths[row] >= self.max_length or self._stopped(row):
                self.done[row] = True
        return kept

    def _stopped(self, row: int) -> bool:
        if not self.extra_stops:
            return False
        return bool(self.extra_stops(self.prefix(row)[None], None).any())

    def sequences(self) -> torch.Tensor:
        return self.tokens[:, : max(self.lengths)]


def speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    speculative_draft: PreTrainedModel = None,
    speculative_config: SpeculativeConfig | None = None,
    speculative_streamer=None,
    **model_kwargs,
):
    """Lossless speculative decoding for any batch size; see ``hf_plugins.enable_speculative``.

    Returns ``sequences [batch, prompt + new]`` (rows that stopped early are padded), or with
    ``return_dict_in_generate`` a ``GenerateDecoderOnlyOutput`` whose ``speculative_stats`` holds the metrics.
    """
    config = speculative_config or SpeculativeConfig()
    on_cpu = model.device.type == "cpu" and config.fast_cpu_linears
    with fast_linears_during(model, speculative_draft, enabled=on_cpu):
        return _speculative_loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                 speculative_draft, config, speculative_streamer, model_kwargs)


def _speculative_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, speculative_draft,
                      config, speculative_streamer, model_kwargs):
    started = time.perf_counter()
    do_sample = bool(generation_config.do_sample)
    cache = model_kwargs.get("cache")
    if cache is None:
        raise ValueError("Speculative decoding needs use_cache=True (the target cache is rolled back per step).")
    check_croppable(cache, "target")
    batch = input_ids.shape[0]
    pad = generation_config._pad_token_tensor
    pad_id = int(pad) if pad is not None else 0
    extra_stops = [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    rows = _Rows(input_ids, generation_config.max_length, generation_config._eos_token_tensor, pad_id,
                 type(stopping_criteria)(extra_stops) if extra_stops else None)
    stats = SpeculativeStats(rows=batch)
    policy = DraftLengthPolicy(
        initial=config.initial_draft_tokens,
        maximum=config.max_draft_tokens,
        fixed=None if config.num_draft_tokens == "auto" else config.num_draft_tokens,
    )
    drafter = DraftModelCandidates(speculative_draft, model.config.get_text_config().vocab_size,
                                   config.layer_parallel_group_size)
    draft_processors = prefix_free(logits_processor)

    def draft_chooser(logits: torch.Tensor):
        if not do_sample:
            return logits.argmax(dim=-1), None
        return choose(draft_processors(input_ids[:, :1], logits.float()), True)

    drafter.chooser = draft_chooser

    if speculative_streamer is not None:
        speculative_streamer.put(input_ids.cpu())
    # Prefill: the target's first token, from the prompt's last logits.
    mask = model_kwargs.get("attention_mask")
    mask = mask if mask is not None else torch.ones_like(input_ids)
    positions = model_kwargs.get("position_ids")
    positions = positions if positions is not None else positions_from_mask(mask)
    out = model(input_ids=input_ids, attention_mask=mask_or_none(mask), position_ids=positions,
                cache=cache, use_cache=True, logits_to_keep=1)
    scores = score_positions(logits_processor, out.logits[:, -1:], [rows.prefix(r) for r in range(batch)],
                             input_ids.new_zeros(batch, 0))
    first, _ = choose(scores[:, 0], do_sample)
    _emit(rows, first[:, None].tolist(), speculative_streamer)
    slots = torch.cat([input_ids, first[:, None]], dim=1)
    mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    # Like generate, every new token's position is one past the previous token's (its last real one).
    positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)

    while not all(rows.done):
        remaining = max(rows.max_length - rows.lengths[r] for r in range(batch) if not rows.done[r])
        drafter.num_tokens = max(1, min(policy.current, remaining - 1))
        t0 = time.perf_counter()
        candidates, draft_probs = drafter.get_candidates(slots, attention_mask=mask, position_ids=positions)
        drafts = candidates[:, slots.shape[1] :]
        k = drafts.shape[1]
        t1 = time.perf_counter()
        verify_mask = torch.cat([mask, mask.new_ones(batch, k)], dim=1)
        logits = model(
            input_ids=torch.cat([slots[:, -1:], drafts], dim=1),
            attention_mask=mask_or_none(verify_mask),
            position_ids=positions[:, -1:] + torch.arange(k + 1, device=positions.device),
            cache=cache,
            use_cache=True,
        ).logits
        scores = score_positions(logits_processor, logits, [rows.prefix(r) for r in range(batch)], drafts)
        if do_sample:
            accepted, next_token = rejection_sample(drafts, draft_probs, scores.softmax(-1))
        else:
            accepted, next_token = greedy_accept(drafts, scores)
        active = torch.tensor([not d for d in rows.done], device=accepted.device)
        accepted_list, next_list, draft_list = accepted.tolist(), next_token.tolist(), drafts.tolist()
        t2 = time.perf_counter()

        longest = max(n for n, live in zip(accepted_list, active.tolist()) if live)
        emitted = [draft_list[r][: accepted_list[r]] + [next_list[r]] for r in range(batch)]
        stats.drafted += k * int(active.sum())
        stats.accepted += int(accepted[active].sum())
        stats.emitted += sum(len(e) for e, live in zip(emitted, active.tolist()) if live)
        stats.target_forwards += 1
        stats.draft_lengths.append(k)
        stats.draft_seconds += t1 - t0
        stats.verify_seconds += t2 - t1
        policy.update(accepted[active], k, t1 - t0, t2 - t1)
        _emit(rows, emitted, speculative_streamer)

        hole_free = torch.arange(longest, device=mask.device)[None] < accepted[:, None]
        slots = torch.cat([slots, drafts[:, :longest], next_token[:, None]], dim=1)
        mask = torch.cat([mask, hole_free.to(mask.dtype), mask.new_ones(batch, 1)], dim=1)
        step_positions = positions[:, -1:] + 1 + torch.arange(longest, device=positions.device)
        positions = torch.cat([positions, step_positions, positions[:, -1:] + 1 + accepted[:, None]], dim=1)
        crop_to(cache, slots.shape[1] - 1)
        drafter.update_candidate_strategy(slots, scores, accepted)

    if speculative_streamer is not None:
        speculative_streamer.end()
    stats.total_seconds = time.perf_counter() - started
    sequences = rows.sequences()
    if generation_config.return_dict_in_generate:
        return SpeculativeGenerateOutput(sequences=sequences, cache=cache, speculative_stats=stats.as_dict())
    return sequences


def _emit(rows: _Rows, new_tokens: list[list[int]], streamer) -> None:
    """Append each row's new tokens and stream what was kept (streamers take batch 1)."""
    for row, tokens in enumerate(new_tokens):
        kept = rows.append(row, tokens) if not rows.done[row] else []
        if streamer is not None and kept and len(new_tokens) == 1:
            streamer.put(torch.tensor(kept))
