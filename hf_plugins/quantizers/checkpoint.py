"""Make our quantized checkpoints fail loudly when loaded without ``import hf_plugins``.

transformers skips unknown quantization methods with a warning and would load packed integers into float layers.
So a quantized model's ``config.json`` carries ``model_type = "hf_plugins_quantized"`` and the real type under
``hf_plugins_base_model_type``: without the plugin, ``AutoConfig`` raises "does not recognize this architecture";
with it, the registered :class:`QuantizedCheckpointConfig` hands the dict to the real config class.
"""

from __future__ import annotations

from functools import cache

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

CHECKPOINT_MODEL_TYPE = "hf_plugins_quantized"
BASE_MODEL_TYPE_KEY = "hf_plugins_base_model_type"


class QuantizedCheckpointConfig(PreTrainedConfig):
    """Registered under ``CHECKPOINT_MODEL_TYPE``; never instantiated: ``from_dict`` returns the real config."""

    model_type = CHECKPOINT_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        base_type = config_dict.get(BASE_MODEL_TYPE_KEY)
        if base_type not in CONFIG_MAPPING:
            raise ValueError(
                f"this hf-plugins checkpoint names base model type {base_type!r}, which transformers does not know; "
                "the checkpoint is damaged or needs a newer transformers."
            )
        base_dict = {k: v for k, v in config_dict.items() if k != BASE_MODEL_TYPE_KEY}
        base_dict["model_type"] = base_type
        config = CONFIG_MAPPING[base_type].from_dict(base_dict, **kwargs)
        marked = config[0] if isinstance(config, tuple) else config
        mark_config(marked)
        return config


@cache
def _saving_class(base_cls: type) -> type:
    """A subclass of ``base_cls`` (same name, so Auto mappings still resolve) that saves the loud model type."""

    def to_dict(self):
        out = base_cls.to_dict(self)
        out[BASE_MODEL_TYPE_KEY] = out["model_type"]
        out["model_type"] = CHECKPOINT_MODEL_TYPE
        return out

    saving = type(base_cls.__name__, (base_cls,), {"to_dict": to_dict, "__module__": base_cls.__module__})
    _map_like(saving, base_cls)
    return saving


def _map_like(saving: type, base_cls: type) -> None:
    """Auto model classes find transformers' own configs by class name, but registered ones (ours, remote code)
    by the class itself: map the saving subclass wherever its base is mapped."""
    from transformers.models.auto import modeling_auto

    if base_cls.__module__.startswith("transformers."):
        return
    for mapping in vars(modeling_auto).values():
        if isinstance(mapping, modeling_auto._LazyAutoMapping) and base_cls in mapping:
            mapping.register(saving, mapping[base_cls], exist_ok=True)


def mark_config(config: PreTrainedConfig) -> None:
    """Make ``config`` save as a plugin checkpoint (idempotent)."""
    base_cls = type(config)
    if getattr(base_cls, "_hf_plugins_marked", False):
        return
    saving = _saving_class(base_cls)
    saving._hf_plugins_marked = True
    config.__class__ = saving


def unmark_config(config: PreTrainedConfig) -> None:
    """Undo :func:`mark_config` (after ``dequantize()``)."""
    if getattr(type(config), "_hf_plugins_marked", False):
        config.__class__ = type(config).__mro__[1]
