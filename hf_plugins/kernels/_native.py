"""Native CPU kernels: C sources shipped with the package, compiled on the user's machine on first use.

Nothing torch ships beats fp32 ``F.linear`` for int4 weights on AVX2 CPUs at decode shapes (measured in
``awq_gemm/cpu.py``), and ISA-specific code has to be built for the CPU it runs on. So a kernel's C source is
compiled here with the system C compiler (the one ``torch.compile`` already needs on CPU) at ``-O3 -march=native``
and loaded with :mod:`ctypes`. The shared object is cached under the package cache, keyed by a hash of the
source, the flags, the compiler and this machine (CPU model and flags), so each machine builds once (~1 s).
Builds are atomic (a temporary file renamed into place). OpenMP comes from the runtime torch already loaded (the
same ``libgomp.so.1``), so the kernel shares torch's thread pool instead of starting a second one.

Where no compiler is found or the build fails, :func:`load` returns None and logs why once; callers keep their
other routes. ``HF_PLUGINS_NATIVE=0`` disables native kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .. import _env
from ._routes import cpu_model, cpuinfo_field

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11")
"""Compiler flags besides ``-march``: position-independent shared object, OpenMP (torch's runtime, see module doc)."""


def _flags() -> tuple[str, ...]:
    """All compiler flags: :data:`FLAGS` and ``-march`` (this CPU unless ``HF_PLUGINS_NATIVE_MARCH`` says)."""
    return (*FLAGS, f"-march={_env.native_march()}")


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, then ``cc``, ``gcc``, ``clang`` on PATH; None if there is none."""
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _compiler_version(cc: str) -> str:
    result = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return result.stdout.splitlines()[0] if result.stdout else cc


def _build(source: Path, target: Path, cc: str) -> None:
    """Compile ``source`` into ``target`` atomically; raises ``RuntimeError`` with the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(handle)
    try:
        result = subprocess.run([cc, *_flags(), str(source), "-o", temporary, "-lm"], capture_output=True, text=True,
                                timeout=300, check=False)
        if result.returncode:
            raise RuntimeError(f"{cc} failed on {source.name}: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@functools.lru_cache(maxsize=None)
def load(source: Path) -> ctypes.CDLL | None:
    """The compiled library of C file ``source`` for this machine (built on first use), or None when unavailable."""
    if not _env.native_kernels_enabled():
        return None
    cc = compiler()
    if cc is None:
        logger.warning("hf_plugins: no C compiler (cc, gcc or clang) found; the native CPU kernel %s is skipped and "
                       "slower routes are used. Install gcc to enable it.", source.name)
        return None
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(_flags()).encode(), _compiler_version(cc).encode(),
                 cpu_model().encode(), (cpuinfo_field("flags", "Features") or "").encode()):
        key.update(part)
    target = _env.cache_dir() / "native" / f"{source.stem}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            logger.info("hf_plugins: building the native CPU kernel %s with %s", source.name, cc)
            _build(source, target, cc)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("hf_plugins: the native CPU kernel %s is unavailable (%s); slower routes are used.",
                       source.name, error)
        return None
