"""Every Triton kernel of the project (FFT conv's are checked in ``test_fftconv_triton.py``) compiles for a real
NVIDIA GPU within its shared memory, at the configurations its launcher uses: every autotuning config, the fixed
tiling of explicit calls, and the constexprs of realistic model shapes (Llama-8B-like GEMMs, head dims 64 and 128,
GLA's chunk sizes). The interpreter tests cannot see a kernel that would stop with "out of resources" on an H100
or an A100; these compile it for the card's architecture through Triton's passes (:mod:`tests.kernels.gpu_compile`),
no GPU needed.

Routes: fp32 and bf16 activations on sm_90 (H100), fp16 on sm_80 (A100). Each launcher's tiling comes from its
own code, with ``_INTERPRETER`` patched off so it picks the GPU values.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import triton

from hf_plugins.kernels.awq_gemm import triton as awq_triton
from hf_plugins.kernels.bitplane_gemm import triton as bitplane_triton
from hf_plugins.kernels.dot_loop import triton as dot_loop_triton
from hf_plugins.kernels.gla import triton as gla_triton
from hf_plugins.kernels.kv4_attention import triton as kv4_triton
from hf_plugins.kernels.w4ax_gemm import reference as w4ax_reference
from hf_plugins.kernels.w4ax_gemm import triton as w4ax_triton
from tests.kernels.gpu_compile import shared_memory

SHARED_MEMORY = {90: 232448, 80: 166912}
"""Bytes of shared memory one block may use: H100 (sm_90) 227 KiB, A100 (sm_80) 163 KiB."""

ROUTES = {"fp32-sm90": ("fp32", 90), "bf16-sm90": ("bf16", 90), "fp16-sm80": ("fp16", 80)}
"""Activation dtype and the GPU it is checked on."""

DOT_DTYPE = {"fp32": "tl.float32", "bf16": "tl.bfloat16", "fp16": "tl.float16"}
"""The ``DT`` constexpr of each activation dtype on a GPU (``_tiles.dot_dtype`` without the interpreter)."""

GEMM_INTS = ["M", "N", "K", "G", "NW", "M_BUCKET"]
GEMM_DIVISIBLE = ["N", "K", "G", "NW", "KW"]
"""Llama-8B-like GEMMs: N, K in 4096 / 14336, group 128, so these are multiples of 16 (M is anything)."""

GLA_DIMS = [(64, 64), (128, 256), (256, 512)]
"""GLA (key, value) head dims: small heads, GLAConfig's defaults (hidden 1024, 4 heads), the paper's 1.3B."""

GLA_BIG_TILES = {"num_warps": 8}
"""``gla_triton._BIG_TILES`` on a GPU (the module computes it at import, empty under the interpreter)."""

KV4_HEAD_DIMS = [64, 128]
KV4_ROWS = [16, 128]
"""Query rows per kv head (``BLOCK_M``): decoding with 4 query heads per kv head, and the largest verification
call, 16 query tokens of 8 query heads per kv head (Llama-70B-like GQA, ``PACKED_QUERY_LIMIT``)."""


@pytest.fixture
def gpu_launchers(monkeypatch):
    """The launchers' tiling functions return what they return on a GPU."""
    for module in (awq_triton, bitplane_triton, gla_triton, w4ax_triton):
        monkeypatch.setattr(module, "_INTERPRETER", False)


def launch(blocks: dict) -> tuple[dict, dict]:
    """A launcher's keyword arguments -> (constexprs, the ``num_warps`` / ``num_stages`` options given)."""
    options = {k: blocks[k] for k in ("num_warps", "num_stages") if k in blocks}
    return {k: v for k, v in blocks.items() if k not in options}, options


def from_config(config: triton.Config) -> tuple[dict, dict]:
    """An autotuning config -> (constexprs, launch options)."""
    return dict(config.kwargs), {"num_warps": config.num_warps, "num_stages": config.num_stages}


def case(module, kernel: str, route: str, constants: dict, options: dict | None = None, **fields) -> dict:
    """A :mod:`tests.kernels.gpu_compile` case; ``options`` default to Triton's (4 warps, 3 stages), as a launch
    that names none gets."""
    dtype, arch = ROUTES[route]
    return {"module": module.__name__, "kernel": kernel, "constants": constants, "dtype": dtype, "arch": arch,
            "typed": [], "ints": [], **{"num_warps": 4, **(options or {})}, **fields}


def assert_all_fit(cases: list[dict], shared: list[int]) -> None:
    """Each case needs some shared memory (a working measurement) and at most its GPU's."""
    too_big = [f"{c['kernel']} {c['constants']} warps={c['num_warps']} stages={c.get('num_stages', 3)}: {s} bytes"
               for c, s in zip(cases, shared) if not 0 < s <= SHARED_MEMORY[c["arch"]]]
    assert not too_big, "outside (0, limit] bytes of shared memory:\n" + "\n".join(too_big)


@functools.cache
def compiled(builder) -> dict[str, tuple[list[dict], list[int]]]:
    """``builder(route)``'s cases of every route with their shared memory, compiled in one batch (one process, which
    imports torch and triton once)."""
    cases = {route: builder(route) for route in ROUTES}
    shared = shared_memory([c for route_cases in cases.values() for c in route_cases])
    result, start = {}, 0
    for route, route_cases in cases.items():
        result[route] = route_cases, shared[start:start + len(route_cases)]
        start += len(route_cases)
    return result


def awq_cases(route: str) -> list[dict]:
    """Every autotuning config of the three AWQ kernels (group 128: each K tile in one group), and the fixed tiling
    of explicit calls at decode (M = 1, and gemv forced up to M = 64 rows) and prefill, also across groups (group
    16 tiles span several)."""
    dtype = ROUTES[route][0]
    common = {"typed": ["x", "y", "w"], "ints": GEMM_INTS, "divisible": GEMM_DIVISIBLE,
              "types": {"qweight": "*i32", "qzeros": "*i32", "scales": "*fp16", "counters": "*i32"}}
    plain = awq_triton.AwqGemmConfig()
    gemm_default = launch(awq_triton._explicit_blocks("gemm", 512, 4096, 4096, plain))
    tilings = {"awq_gemv_splitk_kernel": [({**c, "BM": 16}, o) for c, o in map(from_config, awq_triton.GEMV_CONFIGS)]
               + [launch(awq_triton._explicit_blocks("gemv", M, 4096, 4096, plain)) for M in (1, 64)],
               "awq_gemm_tiled_kernel": [({**c, "GROUP_M": 8}, o) for c, o in
                                         [*map(from_config, awq_triton.GEMM_CONFIGS), gemm_default]],
               "awq_dequant_kernel": [from_config(c) for c in awq_triton.DEQUANT_CONFIGS]
               + [launch(awq_triton._explicit_blocks("dequant", 2048, 4096, 4096, plain))]}
    cases = []
    for kernel, kernel_tilings in tilings.items():
        dot = {} if kernel == "awq_dequant_kernel" else {"DT": DOT_DTYPE[dtype]}
        for constants, options in kernel_tilings:
            cases.append(case(awq_triton, kernel, route, {**constants, **dot, "ONE_GROUP": True}, options, **common))
        constants, options = kernel_tilings[-1]  # the explicit tiling with tiles across groups
        cases.append(case(awq_triton, kernel, route, {**constants, **dot, "ONE_GROUP": False}, options, **common))
    return cases


def bitplane_cases(route: str) -> list[dict]:
    """Both GEMM kernels at every autotuning config and the fixed tilings (decode and prefill defaults, the
    ``BitplaneConfig`` default), with 8-bit weights and activations (the most plane loads), the int8 kernel with
    the linear layer's 7 planes per chunk; and the activation quantizer. The int8 kernel is the same for every
    activation dtype but for its output's, so the fp32 route leaves it to the others."""
    dtype = ROUTES[route][0]
    plain = bitplane_triton.BitplaneConfig()
    tilings = [*map(from_config, bitplane_triton.CONFIGS),
               *(launch(bitplane_triton._default_blocks(M, 4096, 4096, 128)) for M in (1, 512)),
               launch(bitplane_triton._blocks(1, 4096, 4096, 128, plain))]
    common = {"typed": ["x", "bias", "y"], "ints": ["M", "N", "K", "G", "KW", "M_BUCKET"],
              "divisible": GEMM_DIVISIBLE, "types": {"w": "*i32", "xa": "*i8"}}
    bits, chunk = bitplane_triton.MAX_BITS, bitplane_triton.INT8_PLANES
    cases = []
    for constants, options in tilings:
        constants = {**constants, "GROUP_M": 8, "W_BITS": bits, "HAS_BIAS": True}
        cases.append(case(bitplane_triton, "bitplane_a16_kernel", route, {**constants, "DT": DOT_DTYPE[dtype]},
                          options, **common))
        if dtype != "fp32":
            axw = {**constants, "A_BITS": bits, "A_CHUNK": chunk, "W_CHUNK": chunk, "INTEGER_OUT": False}
            cases.append(case(bitplane_triton, "bitplane_axw_kernel", route, axw, options, **common))
    quantize = {"A_BITS": bits, "A_CHUNK": chunk, "BK": 1024}  # K >= 1024
    cases.append(case(bitplane_triton, "quantize_activations_kernel", route, quantize, typed=["x"],
                      ints=["M", "K"], types={"xa": "*i8"}))
    return cases


def gla_cases(route: str) -> list[dict]:
    """The chunk kernels (forward and backward; packed sequences and batch rows alike go through ``cu_seqlens``)
    at every chunk size (16 and 32 for short inputs, 64) with every optional state on, and the fused recurrent
    kernel at the head dims of :data:`GLA_DIMS`."""
    dtype = ROUTES[route][0]
    inputs = ["q", "k", "v", "gk", "o", "do", "dq", "dk", "dv", "dgk"]
    int_pointers = {name: "*i32" for name in ("cu_seqlens", "chunk_indices", "chunk_offsets")}
    common = {"typed": inputs, "ints": ["H", "K", "V"], "divisible": ["K", "V"],
              "types": {**int_pointers, "scale": "fp32"}}
    blocks = {gla_triton._blocks(key_dim, value_dim) for key_dim, value_dim in GLA_DIMS}
    cases = []
    for BK, BV in sorted(blocks):
        for BT in (16, 32, 64):
            dot = {"DT": DOT_DTYPE[dtype], "BT": BT}
            intra = {**dot, "BC": gla_triton.SUB_CHUNK, "BK": gla_triton._intra_block(BK)}
            state = {**dot, "BK": BK, "BV": BV}
            kernels = {  # name: (constexprs, launch options)
                "_fwd_state_kernel": ({**state, "HAS_H0": True, "STORE_FINAL": True}, GLA_BIG_TILES),
                "_fwd_intra_kernel": (intra, None),
                "_fwd_output_kernel": (state, GLA_BIG_TILES),
                "_bwd_state_kernel": ({**state, "HAS_DHT": True, "STORE_DH0": True}, GLA_BIG_TILES),
                "_bwd_score_kernel": ({**dot, "BV": BV}, GLA_BIG_TILES),
                "_bwd_intra_kernel": (intra, None),
                "_bwd_value_kernel": (state, GLA_BIG_TILES),
                "_bwd_query_key_kernel": (state, GLA_BIG_TILES),
            }
            for kernel, (constants, options) in kernels.items():
                # _bwd_intra_kernel's dq, dk are the fp32 intra-chunk parts
                typed = ["q", "k", "gk"] if kernel == "_bwd_intra_kernel" else inputs
                cases.append(case(gla_triton, kernel, route, constants, options, **{**common, "typed": typed}))
    for key_dim, value_dim in GLA_DIMS:
        # fused_recurrent_gla_triton's blocks: the whole key dim, and a [BK, BV] state of at most 4096 values
        BK = triton.next_power_of_2(key_dim)
        BV = min(triton.next_power_of_2(value_dim), max(1, 4096 // BK))
        constants = {"BK": BK, "BV": BV, "HAS_H0": True, "STORE_FINAL": True}
        cases.append(case(gla_triton, "_fused_recurrent_kernel", route, constants, **common))
    return cases


def kv4_cases(route: str) -> list[dict]:
    """The split-KV attention kernel at head dims 64 and 128 and :data:`KV4_ROWS` query rows, with the default
    ``block_n``, KV4Cache's default groups (32 key, 64 value channels), asymmetric codes and a mask (the most
    loads); the merge kernel at the most splits (one per program of ``_TARGET_PROGRAMS``)."""
    dtype = ROUTES[route][0]
    strides = [f"s_{t}{d}" for t in ("q", "k", "v") for d in "bht"]
    codes = {name: "*u8" for name in ("k_codes", "v_codes", "mask")}
    scales = {name: "*fp16" for name in ("k_scale", "k_min", "v_scale", "v_min")}
    block_n = inspect.signature(kv4_triton.kv4_attention_triton).parameters["block_n"].default
    cases = []
    for head_dim in KV4_HEAD_DIMS:
        for rows in KV4_ROWS:
            constants = {"HALF_D": head_dim // 2, "K_GROUP": 32, "V_GROUP": min(64, head_dim), "K_SYM": False,
                         "V_SYM": False, "HAS_MASK": True, "BLOCK_M": rows, "BLOCK_N": block_n,
                         "BLOCK_J": max(16, triton.next_power_of_2(head_dim // 2)), "DT": DOT_DTYPE[dtype]}
            cases.append(case(kv4_triton, "_kv4_attention_kernel", route, constants, typed=["q"],
                              ints=[*strides, "s_ksb", "s_ksh", "s_kst", "s_vsb", "s_vsh", "s_vst", "s_mb", "s_mh",
                                    "s_mq", "KV_HEADS", "GROUPS", "T_Q", "T_K", "SPLIT_LEN"],
                              types={**codes, **scales, "qk_scale": "fp32"}, divisible=strides))
        merge = {"D": head_dim, "BLOCK_M": max(KV4_ROWS),
                 "BLOCK_S": triton.next_power_of_2(kv4_triton._TARGET_PROGRAMS), "BLOCK_D": head_dim}
        cases.append(case(kv4_triton, "_merge_splits_kernel", route, merge, typed=["out"],
                          ints=["SPLITS", "KV_HEADS", "GROUPS", "T_Q", "HEADS"]))
    return cases


def w4ax_cases(route: str) -> list[dict]:
    """The GEMM at its three tilings (decode, M <= 128, larger prefill) and both steps (group 64; group 128 or
    per channel), and the activation quantizer."""
    tilings = [launch(w4ax_triton._tiling(M, 4096)) for M in (1, 128, 4096)]
    ints = ["M", "N", "K", "A8", "K4H", "KH", "NB", "GROUP_K"]
    types = {"x8": "*i8", "x4": "*u8", "w": "*u8"}
    fixed = {"HAS_BIAS": True, "ABLOCK": w4ax_reference.BLOCK, "GROUP_M": 8}
    cases = [case(w4ax_triton, "w4ax_gemm_kernel", route,
                  {**constants, **fixed, "STEP": w4ax_reference.step_size(group)}, options,
                  typed=["bias", "y"], ints=ints, divisible=ints[1:], types=types)
             for constants, options in tilings for group in (64, 128)]
    quantize = {"HALF": w4ax_reference.BLOCK // 2, "A8_LIMIT": w4ax_reference.A8_MAX,
                "A4_LIMIT": w4ax_reference.A4_MAX}
    cases.append(case(w4ax_triton, "quantize_activations_kernel", route, quantize, typed=["x"],
                      ints=["M", "K", "A8", "K4H", "NB"], types={**types, "perm": "*i64"}))
    return cases


def dot_loop_cases(route: str) -> list[dict]:
    """The tensor-core probe ``hf-plugins bench hw`` times, at its 128x128x64 tiles with 8 warps: the route's
    float dtype, and int8."""
    constants = {"BM": 128, "BN": 128, "BK": 64}
    options = {"num_warps": 8}
    return [case(dot_loop_triton, "dot_loop_kernel", route, {**constants, "ACC": "tl.float32"}, options,
                 typed=["a_ptr", "b_ptr"], ints=["iters"]),
            case(dot_loop_triton, "dot_loop_kernel", route, {**constants, "ACC": "tl.int32"}, options, ints=["iters"],
                 types={"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": "*i32"})]


FAMILIES = {"awq_gemm": awq_cases, "bitplane_gemm": bitplane_cases, "gla": gla_cases, "kv4_attention": kv4_cases,
            "w4ax_gemm": w4ax_cases, "dot_loop": dot_loop_cases}


@pytest.mark.usefixtures("gpu_launchers")
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_fit_the_gpus_shared_memory(family, route):
    assert_all_fit(*compiled(FAMILIES[family])[route])
