"""The GLA language-model family (config, model, causal-LM head), registered with the Auto classes."""

from .configuration import MODEL_TYPE, GLAConfig
from .modeling import GLAForCausalLM, GLAModel, GLAPreTrainedModel

__all__ = ["MODEL_TYPE", "GLAConfig", "GLAForCausalLM", "GLAModel", "GLAPreTrainedModel"]
