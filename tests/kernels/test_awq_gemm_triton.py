"""Triton AWQ GEMM (``hf_plugins.kernels.awq_gemm.triton``) against the pure-torch oracle.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before this
module imports them) at ~256-sized problems with big blocks. Tests marked ``gpu`` run the GPU tilings (the
autotuner's configs, the performance-critical part) at model shapes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

from hf_plugins.kernels.awq_gemm import triton as awq_triton
from hf_plugins.kernels.awq_gemm.reference import awq_gemm_reference, pack_awq, unpack_awq
from hf_plugins.kernels.awq_gemm.triton import AwqGemmConfig, awq_gemm_triton, dispatch
from tests.tolerances import assert_close_kernel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PER_CHANNEL = 0
"""Stands for ``group_size == K`` in the case tables."""


def make_layer(K: int, N: int, group_size: int, scale_dtype: torch.dtype = torch.float16, device: str = "cpu"):
    """Random packed AWQ layer: ``qweight [K, N // 8]``, ``qzeros [ceil(K / G), N // 8]``, ``scales``."""
    groups = -(-K // group_size)
    qweight = pack_awq(torch.randint(0, 16, (K, N), dtype=torch.int32))
    qzeros = pack_awq(torch.randint(0, 16, (groups, N), dtype=torch.int32))
    scales = (torch.rand(groups, N) * 0.02 + 0.001).to(scale_dtype)
    return qweight.to(device), qzeros.to(device), scales.to(device)


def check(M: int, K: int, N: int, group_size: int, dtype: torch.dtype, config: AwqGemmConfig | None,
          device: str = "cpu", scale_dtype: torch.dtype = torch.float16) -> None:
    """Run the kernel and compare with ``awq_gemm_reference`` on fp64 activations (no double rounding)."""
    G = K if group_size == PER_CHANNEL else group_size
    qweight, qzeros, scales = make_layer(K, N, G, scale_dtype, device)
    x = torch.randn(M, K, device=device).to(dtype)
    y = awq_gemm_triton(x, qweight, qzeros, scales, G, config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    expected = awq_gemm_reference(x.cpu().double(), qweight.cpu(), qzeros.cpu(), scales.cpu(), G)
    assert_close_kernel(y.cpu(), expected, dtype)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the launcher allocates (outputs, split-K partials, dequantized weights) starts as NaN."""

    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(awq_triton, "_new_output", nan_filled)


def _cases():
    """Every M x group x dtype combination; K and N rotate through their values so each pairing appears."""
    shapes = itertools.cycle([(128, 64), (256, 136), (256, 64), (128, 136)])
    for (M, G, dtype), (K, N) in zip(itertools.product((1, 5, 16, 33), (32, 64, 128, PER_CHANNEL), DTYPES),
                                     shapes):
        group = "pc" if G == PER_CHANNEL else G
        yield pytest.param(M, K, N, G, dtype, id=f"M{M}-K{K}-N{N}-G{group}-{dtype}")
    # A partial last group (K % G != 0), as produced for layers whose width is not a multiple of the group.
    yield pytest.param(5, 200, 64, 64, "fp32", id="M5-K200-N64-G64-fp32-partial-group")
    yield pytest.param(1, 200, 136, 128, "fp16", id="M1-K200-N136-G128-fp16-partial-group")


@triton.jit
def _unpack_probe_kernel(packed, out, R: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr):
    o_r = tl.arange(0, R)
    b_packed = tl.load(packed + o_r[:, None] * (BN // 8) + tl.arange(0, BN // 8)[None, :])
    if DT == tl.float32:
        b_w = awq_triton._unpack_f32(b_packed, BN)
    else:
        b_w = awq_triton._unpack_half(b_packed, DT)
    tl.store(out + o_r[:, None] * BN + tl.arange(0, BN)[None, :], b_w)


@pytest.mark.parametrize("dtype, bias", [("fp32", 2.0**23), ("fp16", 1024.0), ("bf16", 128.0)])
def test_unpack_bits(dtype, bias):
    """Both unpackers give ``bias + nibble`` in channel order, bit-exactly. bf16 is only stored here, never
    computed with, so this checks the GPU bf16 magic that the interpreter cannot run end to end."""
    codes = torch.randint(0, 16, (16, 64), dtype=torch.int32)
    out = torch.full((16, 64), float("nan"), dtype=DTYPES[dtype])
    tl_dtype = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[dtype]
    _unpack_probe_kernel[(1,)](pack_awq(codes), out, R=16, BN=64, DT=tl_dtype)
    assert torch.equal(out.double() - bias, codes.double())
    assert torch.equal(unpack_awq(pack_awq(codes)), codes)


@pytest.mark.parametrize("kernel", ["gemv", "gemm", "dequant"])
@pytest.mark.parametrize("M, K, N, G, dtype", list(_cases()))
def test_forced_kernel(kernel, M, K, N, G, dtype):
    check(M, K, N, G, DTYPES[dtype], AwqGemmConfig(kernel=kernel))


@pytest.mark.parametrize(
    "M, K, N, G, dtype, config",
    [
        # Contiguous K slices of uneven length, a split with no tiles, and the direct store (SPLIT_K = 1).
        pytest.param(5, 256, 136, 64, "fp16", dict(block_k=32, split_k=3), id="split3-BK32-fp16"),
        pytest.param(1, 256, 136, 32, "fp32", dict(block_k=64, split_k=5), id="split5-empty-split-M1"),
        pytest.param(16, 256, 64, 128, "fp32", dict(split_k=1), id="split1-direct-store"),
        # Several column blocks with a ragged last one, and several row blocks.
        pytest.param(33, 128, 136, 32, "fp16", dict(block_m=16, block_n=64, block_k=32), id="BM16-BN64-ragged"),
        # The 16-row minimum block with a narrow column block.
        pytest.param(5, 128, 64, 64, "bf16", dict(block_m=16, block_n=16, block_k=16), id="min-dot-16-bf16"),
        # A K tile larger than K (per-channel, masked rows past K).
        pytest.param(16, 128, 64, PER_CHANNEL, "fp32", dict(block_k=256, split_k=1), id="BK-gt-K"),
    ],
)
def test_gemv_tilings(M, K, N, G, dtype, config):
    check(M, K, N, G, DTYPES[dtype], AwqGemmConfig(kernel="gemv", **config))


def test_split_counters_reset():
    """Each tile's last split leaves its arrival counter at zero, so back-to-back launches stay correct."""
    config = AwqGemmConfig(kernel="gemv", block_n=64, block_k=32, split_k=3)
    for _ in range(2):
        check(20, 256, 136, 64, torch.float16, config)
    assert all(int(c.count_nonzero()) == 0 for c in awq_triton._COUNTERS.values())


@pytest.mark.parametrize(
    "M, K, N, G, dtype, config",
    [
        # 3 x 3 tiles: exercises the grouped program order with a partial last group of rows.
        pytest.param(33, 256, 136, 64, "fp16", dict(block_m=16, block_n=64, block_k=64), id="3x3-tiles-fp16"),
        pytest.param(40, 128, 64, 32, "bf16", dict(block_m=16, block_n=16, block_k=16), id="min-dot-16-bf16"),
        pytest.param(5, 256, 64, 128, "fp32", dict(block_k=32), id="BK32-single-group-fp32"),
    ],
)
def test_gemm_tilings(M, K, N, G, dtype, config):
    check(M, K, N, G, DTYPES[dtype], AwqGemmConfig(kernel="gemm", **config))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["scales-fp32", "scales-bf16"])
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_scale_dtypes(kernel, scale_dtype):
    check(5, 128, 64, 64, torch.float16, AwqGemmConfig(kernel=kernel), scale_dtype=scale_dtype)


@pytest.mark.parametrize("M, expected", [(1, "gemv"), (16, "gemv"), (17, "gemm"), (1023, "gemm"), (1024, "dequant")])
def test_dispatch(M, expected):
    assert dispatch(M) == expected
    assert dispatch(M, "gemm") == "gemm"


@pytest.mark.parametrize("M", [1, 16, 17])
def test_auto_route(M):
    check(M, 128, 64, 64, torch.float16, None)


def test_empty_batch():
    qweight, qzeros, scales = make_layer(128, 64, 64)
    y = awq_gemm_triton(torch.empty(0, 128), qweight, qzeros, scales, 64)
    assert y.shape == (0, 64)


def _bad_inputs():
    K, N, G = 128, 64, 64
    qweight, qzeros, scales = make_layer(K, N, G)
    x = torch.randn(3, K)
    ok = dict(x2d=x, qweight=qweight, qzeros=qzeros, scales=scales, group_size=G)
    return [
        pytest.param({**ok, "x2d": x[None]}, r"x2d must be 2-D \[M, K\], got shape \(1, 3, 128\)", id="x-3d"),
        pytest.param({**ok, "x2d": x.to(torch.int32)}, r"dtype must be float16.*got torch.int32", id="x-int"),
        pytest.param({**ok, "x2d": torch.randn(K, 3).t()}, r"x2d must be contiguous.*contiguous\(\)", id="x-strided"),
        pytest.param({**ok, "qweight": qweight.float()}, r"qweight must be a 2-D int32.*torch.float32", id="qw-dtype"),
        pytest.param({**ok, "x2d": torch.randn(3, 96)}, r"K = x2d.shape\[1\] = 96.*\(128, 8\)", id="K-mismatch"),
        pytest.param({**ok, "scales": scales[:, :60]}, r"divisible by 8 for int4 packing, got 60", id="N-not-8"),
        pytest.param({**ok, "qzeros": qzeros[:, :4]}, r"N // 8 = 8 columns.*got 8 and 4", id="N-mismatch"),
        pytest.param({**ok, "group_size": 0}, r"group_size must be a positive int.*got 0", id="group-zero"),
        pytest.param({**ok, "group_size": 32}, r"ceil\(128 / 32\) = 4 rows, got 2 and 2", id="group-mismatch"),
        pytest.param({**ok, "scales": scales.int()}, r"scales must be a 2-D float tensor", id="scales-int"),
        pytest.param({**ok, "qzeros": qzeros.t().contiguous().t()}, r"qzeros must be contiguous", id="qz-strided"),
        pytest.param({**ok, "config": {"kernel": "gemv"}}, r"config must be an AwqGemmConfig.*got dict", id="cfg-dict"),
        pytest.param({**ok, "config": AwqGemmConfig(kernel="fast")}, r"one of .*got 'fast'", id="cfg-kernel"),
        pytest.param({**ok, "config": AwqGemmConfig(kernel="gemm", block_n=8)},
                     r"block_n must be a power of two >= 16.*got 8", id="cfg-BN8"),
        pytest.param({**ok, "config": AwqGemmConfig(kernel="gemv", block_k=48)},
                     r"block_k must be a power of two >= 16.*got 48", id="cfg-BK48"),
        pytest.param({**ok, "config": AwqGemmConfig(kernel="gemv", block_m=1)},
                     r"block_m must be a power of two >= 16.*got 1", id="cfg-BM1"),
        pytest.param({**ok, "config": AwqGemmConfig(kernel="gemv", split_k=0)}, r"split_k must be >= 1, got 0",
                     id="cfg-split0"),
    ]


@pytest.mark.parametrize("kwargs, match", _bad_inputs())
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        awq_gemm_triton(**kwargs)


def _explicit(kernel: str, cfg) -> AwqGemmConfig:
    """The autotuner config ``cfg`` as a fixed tiling for ``kernel``."""
    kw = cfg.kwargs
    return AwqGemmConfig(kernel=kernel, block_m=kw.get("BM"), block_n=kw["BN"], block_k=kw["BK"],
                         split_k=kw.get("SPLIT_K"), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 16, 40])
@pytest.mark.parametrize("index", range(len(awq_triton.GEMV_CONFIGS)))
def test_gpu_every_gemv_config(index, M, dtype):
    """The autotuner drops configs that fail to compile and never checks results: check each one here."""
    check(M, 1024, 1032, 128, DTYPES[dtype], _explicit("gemv", awq_triton.GEMV_CONFIGS[index]), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("index", range(len(awq_triton.GEMM_CONFIGS)))
def test_gpu_every_gemm_config(index, dtype):
    check(200, 1024, 1032, 128, DTYPES[dtype], _explicit("gemm", awq_triton.GEMM_CONFIGS[index]), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(awq_triton.DEQUANT_CONFIGS)))
def test_gpu_every_dequant_config(index):
    check(64, 1024, 1032, 32, torch.bfloat16, _explicit("dequant", awq_triton.DEQUANT_CONFIGS[index]),
          device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_gpu_gather_groups(kernel):
    """group_size 32 with a 64-row tile: the per-row zeros/scales route the pruner normally avoids."""
    check(16, 1024, 1024, 32, torch.float16, AwqGemmConfig(kernel=kernel, block_k=64), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 16, 64, 1024])
@pytest.mark.parametrize("K, N, G", [(4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 32), (1000, 1032, 128)],
                         ids=["4096x4096-G128", "11008x4096-G128", "4096x11008-G32", "1000x1032-G128-ragged"])
def test_gpu_autotuned_model_shapes(K, N, G, M, dtype):
    check(M, K, N, G, DTYPES[dtype], None, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_gpu_fp32_is_not_tf32(kernel):
    """fp32 activations must meet the fp32 tolerance, which a tf32 dot (10-bit mantissa) would miss."""
    check(16, 4096, 1024, 128, torch.float32, AwqGemmConfig(kernel=kernel), device="cuda")
