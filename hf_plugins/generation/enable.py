"""Routing ``model.generate(assistant_model=...)`` to our speculative loop.

``enable_speculative(model)`` binds a ``generate`` on the instance (the same mechanism transformers uses for
``custom_generate`` checkpoints). It hands assisted calls to ``GenerationMixin.generate`` with our loop as the
``custom_generate`` callable, so transformers still prepares processors, stopping criteria and the cache; every
other call goes to the class's ``generate`` untouched. Models carrying our quantizers are enabled on load.
"""

from __future__ import annotations

import copy
import logging
import types

from transformers import PreTrainedModel

from .config import SpeculativeConfig
from .loop import speculative_generate

logger = logging.getLogger(__name__)

_CONFIG_ATTR = "_hf_plugins_speculative_config"

# Requests our loop leaves to transformers' own assisted generation (batch 1 there).
_TRANSFORMERS_ONLY = (
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
    "custom_generate",
)


def enable_speculative(model: PreTrainedModel, config: SpeculativeConfig | None = None) -> PreTrainedModel:
    """Make ``model.generate(assistant_model=draft)`` use our lossless batched speculative decoding.

    Args:
        model: the target causal LM.
        config: drafting options (draft length policy, EasySpec group size); ``generate`` also takes
            ``speculative_config=`` per call.

    Returns:
        ``model`` (enabled in place; idempotent).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"enable_speculative takes a transformers PreTrainedModel, got {type(model).__name__}.")
    if config is not None and not isinstance(config, SpeculativeConfig):
        raise TypeError(f"config must be a hf_plugins.SpeculativeConfig, got {type(config).__name__}.")
    setattr(model, _CONFIG_ATTR, config or getattr(model, _CONFIG_ATTR, None) or SpeculativeConfig())
    model.generate = types.MethodType(_speculative_generate_entry, model)
    return model


def disable_speculative(model: PreTrainedModel) -> PreTrainedModel:
    """Undo ``enable_speculative``: ``generate`` is the class's again."""
    model.__dict__.pop("generate", None)
    model.__dict__.pop(_CONFIG_ATTR, None)
    return model


def is_speculative_enabled(model) -> bool:
    """Whether ``model.generate`` routes assisted calls to our loop."""
    return _CONFIG_ATTR in getattr(model, "__dict__", {})


def _speculative_generate_entry(self, *args, assistant_model=None, speculative_config=None, **kwargs):
    class_generate = type(self).generate
    if assistant_model is None or any(kwargs.get(key) for key in _TRANSFORMERS_ONLY):
        if speculative_config is not None:
            raise ValueError("speculative_config applies only together with assistant_model=.")
        return class_generate(self, *args, assistant_model=assistant_model, **kwargs)
    config = speculative_config or getattr(self, _CONFIG_ATTR)
    if not isinstance(config, SpeculativeConfig):
        raise TypeError(f"speculative_config must be a hf_plugins.SpeculativeConfig, got {type(config).__name__}.")
    if not _same_tokenizer(self, assistant_model, kwargs):
        logger.info("draft and target tokenizers differ: using transformers' universal assisted decoding")
        return class_generate(self, *args, assistant_model=assistant_model, **kwargs)
    num_beams = kwargs.get("num_beams") or 1
    if num_beams > 1:
        raise ValueError(f"Speculative decoding verifies one sequence per row; got num_beams={num_beams}. Use num_beams=1.")
    _stop_strings_as_criteria(self, kwargs)
    return class_generate(
        self,
        *args,
        custom_generate=speculative_generate,
        speculative_draft=assistant_model,
        speculative_config=config,
        speculative_streamer=kwargs.pop("streamer", None),
        **kwargs,
    )


def _stop_strings_as_criteria(model: PreTrainedModel, kwargs: dict) -> None:
    """Turn ``stop_strings=`` + ``tokenizer=`` into a stopping criterion: transformers hands a ``custom_generate``
    callable no tokenizer, so it could not build that criterion itself."""
    stop_strings = kwargs.get("stop_strings") or getattr(kwargs.get("generation_config"), "stop_strings", None)
    if not stop_strings:
        return
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= too (to match strings across token boundaries).")
    from transformers.generation.stopping_criteria import StopStringCriteria, StoppingCriteriaList

    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer, stop_strings))
    kwargs["stopping_criteria"] = criteria
    kwargs.pop("stop_strings", None)
    if kwargs.get("generation_config") is not None and kwargs["generation_config"].stop_strings:
        kwargs["generation_config"] = copy.copy(kwargs["generation_config"])
        kwargs["generation_config"].stop_strings = None


def _same_tokenizer(target: PreTrainedModel, draft: PreTrainedModel, kwargs: dict) -> bool:
    """True when draft and target share token ids; False sends a call with both tokenizers to transformers' UAD.

    Without tokenizers the configs are compared; a mismatch there raises, since ids cannot be translated.
    """
    tokenizer, draft_tokenizer = kwargs.get("tokenizer"), kwargs.get("assistant_tokenizer")
    if tokenizer is not None and draft_tokenizer is not None:
        if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            return False
        kwargs.pop("assistant_tokenizer")
        return True
    check_compatible_vocab(target, draft)
    return True


def check_compatible_vocab(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    """ValueError when the draft's special tokens or vocabulary size show a different tokenizer."""
    target_cfg, draft_cfg = target.config.get_text_config(), draft.config.get_text_config()
    for name in ("eos_token_id", "bos_token_id"):
        ours = getattr(target.generation_config, name, None) or getattr(target_cfg, name, None)
        theirs = getattr(draft.generation_config, name, None) or getattr(draft_cfg, name, None)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(_mismatch(f"{name} {theirs} vs the target's {ours}"))
    # Families pad their embedding tables differently (e.g. to a multiple of 64/128); ids beyond the shared range
    # are never produced by a real tokenizer, but a larger gap means a different vocabulary.
    if abs(target_cfg.vocab_size - draft_cfg.vocab_size) > 1024:
        raise ValueError(_mismatch(f"vocab_size {draft_cfg.vocab_size} vs the target's {target_cfg.vocab_size}"))


def _mismatch(detail: str) -> str:
    return (
        f"The draft model does not share the target's tokenizer ({detail}). Use a draft from the same family, or "
        "pass tokenizer= and assistant_tokenizer= to generate for universal assisted decoding."
    )
