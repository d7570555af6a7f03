"""Model families built on our layers, registered with transformers' Auto classes by ``hf_plugins._registry``."""

from .gla import GLAConfig, GLAForCausalLM, GLAModel

__all__ = ["GLAConfig", "GLAForCausalLM", "GLAModel"]
