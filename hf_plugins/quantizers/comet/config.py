"""``W4A4KV4Config``: COMET-style W4A4KV4 quantization (a transformers quantization config).

4-bit symmetric weights per group, activations quantized per token and 128-channel block at run time (4-bit,
with the outlier blocks found by FMPQ in 8-bit), and optionally a 4-bit KV cache.
"""

from __future__ import annotations

from typing import Any

from ...kernels.w4ax_gemm.reference import ALLOWED_GROUP_SIZES
from ..awq.config import CALIBRATION_ASSETS
from ..config_base import PluginQuantizationConfig

QUANT_METHOD = "hf_plugins_w4a4kv4"
ALLOWED_KV_BITS = (4, 16)
OUTLIER_CHOICES = ("auto", "all")

_FIELDS = (
    "group_size",
    "outlier_blocks",
    "kv_bits",
    "kv_group_size",
    "kv_value_group_size",
    "calibration",
    "calibration_samples",
    "calibration_seq_len",
    "modules_to_not_convert",
)
_IGNORED_KEYS = {"quant_method", "tokenizer"}


class W4A4KV4Config(PluginQuantizationConfig):
    """W4A4 with fine-grained mixed-precision activations (FMPQ) and a 4-bit KV cache (COMET, Liu et al. 2024).

    Args:
        group_size (`int`): input channels per weight scale: 64, 128 or -1 (per output channel). Default: 128.
        outlier_blocks (`int | str`): 128-channel activation blocks per linear kept in 8 bits, after the input
            channels are reordered so the largest calibration activations come first: ``"auto"`` picks per layer
            by measured output error, an int fixes the count (0 is plain W4A4: no reordering, no calibration),
            ``"all"`` makes every block 8-bit (W4A8). Default: "auto".
        kv_bits (`int`): 4 stores keys and values in 4 bits (a ``KV4Cache`` is used by ``generate``); 16 keeps the
            model's float cache. Default: 4.
        kv_group_size (`int`): head-dimension channels per key scale and minimum (per token and head); the head
            dimension must be a multiple of it. Default: 32.
        kv_value_group_size (`int`): the same for values. Default: 64 (with 32 for keys, the cache holds 29.7% of
            an fp16 cache's bytes).
        calibration (`str | list[str] | None`): calibration text for FMPQ (``"wiki"``, ``"news"``, ``"code"`` or a
            list of documents); required unless ``outlier_blocks`` is 0 or ``"all"`` and can be passed to
            ``hf_plugins.quantize`` instead. Default: None.
        calibration_samples (`int`), calibration_seq_len (`int`): calibration sequences and their length.
            Defaults: 8, 512.
        modules_to_not_convert (`list[str] | None`): modules kept in full precision (the output embedding always
            is). Default: None.
        tokenizer: tokenizer of the calibration text; not serialized.
    """

    FIELDS = _FIELDS

    def __init__(self, group_size: int = 128, outlier_blocks: int | str = "auto", kv_bits: int = 4,
                 kv_group_size: int = 32, kv_value_group_size: int = 64,
                 calibration: str | list[str] | None = None, calibration_samples: int = 8,
                 calibration_seq_len: int = 512, modules_to_not_convert: list[str] | None = None,
                 tokenizer: Any = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"W4A4KV4Config got unknown keys {unknown}; allowed keys are {list(_FIELDS)}.")
        self.quant_method = QUANT_METHOD
        self.group_size, self.outlier_blocks = group_size, outlier_blocks
        self.kv_bits, self.kv_group_size, self.kv_value_group_size = kv_bits, kv_group_size, kv_value_group_size
        self.calibration = calibration
        self.calibration_samples, self.calibration_seq_len = calibration_samples, calibration_seq_len
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.tokenizer = tokenizer
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ``ValueError`` naming the field, the value and what is allowed."""
        _check_choice("group_size", self.group_size, ALLOWED_GROUP_SIZES)
        _check_choice("kv_bits", self.kv_bits, ALLOWED_KV_BITS)
        blocks = self.outlier_blocks
        if not (blocks in OUTLIER_CHOICES or (_is_int(blocks) and blocks >= 0)):
            raise ValueError(f"W4A4KV4Config.outlier_blocks must be 'auto', 'all' or an int >= 0, got {blocks!r}.")
        for name in ("kv_group_size", "kv_value_group_size", "calibration_samples", "calibration_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"W4A4KV4Config.{name} must be a positive int, got {value!r}.")
        for name in ("kv_group_size", "kv_value_group_size"):
            if getattr(self, name) % 2:
                raise ValueError(f"W4A4KV4Config.{name} must be even (two 4-bit codes per byte), got "
                                 f"{getattr(self, name)}.")
        if isinstance(self.calibration, str) and self.calibration not in (*CALIBRATION_ASSETS, "custom"):
            raise ValueError(f"W4A4KV4Config.calibration must be one of {list(CALIBRATION_ASSETS)} or a list of "
                             f"texts, got {self.calibration!r}.")

    @property
    def needs_calibration(self) -> bool:
        """FMPQ's reordering and per-layer choice need calibration activations; fixed layouts without reordering
        (plain W4A4, all-8-bit W4A8) do not."""
        return self.outlier_blocks not in (0, "all")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, allowed) -> None:
    if not _is_int(value) or value not in allowed:
        raise ValueError(f"W4A4KV4Config.{name} must be one of {list(allowed)}, got {value!r}.")
