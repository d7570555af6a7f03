"""The one place that reads environment variables. Every variable is documented in the README.

- ``HF_PLUGINS_CACHE``: folder for downloaded registry packages and converted safetensors models.
  Default: ``$XDG_CACHE_HOME/hf-plugins`` or ``~/.cache/hf-plugins``.
- ``HF_PLUGINS_BACKEND``: force the kernel backend for every op: ``auto`` (default: by device),
  ``reference``, ``cpu`` or ``triton``.
- ``HF_PLUGINS_ROUTE``: force one route of every op that has it (e.g. ``onednn`` or ``torch`` for dense linears);
  ``measure`` (default) times the routes once per shape class and machine.
- ``HF_PLUGINS_NATIVE``: ``0`` disables the native CPU kernels compiled on first use (default ``1``).
- ``HF_PLUGINS_NATIVE_MARCH``: the ``-march`` those kernels are built for (default ``native``; e.g. ``haswell``
  builds the AVX2 code on an AVX-512 machine, as ``make test-avx2`` does).
- ``HF_PLUGINS_PIP_INDEX_URL``: an alternative package index for asset downloads (default: pip's own settings).
"""

from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("auto", "reference", "cpu", "triton")


def cache_dir() -> Path:
    """Root of the asset cache; created on first use by the caller."""
    explicit = os.environ.get("HF_PLUGINS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hf-plugins"


def forced_backend() -> str:
    """The backend forced by ``HF_PLUGINS_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("HF_PLUGINS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"HF_PLUGINS_BACKEND must be one of {BACKENDS}, got {value!r}; unset it or pick one of those."
        )
    return value


def forced_route() -> str | None:
    """The route forced by ``HF_PLUGINS_ROUTE`` (None: measure, the default)."""
    value = os.environ.get("HF_PLUGINS_ROUTE", "").strip().lower()
    return None if value in ("", "measure") else value


def native_kernels_enabled() -> bool:
    """False when ``HF_PLUGINS_NATIVE=0``: the C kernels built on first use are skipped (other routes remain)."""
    return os.environ.get("HF_PLUGINS_NATIVE", "1").strip() != "0"


def native_march() -> str:
    """The ``-march`` value for native kernels (``HF_PLUGINS_NATIVE_MARCH``, default ``native``)."""
    return os.environ.get("HF_PLUGINS_NATIVE_MARCH", "").strip() or "native"


def pip_index_url() -> str | None:
    """An alternative package index for asset downloads, or None for pip's defaults."""
    return os.environ.get("HF_PLUGINS_PIP_INDEX_URL") or None


def triton_interpreter() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
