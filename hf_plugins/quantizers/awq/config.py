"""``AwqConfig``: the user-facing configuration of our AWQ quantizer (a transformers quantization config)."""

from __future__ import annotations

from typing import Any

from ..config_base import PluginQuantizationConfig

QUANT_METHOD = "hf_plugins_awq"
"""Our ``quant_method``: distinct from transformers' built-in ``"awq"`` so both can coexist."""

ALLOWED_BITS = range(2, 9)
ALLOWED_GROUP_SIZES = (32, 64, 128, -1)
CALIBRATION_ASSETS = ("wiki", "news", "code")
# Sequences of calibration text (calibration_seq_len tokens each) held out from the searches to check clip="auto".
CLIP_VALIDATION_SAMPLES = 4


def is_clip_choice(value: Any) -> bool:
    """True for the accepted ``clip`` values: True, False or "auto" (not 1 / 0, which compare equal to the bools)."""
    return isinstance(value, (bool, str)) and value in (True, False, "auto")


_FIELDS = (
    "bits",
    "group_size",
    "zero_point",
    "calibration",
    "calibration_samples",
    "calibration_seq_len",
    "scale_search",
    "n_grid",
    "duo_scaling",
    "clip",
    "quantized_inputs",
    "modules_to_not_convert",
    "format",
)
# Keys that transformers or older versions of this config write back into ``from_dict``.
_IGNORED_KEYS = {"quant_method", "tokenizer"}


class AwqConfig(PluginQuantizationConfig):
    """Activation-aware weight quantization (AWQ) to ``bits``-bit integers with integer zero points.

    Args:
        bits (`int`): weight bit width, 2..8. 4 runs the packed int4 kernels; other widths store one code per byte.
            Default: 4.
        group_size (`int`): input channels sharing one scale and zero point: 32, 64, 128 or -1 (per output
            channel). A group size that does not divide a layer's input size gives that layer a partial last
            group. Default: 128.
        zero_point (`bool`): asymmetric quantization with an integer zero point; AWQ's symmetric variant is not
            offered. Must be True. Default: True.
        calibration (`str | list[str] | None`): calibration text: a packaged text name (``"wiki"``, ``"news"``,
            ``"code"``; held-out articles are never used) or a list of documents. Needed by
            ``from_pretrained(..., quantization_config=...)`` when ``scale_search`` or ``clip`` is on; with
            ``hf_plugins.quantize`` the data can be passed to the call instead. Default: None.
        calibration_samples (`int`): number of calibration sequences, each from a different document while the
            text has documents of ``calibration_seq_len`` tokens left (8 x 512 tokens calibrate SmolLM2-135M in
            about 90 s on 2 CPU cores; the paper uses 128). Default: 8.
        calibration_seq_len (`int`): tokens per calibration sequence. Default: 512.
        scale_search (`bool`): AWQ's activation-aware per-channel scale search. Default: True.
        n_grid (`int`): grid points for the scale exponent alpha in [0, 1). Default: 20.
        duo_scaling (`bool`): scale by ``s_x^a / s_w^(1-a)`` (AutoAWQ's default) instead of ``s_x^a``.
            Default: True.
        clip (`bool | str`): AWQ's weight-clipping search (AutoAWQ's symmetric clip), on every calibration
            token; a row keeps its clips only where they lower its whole output error. ``"auto"`` applies
            separately refined lower / upper clip bounds instead, then checks the clips end to end: the quantized
            model's next-token loss on ``CLIP_VALIDATION_SAMPLES`` further calibration sequences (text the searches
            never saw), with those clips and with none; the better one stays. Without validation text (token
            ids, or text too short to leave any), ``"auto"`` is ``True``. Default: "auto".
        quantized_inputs (`bool`): calibrate each decoder block on the outputs of the already quantized blocks
            before it (what it sees at inference) rather than on the float model's (llm-awq / AutoAWQ: False).
            Default: True.
        modules_to_not_convert (`list[str] | None`): module names (or patterns) to keep in full precision; the
            output embedding is always kept. Default: None.
        format (`str`): packed layout; ``"gemm"`` is the AutoAWQ/llm-awq "GEMM" int4 layout. Default: "gemm".
        tokenizer: tokenizer for the calibration text; not serialized. Default: the model folder's tokenizer.

    With ``scale_search=False`` and ``clip=False`` this is plain round-to-nearest (RTN) in the same format.
    """

    FIELDS = _FIELDS

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        calibration: str | list[str] | None = None,
        calibration_samples: int = 8,
        calibration_seq_len: int = 512,
        scale_search: bool = True,
        n_grid: int = 20,
        duo_scaling: bool = True,
        clip: bool | str = "auto",
        quantized_inputs: bool = True,
        modules_to_not_convert: list[str] | None = None,
        format: str = "gemm",
        tokenizer: Any = None,
        **kwargs: Any,
    ):
        unknown = sorted(set(kwargs) - _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"AwqConfig got unknown keys {unknown}; allowed keys are {list(_FIELDS)}.")
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.zero_point = zero_point
        self.calibration = calibration
        self.calibration_samples = calibration_samples
        self.calibration_seq_len = calibration_seq_len
        self.scale_search = scale_search
        self.n_grid = n_grid
        self.duo_scaling = duo_scaling
        self.clip = clip
        self.quantized_inputs = quantized_inputs
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.format = format
        self.tokenizer = tokenizer
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ``ValueError``/``TypeError`` naming the field, the value and what is allowed."""
        _check_int("bits", self.bits, ALLOWED_BITS)
        _check_int("group_size", self.group_size, ALLOWED_GROUP_SIZES)
        if self.zero_point is not True:
            raise ValueError(
                f"AwqConfig.zero_point must be True (asymmetric INT with integer zeros), got {self.zero_point!r}."
            )
        if self.format != "gemm":
            raise ValueError(f"AwqConfig.format must be 'gemm', got {self.format!r}.")
        for name in ("calibration_samples", "calibration_seq_len", "n_grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AwqConfig.{name} must be a positive int, got {value!r}.")
        for name in ("scale_search", "duo_scaling", "quantized_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"AwqConfig.{name} must be a bool, got {getattr(self, name)!r}.")
        if not is_clip_choice(self.clip):
            raise ValueError(f"AwqConfig.clip must be True, False or 'auto', got {self.clip!r}.")
        _check_calibration(self.calibration)

    @property
    def needs_calibration(self) -> bool:
        """True when quantizing needs calibration activations (scale or clip search)."""
        return self.scale_search or self.clip is not False


def _check_int(name: str, value: Any, allowed) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        shown = f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else list(allowed)
        raise ValueError(f"AwqConfig.{name} must be one of {shown}, got {value!r}.")


def _check_calibration(calibration: Any) -> None:
    if calibration is None or calibration == "custom":
        return
    if isinstance(calibration, str):
        if calibration not in CALIBRATION_ASSETS:
            raise ValueError(
                f"AwqConfig.calibration must be one of {list(CALIBRATION_ASSETS)} or a list of texts, "
                f"got {calibration!r}."
            )
        return
    if not isinstance(calibration, (list, tuple)) or not calibration or not all(isinstance(t, str) for t in calibration):
        raise TypeError(
            "AwqConfig.calibration must be a packaged text name or a non-empty list of strings, "
            f"got {type(calibration).__name__}."
        )
