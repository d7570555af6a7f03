"""What every quantization config of ours shares: serialisation, the resolved skip list, a readable repr."""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin


class PluginQuantizationConfig(QuantizationConfigMixin):
    """Base of our configs; a subclass lists its serialised ``FIELDS`` (a ``calibration`` field is optional)."""

    FIELDS: tuple[str, ...] = ()

    def with_skipped_modules(self, modules: list[str]):
        """A copy whose ``modules_to_not_convert`` is exactly ``modules``; the user's config is never mutated."""
        resolved = copy.copy(self)
        resolved.modules_to_not_convert = sorted(set(modules))
        return resolved

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields: the tokenizer is dropped and inline calibration text is recorded as ``"custom"``."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in self.FIELDS}
        if isinstance(getattr(self, "calibration", None), list):
            out["calibration"] = "custom"
        out["quant_method"] = self.quant_method
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "quant_method")
        return f"{type(self).__name__}({fields})"
