"""The batched speculative decoding loop, run by ``generate`` as a ``custom_generate`` callable.

``generate`` prepares everything (processors with warpers, stopping criteria, the target cache, masks); this loop
drafts with a ``DraftModelCandidates``, verifies all rows in one target forward per step, accepts per row
(greedy matching or exact rejection sampling) and keeps ragged rows aligned with masked holes (see drafting.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..kernels.dense_linear import fast_linears
from .acceptance import greedy_accept, rejection_sample
from .cache_ops import (
    can_select_rows,
    check_croppable,
    check_maskable,
    crop_to,
    mask_or_none,
    positions_from_mask,
)
from .config import SpeculativeConfig
from .draft_length import DraftLengthPolicy
from .drafting import DraftModelCandidates
from .rows import OutputRows
from .scoring import choose, prefix_free, score_positions
from .slots import SlotLayout
from .stats import SpeculativeStats


@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """``generate``'s decoder-only output plus ``speculative_stats`` (see ``SpeculativeStats.as_dict``)."""

    speculative_stats: dict | None = None


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
    ``return_dict_in_generate`` a ``SpeculativeGenerateOutput`` whose ``speculative_stats`` holds the metrics and
    whose ``cache`` is the target cache for batch 1 (None for batches, whose cache holds masked holes).
    """
    config = speculative_config or SpeculativeConfig()
    # Verification multiplies k + 1 rows per layer, where oneDNN beats MKL's F.linear 1.8x on the development CPU
    # (kernels/dense_linear/cpu.py); plain generate calls keep the stock kernels.
    on_cpu = model.device.type == "cpu" and config.fast_cpu_linears
    with fast_linears(model, speculative_draft, enabled=on_cpu):
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
    extra_stops = [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    rows = OutputRows(input_ids, generation_config.max_length, generation_config._eos_token_tensor,
                      int(pad) if pad is not None else 0, type(stopping_criteria)(extra_stops) if extra_stops else None)
    stats = SpeculativeStats(rows=batch)
    policy = DraftLengthPolicy(
        initial=config.initial_draft_tokens,
        maximum=config.max_draft_tokens,
        fixed=None if config.num_draft_tokens == "auto" else config.num_draft_tokens,
    )
    drafter = DraftModelCandidates(speculative_draft, model.config.get_text_config().vocab_size,
                                   config.layer_parallel_group_size, config.draft_context)
    drafter.chooser = _draft_chooser(prefix_free(logits_processor), do_sample)
    check_maskable(cache, "target", batch)
    check_maskable(drafter.cache, "draft", batch)

    if speculative_streamer is not None:
        speculative_streamer.put(input_ids.cpu())
    # Prefill: the target's first token, from the prompt's last logits.
    mask = model_kwargs.get("attention_mask")
    mask = mask if mask is not None else torch.ones_like(input_ids)
    positions = model_kwargs.get("position_ids")
    layout = SlotLayout(input_ids, mask, positions if positions is not None else positions_from_mask(mask))
    logits = model(input_ids=input_ids, attention_mask=mask_or_none(mask), position_ids=layout.positions,
                   cache=cache, use_cache=True, logits_to_keep=1).logits
    scores = score_positions(logits_processor, logits[:, -1:], rows.prefixes(range(batch)), input_ids.new_zeros(batch, 0))
    first, _ = choose(scores[:, 0], do_sample)
    _emit(rows, range(batch), first[:, None].tolist(), speculative_streamer)
    layout.append_pending(first)

    # Rows that finish leave the batch (their cache rows too): speculative rows finish at different steps, and
    # verifying finished rows would cost as much as live ones. ``active`` maps batch positions to output rows.
    active = list(range(batch))
    drop_finished = can_select_rows(cache) and can_select_rows(drafter.cache)
    while not all(rows.done):
        k = min(policy.current, rows.remaining() - 1)
        t0 = time.perf_counter()
        if k > 0:
            drafter.num_tokens = k
            candidates, draft_probs = drafter.get_candidates(layout.tokens, attention_mask=layout.mask,
                                                             position_ids=layout.positions)
            drafts = candidates[:, layout.tokens.shape[1] :]
        else:  # drafting does not pay now (or one token is left): a plain step
            drafts, draft_probs = layout.tokens.new_zeros(layout.batch, 0), None
        t1 = time.perf_counter()
        ids, verify_mask, verify_positions = layout.verification(drafts)
        logits = model(input_ids=ids, attention_mask=mask_or_none(verify_mask), position_ids=verify_positions,
                       cache=cache, use_cache=True).logits
        scores = score_positions(logits_processor, logits, rows.prefixes(active), drafts)
        if k == 0:
            next_token = choose(scores[:, 0], do_sample)[0]
            accepted = torch.zeros_like(next_token)
        elif do_sample:
            accepted, next_token = rejection_sample(drafts, draft_probs, scores.softmax(-1))
        else:
            accepted, next_token = greedy_accept(drafts, scores)
        live = [not rows.done[row] for row in active]
        accepted_list, next_list, draft_list = accepted.tolist(), next_token.tolist(), drafts.tolist()
        t2 = time.perf_counter()

        emitted = [draft_list[i][: accepted_list[i]] + [next_list[i]] for i in range(len(active))]
        stats.record_step(
            drafted=drafts.shape[1],
            accepted=[n for n, alive in zip(accepted_list, live) if alive],
            emitted=sum(len(e) for e, alive in zip(emitted, live) if alive),
            draft_seconds=t1 - t0,
            verify_seconds=t2 - t1,
        )
        policy.update(accepted[torch.tensor(live, device=accepted.device)], drafts.shape[1], t1 - t0, t2 - t1)
        _emit(rows, active, emitted, speculative_streamer)
        layout.accept(drafts, accepted, next_token, max(n for n, alive in zip(accepted_list, live) if alive))
        crop_to(cache, layout.cached)
        drafter.update_candidate_strategy(layout.tokens, scores, accepted)
        keep = [i for i, row in enumerate(active) if not rows.done[row]]
        if drop_finished and 0 < len(keep) < len(active):
            kept = torch.tensor(keep, device=layout.tokens.device)
            layout.select(kept)
            cache.batch_select_indices(kept)
            drafter.select_rows(kept)
            active = [active[i] for i in keep]
            policy.reset_costs()

    if speculative_streamer is not None:
        speculative_streamer.end()
    stats.total_seconds = time.perf_counter() - started
    sequences = rows.sequences()
    if generation_config.return_dict_in_generate:
        # A batch's cache has holes (masked slots) that only this loop's mask knows about: not reusable outside.
        reusable = cache if batch == 1 else None
        return SpeculativeGenerateOutput(sequences=sequences, cache=reusable, speculative_stats=stats.as_dict())
    return sequences


def _draft_chooser(processors, do_sample: bool):
    """How the draft picks tokens: argmax, or a sample after the prefix-free warpers (temperature, top-k/p).

    Any proposal law keeps sampling exact as long as verification uses it, so the draft skips the prefix-dependent
    processors (their per-row calls would cost more than they gain in acceptance).
    """

    def chooser(logits: torch.Tensor):
        if not do_sample:
            return logits.argmax(dim=-1), None
        return choose(processors(logits.new_zeros(logits.shape[0], 1, dtype=torch.long), logits.float()), True)

    return chooser


def _emit(rows: OutputRows, active, new_tokens: list[list[int]], streamer) -> None:
    """Append ``new_tokens[i]`` to output row ``active[i]`` and stream what was kept (streamers take batch 1)."""
    for row, tokens in zip(active, new_tokens):
        kept = rows.append(row, tokens) if not rows.done[row] else []
        if streamer is not None and kept and rows.batch == 1:
            streamer.put(torch.tensor(kept))
