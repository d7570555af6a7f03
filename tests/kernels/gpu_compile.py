"""Compile Triton kernels for an NVIDIA architecture without a GPU (ptxas ships with triton) and report the shared
memory each needs, so a kernel that cannot launch on a real card fails on CPU first.

    TRITON_INTERPRET=0 python -m tests.kernels.gpu_compile < cases.json

Each case is ``{"module", "kernel", "constants", "dtype", "arch", "typed": [pointer args of the data dtype],
"ints": [int32 args]}``; other arguments are fp32 pointers. Prints a JSON list of byte counts. The interpreter has
no compiler, so the tests run this in a subprocess with ``TRITON_INTERPRET=0`` (:func:`shared_memory`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _compile_case(case: dict) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(case["module"]), case["kernel"])
    constants = case["constants"]
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif name in case["ints"]:
            signature[name] = "i32"
        else:
            signature[name] = f"*{case['dtype']}" if name in case["typed"] else "*fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(ASTSource(kernel, signature, constants),
                                  target=GPUTarget("cuda", case["arch"], 32), options={"num_warps": 8})
    return compiled.metadata.shared


def shared_memory(cases: list[dict]) -> list[int]:
    """Bytes of shared memory of each case, compiled in a fresh process without the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile"], input=json.dumps(cases), text=True,
                          capture_output=True, cwd=REPO, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compiling for the GPU failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps([_compile_case(case) for case in json.load(sys.stdin)]))
