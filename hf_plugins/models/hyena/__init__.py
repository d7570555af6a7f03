"""The Hyena language-model family (config, model, causal-LM head), registered with the Auto classes."""

from .configuration import MODEL_TYPE, HyenaConfig
from .modeling import HyenaForCausalLM, HyenaModel, HyenaPreTrainedModel

__all__ = ["MODEL_TYPE", "HyenaConfig", "HyenaForCausalLM", "HyenaModel", "HyenaPreTrainedModel"]
