"""Compile Triton kernels for an NVIDIA architecture without a GPU and report the shared memory each needs, so a
kernel that cannot launch on a real card fails on CPU first. Compilation runs Triton's own passes down to LLVM IR,
where the shared memory is allocated and fixed; LLVM's optimisation, the PTX backend and ptxas come after it and
cannot change it, and they took about 60% of the time, so they are skipped.

    TRITON_INTERPRET=0 python -m tests.kernels.gpu_compile < cases.json

A case is a JSON object:

- ``module``, ``kernel``: where the kernel lives (a ``@triton.jit`` function, bare or under ``@triton.autotune`` /
  ``@triton.heuristics``, which are unwrapped: give the configuration's values in ``constants``);
- ``constants``: the constexpr arguments; a string ``"tl.<dtype>"`` stands for that Triton dtype (a ``DT``
  argument), ``null`` for ``None``;
- ``dtype`` (e.g. ``"bf16"``) and ``typed``: the pointer arguments of that data dtype;
- ``ints``: the int32 scalar arguments;
- ``types`` (optional): other arguments' Triton signature types, e.g. ``{"qweight": "*i32", "scale": "fp32"}``;
- ``divisible`` (optional): int arguments that are multiples of 16 at the shapes checked (the JIT specialises
  them, which widens vector loads);
- ``arch``: the compute capability (``90``: H100, ``80``: A100);
- ``num_warps`` (optional, default 8) and ``num_stages`` (optional, default Triton's 3): the launch options.

Every argument not named is an fp32 pointer. Pointers are 16-byte aligned, as torch's allocations are (the JIT
specialises that too). Prints a JSON list of byte counts. The interpreter has no compiler, so the tests run this in a
subprocess with ``TRITON_INTERPRET=0`` (:func:`shared_memory`), which compiles on every CPU core.
"""

from __future__ import annotations

import importlib
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _jit_function(case: dict):
    """The ``JITFunction`` of the case's kernel, under any autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(case["module"]), case["kernel"])
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _constant(value):
    """A constexpr value from JSON: ``"tl.<dtype>"`` is that Triton dtype."""
    import triton.language as tl

    if isinstance(value, str) and value.startswith("tl."):
        return getattr(tl, value[3:])
    return value


class _SharedMemoryKnown(Exception):
    """Raised in place of the PTX stage: the shared memory is fixed once Triton has lowered to LLVM IR."""

    def __init__(self, shared: int) -> None:
        super().__init__(shared)
        self.shared = shared


def _stop_after_llvm_ir(*args):
    """Triton's stage hook: with no arguments it names itself for the cache key; otherwise it replaces the PTX
    stage (LLVM's NVPTX backend, then ptxas, which cannot change the shared memory Triton allocated) with a stop
    that carries the byte count."""
    if not args:
        return "stop-after-llvm-ir", "stop-after-llvm-ir"
    stages = args[1]

    def stop(src, metadata):
        raise _SharedMemoryKnown(metadata["shared"])

    stages["ptx"] = stop
    stages.pop("cubin", None)


def _skip_llvm_optimization(*args, **kwargs) -> None:
    """Stands in for LLVM's O3 pass pipeline, which runs on the LLVM IR after Triton allocated shared memory."""


def _compile_case(case: dict) -> int:
    """Bytes of shared memory of one case's kernel, compiled through Triton's passes down to LLVM IR."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _jit_function(case)
    constants = {name: _constant(value) for name, value in case["constants"].items()}
    given_types, divisible = case.get("types", {}), set(case.get("divisible", ()))
    signature, attrs = {}, {}
    for index, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constants:
            signature[name] = "constexpr"
            continue
        if name in given_types:
            signature[name] = given_types[name]
        elif name in case["ints"]:
            signature[name] = "i32"
        else:
            signature[name] = f"*{case['dtype']}" if name in case["typed"] else "*fp32"
        if signature[name].startswith("*") or name in divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": case.get("num_warps", 8)}
    if "num_stages" in case:
        options["num_stages"] = case["num_stages"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", case["arch"], 32),
                           options=options)
        except _SharedMemoryKnown as known:
            return known.shared
    raise RuntimeError(f"Triton compiled {case['kernel']} without reaching the PTX stage")


def shared_memory(cases: list[dict]) -> list[int]:
    """Bytes of shared memory of each case, compiled without the interpreter in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile"], input=json.dumps(cases), text=True,
                          capture_output=True, cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "0"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compiling for the GPU failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main() -> None:
    """Compile the cases on stdin, one at a time per CPU core: the kernel modules are imported once, then forked
    workers take the next case as they finish one (compile times range from 0.2 s to over a minute).

    The package's ``__init__`` is skipped (a bare ``hf_plugins`` package stands in for it): it registers the
    plugins with transformers, which takes seconds, and kernel modules import only torch, triton and modules of
    their own (``hf_plugins._env``, ``hf_plugins.kernels``).
    """
    from triton import knobs
    from triton._C.libtriton import llvm

    knobs.runtime.add_stages_inspection_hook = _stop_after_llvm_ir
    llvm.optimize_module = _skip_llvm_optimization
    cases = json.load(sys.stdin)
    package = types.ModuleType("hf_plugins")
    package.__path__ = [str(REPO / "hf_plugins")]
    sys.modules["hf_plugins"] = package
    for module in {case["module"] for case in cases}:
        importlib.import_module(module)
    workers = min(len(cases), len(os.sched_getaffinity(0)))
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            shared = pool.map(_compile_case, cases, chunksize=1)
    else:
        shared = [_compile_case(case) for case in cases]
    print(json.dumps(shared))


if __name__ == "__main__":
    _main()
