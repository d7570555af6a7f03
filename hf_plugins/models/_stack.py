"""What our language-model families share: embedding -> pre-norm blocks -> norm with a cache of the family's own
kind, and a causal-LM head whose ``generate`` creates that cache.

A family's base model mixes in :class:`BlockStackMixin` and names ``block_class``, ``norm_class`` and
``cache_class``; its causal LM mixes in :class:`StackCausalLMMixin` and names ``base_model_class``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


class BlockStackMixin:
    """``input_ids [batch, seq]`` (or ``inputs_embeds [batch, seq, hidden]``) -> hidden states through
    ``config.num_hidden_layers`` blocks ``block_class(config, index)`` called as ``block(hidden_states,
    attention_mask=, cache=, **self.block_inputs(...))``."""

    block_class: type[nn.Module]
    norm_class: type[nn.Module]
    cache_class: type[Cache]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(self.block_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = self.norm_class(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def block_inputs(self, hidden_states: torch.Tensor, cache: Cache | None,
                     position_ids: torch.LongTensor | None) -> dict:
        """Extra keyword inputs of every block (none by default)."""
        return {}

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        """``attention_mask [batch, past + seq]`` marks left padding with 0."""
        name, cache_name = type(self).__name__, self.cache_class.__name__
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{name} needs exactly one of input_ids and inputs_embeds.")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.cache_class(self.config)
        if cache is not None and not isinstance(cache, self.cache_class):
            raise TypeError(f"{name} needs a {cache_name}, got {type(cache).__name__}; let generate create it or "
                            f"pass hf_plugins.{cache_name}(model.config).")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: the layers skip the masking work
        extra = self.block_inputs(hidden_states, cache, position_ids)
        all_hidden = [] if output_hidden_states else None
        for block in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = block(hidden_states, attention_mask=attention_mask, cache=cache, **extra)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None,
                                       hidden_states=None if all_hidden is None else tuple(all_hidden))


class StackCausalLMMixin:
    """A causal-LM head on ``base_model_class``; ``generate`` (and our speculative decoding's draft, through
    :meth:`new_cache`) gets the family's own cache, which transformers' default ``DynamicCache`` could not
    replace."""

    base_model_class: type[nn.Module]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def new_cache(self) -> Cache:
        """An empty cache for this model."""
        return self.base_model_class.cache_class(self.config)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits ``[batch, seq or logits_to_keep, vocab]``; with ``labels [batch, seq]`` also the next-token loss
        (labels -100 are ignored)."""
        out = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                         output_hidden_states)
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, kept])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            model_kwargs["cache"] = self.new_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
