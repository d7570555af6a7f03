"""Model families built on our layers, registered with transformers' Auto classes by ``hf_plugins._registry``."""

from .gla import GLAConfig, GLAForCausalLM, GLAModel
from .hyena import HyenaConfig, HyenaForCausalLM, HyenaModel

__all__ = ["GLAConfig", "GLAForCausalLM", "GLAModel", "HyenaConfig", "HyenaForCausalLM", "HyenaModel"]
