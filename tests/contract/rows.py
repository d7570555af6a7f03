"""The contract table: one row per quantization plugin. Every row must pass every test in test_contract.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import hf_plugins


@dataclass(frozen=True)
class ContractRow:
    """How to build a plugin's config, what it swaps in, and which bad configs must fail with which message."""

    name: str
    make_config: Callable[..., Any]
    quantized_module: type
    # Minimum SNR (dB) of quantized vs float logits on a tiny random model.
    logits_snr_floor_db: float
    bad_configs: list[tuple[dict, type, str]] = field(default_factory=list)


ROWS = [
    ContractRow(
        name="awq-w4g32",
        make_config=lambda **kw: hf_plugins.AwqConfig(
            **{"bits": 4, "group_size": 32, "calibration_samples": 4, "calibration_seq_len": 32, **kw}
        ),
        quantized_module=hf_plugins.AwqLinear,
        logits_snr_floor_db=12.0,
        bad_configs=[
            (dict(bits=9), ValueError, r"AwqConfig\.bits must be one of 2\.\.8, got 9"),
            (dict(group_size=100), ValueError, r"AwqConfig\.group_size must be one of \[32, 64, 128, -1\], got 100"),
            (dict(zero_point=False), ValueError, r"AwqConfig\.zero_point must be True"),
            (dict(calibration="pile"), ValueError, r"AwqConfig\.calibration must be one of \['wiki', 'news', 'code'\]"),
            (dict(bitz=4), ValueError, r"AwqConfig got unknown keys \['bitz'\]"),
            (dict(n_grid=0), ValueError, r"AwqConfig\.n_grid must be a positive int, got 0"),
            (dict(clip="yes"), ValueError, r"AwqConfig\.clip must be True, False or 'auto', got 'yes'"),
        ],
    ),
    ContractRow(
        name="bipolar-w4-awq",
        make_config=lambda **kw: hf_plugins.BipolarIntConfig(
            **{"w_bits": 4, "group_size": 32, "scale_search": "awq", "calibration_samples": 4,
               "calibration_seq_len": 32, **kw}
        ),
        quantized_module=hf_plugins.BipolarIntLinear,
        logits_snr_floor_db=12.0,
        bad_configs=[
            (dict(w_bits=9), ValueError, r"BipolarIntConfig\.w_bits must be one of 1\.\.8, got 9"),
            (dict(a_bits=0), ValueError, r"BipolarIntConfig\.a_bits must be one of 1\.\.8, got 0"),
            (dict(group_size=100), ValueError, r"BipolarIntConfig\.group_size must be one of \[32, 64, 128, -1\]"),
            (dict(scale_search="gptq"), ValueError, r"BipolarIntConfig\.scale_search must be None or 'awq'"),
            (dict(calibration="pile"), ValueError, r"BipolarIntConfig\.calibration must be one of"),
            (dict(wbits=3), ValueError, r"BipolarIntConfig got unknown keys \['wbits'\]"),
        ],
    ),
    ContractRow(
        # Weights and per-token activations on the packed kernels, no calibration (tiny models: 28-37 dB measured).
        name="bipolar-w8a8",
        make_config=lambda **kw: hf_plugins.BipolarIntConfig(**{"w_bits": 8, "a_bits": 8, "group_size": 32, **kw}),
        quantized_module=hf_plugins.BipolarIntLinear,
        logits_snr_floor_db=24.0,
        bad_configs=[
            (dict(a_bits=9), ValueError, r"BipolarIntConfig\.a_bits must be one of 1\.\.8, got 9"),
            (dict(clip="yes"), ValueError, r"BipolarIntConfig\.clip must be True, False or 'auto', got 'yes'"),
        ],
    ),
    ContractRow(
        # FMPQ on calibration activations, W4 weights, 4-/8-bit activation blocks (tiny models: 7.6-18.9 dB
        # measured; plain W4A4 1.6-10.4 dB). The float KV cache (kv_bits=16) keeps "generate with cache equals
        # without" meaningful; the 4-bit cache is tested in test_kv4_cache.py.
        name="w4a4-fmpq",
        make_config=lambda **kw: hf_plugins.W4A4KV4Config(
            **{"group_size": 64, "outlier_blocks": "auto", "kv_bits": 16, "calibration_samples": 4,
               "calibration_seq_len": 32, **kw}
        ),
        quantized_module=hf_plugins.W4AxLinear,
        logits_snr_floor_db=7.0,
        bad_configs=[
            (dict(group_size=32), ValueError, r"W4A4KV4Config\.group_size must be one of \[64, 128, -1\], got 32"),
            (dict(kv_bits=8), ValueError, r"W4A4KV4Config\.kv_bits must be one of \[4, 16\], got 8"),
            (dict(outlier_blocks=-2), ValueError, r"W4A4KV4Config\.outlier_blocks must be 'auto', 'all' or an int"),
            (dict(calibration="pile"), ValueError, r"W4A4KV4Config\.calibration must be one of"),
        ],
    ),
]
