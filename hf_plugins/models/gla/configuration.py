"""``GLAConfig``: a gated-linear-attention language model, optionally hybrid with softmax-attention layers."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...attention.gla import MODES

MODEL_TYPE = "hf_plugins_gla"
"""Distinct from flash-linear-attention's ``gla``, so both can be registered in one process."""


@strict
class GLAConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width.
        num_hidden_layers: blocks (token mixer + SwiGLU MLP, each pre-normed with RMSNorm).
        num_heads: GLA heads.
        expand_k, expand_v: GLA key / value dimension over ``hidden_size`` (paper: 0.5, 1).
        gate_low_rank_dim, gate_logit_normalizer: the forget gate's rank and ``tau`` (16, 16).
        use_short_conv, conv_size: short causal convolutions on q, k, v.
        use_output_gate: GLA's swish output gate.
        attn_mode: ``auto`` (chunk for training and prefill, recurrent for decoding), ``chunk`` or ``recurrent``.
        intermediate_size: MLP width (default: ``hidden_size * 8 / 3`` rounded up to a multiple of 256).
        hidden_act: MLP activation (``silu``).
        attn_layers: indices of blocks that use softmax attention instead of GLA (hybrid models).
        attn_num_heads, attn_num_kv_heads: heads of those layers (default: ``num_heads``; grouped-query if fewer
            kv heads).
        rope_theta: RoPE base of the softmax layers.
        max_position_embeddings: longest sequence the softmax layers are meant for.
        norm_eps, initializer_range, tie_word_embeddings, use_cache: as in Llama.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    attn_mode: str = "auto"
    intermediate_size: int | None = None
    hidden_act: str = "silu"
    attn_layers: list[int] | tuple[int, ...] = ()
    attn_num_heads: int | None = None
    attn_num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = -(-self.hidden_size * 8 // 3 // 256) * 256
        self.attn_layers = sorted(int(i) for i in self.attn_layers)
        self.attn_num_heads = self.attn_num_heads or self.num_heads
        self.attn_num_kv_heads = self.attn_num_kv_heads or self.attn_num_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of ``@strict`` validation: every inconsistency is a ``ValueError`` naming the fields."""
        if self.attn_mode not in MODES:
            raise ValueError(f"GLAConfig.attn_mode must be one of {MODES}, got {self.attn_mode!r}.")
        for name, expand in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            dim = int(self.hidden_size * expand)
            if dim <= 0 or dim % self.num_heads or (dim // self.num_heads) % 2:
                raise ValueError(f"GLAConfig: hidden_size * {name} = {dim} must split into num_heads = "
                                 f"{self.num_heads} heads of an even size; change {name} or num_heads.")
        bad = [i for i in self.attn_layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.attn_layers)) != len(self.attn_layers):
            raise ValueError(f"GLAConfig.attn_layers must be distinct block indices in [0, {self.num_hidden_layers})"
                             f", got {list(self.attn_layers)}.")
        if self.attn_layers and (self.hidden_size % self.attn_num_heads
                                 or self.attn_num_heads % self.attn_num_kv_heads):
            raise ValueError(f"GLAConfig: hidden_size ({self.hidden_size}) must split into attn_num_heads "
                             f"({self.attn_num_heads}), a multiple of attn_num_kv_heads ({self.attn_num_kv_heads}).")

    @property
    def layer_types(self) -> list[str]:
        """``"full_attention"`` for the softmax blocks, ``"linear_attention"`` for GLA ones."""
        attention = set(self.attn_layers)
        return ["full_attention" if i in attention else "linear_attention" for i in range(self.num_hidden_layers)]
