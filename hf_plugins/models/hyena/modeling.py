"""The Hyena language model: ``HyenaModel`` and ``HyenaForCausalLM``, registered with the Auto classes.

Blocks are pre-norm: ``x + hyena(norm(x))`` then ``x + mlp(norm(x))``. ``generate`` gets a
:class:`~hf_plugins.attention.hyena_cache.HyenaCache` (croppable), and each new token costs O(context) per channel
in the long convolutions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ...attention.gla import HeadRMSNorm
from ...attention.hyena import HyenaOperator
from ...attention.hyena_cache import HyenaCache
from .._own_cache import OwnCacheMixin
from .configuration import HyenaConfig


class HyenaRMSNorm(HeadRMSNorm):
    """The blocks' RMSNorm (named so transformers' default init recognises it)."""


class HyenaBlock(GradientCheckpointingLayer):
    def __init__(self, config: HyenaConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_norm = HyenaRMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = HyenaOperator(config.hidden_size, config.max_position_embeddings, config.order,
                                   config.short_conv_size, config.filter_dim, config.filter_emb_dim,
                                   config.keep_frequencies, layer_idx)
        self.mlp_norm = HyenaRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.intermediate_size), ACT2FN[config.hidden_act],
                                 nn.Linear(config.intermediate_size, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), attention_mask, cache)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class HyenaPreTrainedModel(PreTrainedModel):
    config_class = HyenaConfig
    base_model_prefix = "model"
    _no_split_modules = ["HyenaBlock"]
    # The implicit filter networks stay fp32 (also under bf16) and unquantized: sine features of positions need the
    # precision.
    _keep_in_fp32_modules_strict = ["filter"]
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        # The implicit filter network keeps torch's default init: sine networks need it (a 0.02-std init would
        # start every long filter at almost zero).
        if getattr(module, "keeps_torch_init", False):
            return
        super()._init_weights(module)


class HyenaModel(HyenaPreTrainedModel):
    def __init__(self, config: HyenaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HyenaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = HyenaRMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: HyenaCache | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """``input_ids [batch, seq]`` (or ``inputs_embeds``) -> hidden states; ``attention_mask [batch, past + seq]``
        marks left padding with 0."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("HyenaModel needs exactly one of input_ids and inputs_embeds.")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = HyenaCache(self.config)
        if cache is not None and not isinstance(cache, HyenaCache):
            raise TypeError(f"a Hyena model needs a HyenaCache, got {type(cache).__name__}; let generate create it "
                            "or pass hf_plugins.HyenaCache(model.config).")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        all_hidden = [] if output_hidden_states else None
        for block in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = block(hidden_states, attention_mask=attention_mask, cache=cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None,
                                       hidden_states=None if all_hidden is None else tuple(all_hidden))


class HyenaForCausalLM(OwnCacheMixin, HyenaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HyenaConfig) -> None:
        super().__init__(config)
        self.model = HyenaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def new_cache(self) -> HyenaCache:
        return HyenaCache(self.config)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: HyenaCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits ``[batch, seq or logits_to_keep, vocab]``; with ``labels`` also the next-token loss."""
        kwargs.pop("position_ids", None)  # positions are implicit in the convolutions
        out = self.model(input_ids, attention_mask, cache, inputs_embeds, use_cache, output_hidden_states)
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, kept])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
