"""``HyenaConfig``: a Hyena language model (gated implicit long convolutions, no attention)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

MODEL_TYPE = "hf_plugins_hyena"


@strict
class HyenaConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width ``d``.
        num_hidden_layers: blocks (Hyena operator + MLP, each pre-normed with RMSNorm).
        max_position_embeddings: the context the filters span (their taps); longer inputs see that many.
        order: Hyena's depth: ``order`` gates and ``order - 1`` long convolutions per operator (2).
        short_conv_size: taps of the short depthwise convolution on the projections (3).
        filter_dim, filter_emb_dim: width and positional features of the implicit filter network (64, 33).
        keep_frequencies: frequency-sparse long convolutions (fraction of the kernel spectrum kept; None: dense).
        intermediate_size: MLP width (default ``4 * hidden_size``); hidden_act: MLP activation (``gelu``).
        norm_eps, initializer_range, tie_word_embeddings, use_cache: as in Llama.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    max_position_embeddings: int = 2048
    order: int = 2
    short_conv_size: int = 3
    filter_dim: int = 64
    filter_emb_dim: int = 33
    keep_frequencies: float | None = None
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of ``@strict`` validation: every inconsistency is an error naming the field."""
        if self.order < 2:
            raise ValueError(f"HyenaConfig.order must be >= 2 (order - 1 long convolutions), got {self.order}.")
        if self.short_conv_size < 1 or self.max_position_embeddings < 1:
            raise ValueError(f"HyenaConfig.short_conv_size ({self.short_conv_size}) and max_position_embeddings "
                             f"({self.max_position_embeddings}) must be positive.")
        if self.filter_emb_dim < 3 or self.filter_emb_dim % 2 == 0:
            raise ValueError(f"HyenaConfig.filter_emb_dim must be odd and >= 3 (time plus sine/cosine pairs), got "
                             f"{self.filter_emb_dim}.")
        if self.keep_frequencies is not None and not 0 < self.keep_frequencies <= 1:
            raise ValueError(f"HyenaConfig.keep_frequencies must be in (0, 1] or None, got {self.keep_frequencies}.")

    @property
    def layer_types(self) -> list[str]:
        return ["linear_attention"] * self.num_hidden_layers
