"""EasySpec's fuzzy layer-parallel draft step (Wu et al., 2025): fused on one device, spread over several.

Layers are split into consecutive groups. Inside a group every attention sublayer reads the hidden state that
entered the group (normalised by its own input norm) instead of the one left by the previous layer, so the
group's attentions no longer wait for each other; the residual additions and MLPs then run in layer order.
Group size 1 is exactly the model.

- A group whose layers share one device is *fused*: its query/key/value projections run as one ``bmm`` over
  stacked weights and its attentions as one SDPA call over stacked caches.
- A group whose layers sit on different devices (a draft dispatched with ``device_map``) is *spread*: each layer's
  attention is launched on its own device from its own copy of the group's input, so on GPUs the attentions of
  one group run concurrently (kernel launches are asynchronous); the outputs are then gathered in layer order.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Decoder families whose layers are: input_layernorm -> self_attn(q/k/v/o_proj, RoPE) -> residual ->
# post_attention_layernorm -> mlp -> residual, with an unscaled embedding and Llama's RoPE (Mistral, Qwen2 and Qwen3
# copy Llama's apply_rotary_pos_emb).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` float weight of an ``nn.Linear`` or of one of our quantized linears (dequantized)."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight()
    return module.weight


def _bias(module: nn.Module, out_features: int, like: torch.Tensor) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return bias.to(like.dtype) if bias is not None else like.new_zeros(out_features)


def _device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (quantized linears keep their weights in buffers)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


class LayerParallelDraft:
    """Single-token fuzzy forward of a Llama-style draft model with its layers in groups of ``group_size``.

    Args:
        model: a causal LM of a type in ``SUPPORTED_MODEL_TYPES`` (full attention in every layer).
        group_size: layers per group; the last group may be shorter.
        fuse: ``None`` fuses exactly the groups whose layers share a device and spreads the others; ``False``
            spreads every group (the multi-device schedule, also on one device); ``True`` requires every group
            to be fusable.
    """

    def __init__(self, model: PreTrainedModel, group_size: int, fuse: bool | None = None) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Layer-parallel drafting supports model types {SUPPORTED_MODEL_TYPES}; the draft is "
                f"{config.model_type!r}. Use layer_parallel_group_size=1 with this draft."
            )
        if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or ())):
            raise ValueError("Layer-parallel drafting needs full attention in every draft layer (no sliding window).")
        if group_size < 1:
            raise ValueError(f"layer_parallel_group_size must be >= 1, got {group_size}.")
        self.model = model
        self.base = model.base_model
        layers = list(self.base.layers)
        self.groups = [layers[i : i + group_size] for i in range(0, len(layers), group_size)]
        self.devices = [[_device_of(layer) for layer in group] for group in self.groups]
        fusable = [len(set(devices)) == 1 for devices in self.devices]
        if fuse and not all(fusable):
            split = next(devices for devices, ok in zip(self.devices, fusable) if not ok)
            raise ValueError(
                f"fuse=True needs each group's layers on one device; a group spans {sorted(map(str, set(split)))}. "
                "Use fuse=None to spread such groups over their devices."
            )
        # Fused groups keep stacked weights; spread groups (None) call each layer's own projections.
        self._stacked = [self._stack(g) if ok and fuse is not False else None for g, ok in zip(self.groups, fusable)]

    @staticmethod
    def _stack(group: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Stacked ``[G, in, q+k+v]`` projection weights, ``[G, q+k+v]`` biases, ``[G, q, hidden]`` output weights."""
        qkv, biases, outs = [], [], []
        for layer in group:
            attn = layer.self_attn
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            parts = [_dense_weight(m) for m in projections]
            qkv.append(torch.cat(parts, dim=0).t())
            biases.append(torch.cat([_bias(m, w.shape[0], w) for m, w in zip(projections, parts)]))
            outs.append(_dense_weight(attn.o_proj).t())
        sizes = (parts[0].shape[0], parts[1].shape[0])
        return torch.stack(qkv).contiguous(), torch.stack(biases), torch.stack(outs).contiguous(), sizes

    @torch.no_grad()
    def step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """One fuzzy token per row.

        Args:
            input_ids: ``[batch, 1]`` the newest token of each row.
            position_ids: ``[batch, 1]``.
            mask: ``[batch, slots]`` 0/1 over every cached slot plus this one (holes and padding are 0).
            cache: the draft's cache; every layer is appended one slot.

        Returns:
            ``[batch, vocab]`` logits.
        """
        home = input_ids.device
        hidden = self.base.embed_tokens(input_ids.to(_device_of(self.base.embed_tokens)))
        cos, sin = self.base.rotary_emb(hidden, position_ids.to(hidden.device))
        keep = mask.bool()[:, None, None, :]
        for group, stacked, devices in zip(self.groups, self._stacked, self.devices):
            if stacked is None:
                hidden = self._spread_group(group, devices, hidden, cos, sin, keep, cache)
            else:
                hidden = hidden.to(devices[0])
                cos, sin, keep = cos.to(devices[0]), sin.to(devices[0]), keep.to(devices[0])
                hidden = self._fused_group(group, stacked, hidden, cos, sin, keep, cache)
        hidden = self.base.norm(hidden.to(_device_of(self.base.norm)))
        head = self.model.lm_head
        return head(hidden[:, -1].to(_device_of(head))).to(home)

    def _spread_group(self, group, devices, hidden, cos, sin, keep, cache) -> torch.Tensor:
        """Every layer's attention on its own device from the group's input, then residuals and MLPs in order."""
        # All attentions are issued before any output is gathered, so none waits for another device's work.
        attn_outs = [
            self._attention(layer, hidden.to(device), cos.to(device), sin.to(device), keep.to(device), cache)
            for layer, device in zip(group, devices)
        ]
        for layer, device, attn_out in zip(group, devices, attn_outs):
            hidden = hidden.to(device) + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    @staticmethod
    def _attention(layer, hidden, cos, sin, keep, cache) -> torch.Tensor:
        """One layer's attention sublayer output ``[batch, len, hidden]`` (before the residual), cache appended."""
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        query, key, value = (
            proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        if hasattr(attn, "q_norm"):
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key, value = cache.update(key, value, attn.layer_idx)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=attn.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _fused_group(self, group, stacked, hidden, cos, sin, keep, cache) -> torch.Tensor:
        qkv_weight, qkv_bias, out_weight, (q_size, kv_size) = stacked
        batch, length, width = hidden.shape
        size = len(group)
        attn0 = group[0].self_attn
        head_dim = attn0.head_dim
        normed = torch.stack([layer.input_layernorm(hidden) for layer in group]).view(size, batch * length, width)
        qkv = torch.baddbmm(qkv_bias[:, None, :].to(normed.dtype), normed, qkv_weight.to(normed.dtype))
        query, key, value = qkv.split([q_size, kv_size, kv_size], dim=-1)
        query = query.view(size, batch, length, -1, head_dim).transpose(2, 3)
        key = key.view(size, batch, length, -1, head_dim).transpose(2, 3)
        value = value.view(size, batch, length, -1, head_dim).transpose(2, 3)
        query, key = self._head_norms(group, query, key)
        # cos/sin [batch, len, head_dim] -> [batch, 1, len, head_dim] broadcast over [G, batch, heads, len, head_dim].
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        keys, values = [], []
        for index, layer in enumerate(group):
            k_all, v_all = cache.update(key[index], value[index], layer.self_attn.layer_idx)
            keys.append(k_all)
            values.append(v_all)
        attn = F.scaled_dot_product_attention(
            query.flatten(0, 1),
            torch.stack(keys).flatten(0, 1),
            torch.stack(values).flatten(0, 1),
            attn_mask=keep.repeat(size, 1, 1, 1),
            scale=attn0.scaling,
            enable_gqa=True,
        )
        attn = attn.view(size, batch, -1, length, head_dim).transpose(2, 3).reshape(size, batch * length, -1)
        attn_out = torch.bmm(attn, out_weight.to(attn.dtype)).view(size, batch, length, width)
        for index, layer in enumerate(group):
            hidden = hidden + attn_out[index]
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    @staticmethod
    def _head_norms(group, query, key):
        """Per-head q/k RMSNorms (Qwen3) applied layer by layer; identity for families without them."""
        if not hasattr(group[0].self_attn, "q_norm"):
            return query, key
        query = torch.stack([layer.self_attn.q_norm(query[i]) for i, layer in enumerate(group)])
        key = torch.stack([layer.self_attn.k_norm(key[i]) for i, layer in enumerate(group)])
        return query, key


_CACHE_ATTR = "_hf_plugins_layer_parallel"


def layer_parallel_draft(model: PreTrainedModel, group_size: int) -> LayerParallelDraft:
    """The model's ``LayerParallelDraft`` for ``group_size`` (groups fused or spread by device), built once and kept.

    Building stacks (and for quantized drafts dequantizes) every attention projection, which would otherwise be
    repeated on each ``generate`` call. A stale copy after the draft's weights change only lowers acceptance, never
    the output (verification is exact); ``model.__dict__.pop("_hf_plugins_layer_parallel")`` drops it.
    """
    built = model.__dict__.setdefault(_CACHE_ATTR, {})
    if group_size not in built:
        built[group_size] = LayerParallelDraft(model, group_size)
    return built[group_size]
