"""``BipolarIntConfig``: arbitrary-precision bipolar-INT quantization (1-8 bit weights, optional 1-8 bit
activations), a transformers quantization config."""

from __future__ import annotations

from typing import Any

from ..awq.config import CALIBRATION_ASSETS, is_clip_choice
from ..config_base import PluginQuantizationConfig

QUANT_METHOD = "hf_plugins_bipolar_int"
ALLOWED_BITS = range(1, 9)
ALLOWED_GROUP_SIZES = (32, 64, 128, -1)
SCALE_SEARCHES = (None, "awq")

_FIELDS = (
    "w_bits",
    "a_bits",
    "group_size",
    "calibration",
    "calibration_samples",
    "calibration_seq_len",
    "scale_search",
    "clip",
    "modules_to_not_convert",
)
_IGNORED_KEYS = {"quant_method", "tokenizer"}


class BipolarIntConfig(PluginQuantizationConfig):
    """Bipolar-INT quantization: each weight bit stands for -1 or +1 (values the odd integers in
    ``[-(2^n - 1), 2^n - 1]``), stored as bit planes for bit-level decomposed matmuls.

    Args:
        w_bits (`int`): weight bits, 1..8. Default: 4.
        a_bits (`int | None`): activation bits, 1..8, quantized per token at run time; None keeps activations in
            floating point (weight-only). Default: None.
        group_size (`int`): input channels sharing a scale and an offset: 32, 64, 128 or -1 (per output
            channel); a partial last group is allowed. Default: 128.
        calibration (`str | list[str] | None`): calibration text for ``scale_search="awq"`` (``"wiki"``,
            ``"news"``, ``"code"`` or a list of documents). Default: None.
        calibration_samples (`int`), calibration_seq_len (`int`): calibration sequences and their length.
            Defaults: 8, 512.
        scale_search (`str | None`): ``"awq"`` runs AWQ's activation-aware scale search (and its clip search
            when ``clip`` is on) on the integer grid, which the bipolar format rewrites without loss; None is
            round-to-nearest. Default: None.
        clip (`bool | str`): AWQ's clip search with ``scale_search="awq"``: True, False or "auto".
            Default: "auto".
        modules_to_not_convert (`list[str] | None`): modules kept in full precision (the output embedding
            always is). Default: None.
        tokenizer: tokenizer of the calibration text; not serialized.
    """

    FIELDS = _FIELDS

    def __init__(self, w_bits: int = 4, a_bits: int | None = None, group_size: int = 128,
                 calibration: str | list[str] | None = None, calibration_samples: int = 8,
                 calibration_seq_len: int = 512, scale_search: str | None = None, clip: bool | str = "auto",
                 modules_to_not_convert: list[str] | None = None, tokenizer: Any = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"BipolarIntConfig got unknown keys {unknown}; allowed keys are {list(_FIELDS)}.")
        self.quant_method = QUANT_METHOD
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        self.calibration = calibration
        self.calibration_samples, self.calibration_seq_len = calibration_samples, calibration_seq_len
        self.scale_search, self.clip = scale_search, clip
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.tokenizer = tokenizer
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ``ValueError``/``TypeError`` naming the field, the value and what is allowed."""
        _check_int("w_bits", self.w_bits, ALLOWED_BITS)
        if self.a_bits is not None:
            _check_int("a_bits", self.a_bits, ALLOWED_BITS)
        _check_int("group_size", self.group_size, ALLOWED_GROUP_SIZES)
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(f"BipolarIntConfig.scale_search must be None or 'awq', got {self.scale_search!r}.")
        if not is_clip_choice(self.clip):
            raise ValueError(f"BipolarIntConfig.clip must be True, False or 'auto', got {self.clip!r}.")
        for name in ("calibration_samples", "calibration_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BipolarIntConfig.{name} must be a positive int, got {value!r}.")
        if isinstance(self.calibration, str) and self.calibration not in (*CALIBRATION_ASSETS, "custom"):
            raise ValueError(f"BipolarIntConfig.calibration must be one of {list(CALIBRATION_ASSETS)} or a list "
                             f"of texts, got {self.calibration!r}.")

    @property
    def needs_calibration(self) -> bool:
        return self.scale_search == "awq"

    def awq_search(self) -> dict | None:
        """``apply_awq`` arguments for the integer grid the bipolar weights rewrite, or None for RTN."""
        if not self.needs_calibration:
            return None
        return dict(bits=self.w_bits, group_size=self.group_size, scale_search=True, n_grid=20, duo_scaling=True,
                    clip=self.clip, quantized_inputs=True)


def _check_int(name: str, value: Any, allowed) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        shown = f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else list(allowed)
        raise ValueError(f"BipolarIntConfig.{name} must be one of {shown}, got {value!r}.")
