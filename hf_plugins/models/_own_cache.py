"""``generate`` support for model families whose past is not keys and values (GLA states, Hyena histories)."""

from __future__ import annotations

from transformers.cache_utils import Cache


class OwnCacheMixin:
    """Gives ``generate`` (and our speculative decoding's draft) the model's own cache from ``new_cache()``;
    transformers' default ``DynamicCache`` could not hold it."""

    def new_cache(self) -> Cache:
        raise NotImplementedError

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            model_kwargs["cache"] = self.new_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
