"""The one backend choice shared by every kernel op: ``reference``, ``cpu`` or ``triton``.

Precedence: an explicit per-call ``requested`` backend, then ``HF_PLUGINS_BACKEND`` (read by
:func:`hf_plugins._env.forced_backend`), then the device: CUDA -> ``triton``, CPU -> ``cpu``, anything else ->
``reference``. A backend that cannot run on the tensor's device is a ``ValueError``, never a silent fallback
(a slow path on CUDA would only show up as a mysteriously slow model).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from .. import _env

BACKENDS = ("reference", "cpu", "triton")

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _log_choice(op_name: str, device: str, backend: str, source: str) -> None:
    """Log one line per ``(op, device, backend, source)``; the cache makes repeats free and silent."""
    logger.info("hf_plugins: op %s on %s uses the %s backend (%s)", op_name, device, backend, source)


def _requested(requested: str | None) -> tuple[str | None, str]:
    """Normalise the explicit or environment request to ``(backend or None for auto, where it came from)``."""
    if requested is not None:
        value = requested.strip().lower()
        if value not in BACKENDS + ("auto",):
            raise ValueError(
                f"backend must be one of {BACKENDS} or 'auto', got {requested!r}; pass one of those or None."
            )
        if value != "auto":
            return value, f"backend={value!r} argument"
    forced = _env.forced_backend()
    if forced != "auto":
        return forced, f"HF_PLUGINS_BACKEND={forced}"
    return None, "by device"


def _by_device(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return "reference"


def _check_runnable(op_name: str, device: torch.device, backend: str, source: str) -> None:
    """Raise ``ValueError`` when ``backend`` cannot run ``op_name`` on ``device``."""
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(
            f"{op_name}: the cpu backend ({source}) needs CPU tensors, got a tensor on {device}; move the inputs "
            "with .cpu(), or choose backend='triton' (CUDA) or 'reference'."
        )
    if backend == "triton" and device.type != "cuda":
        if device.type != "cpu" or not _env.triton_interpreter():
            raise ValueError(
                f"{op_name}: the triton backend ({source}) needs a CUDA tensor, got one on {device}; move the "
                "inputs to CUDA, set TRITON_INTERPRET=1 before importing hf_plugins to run Triton on CPU, or choose "
                "backend='cpu' or 'reference'."
            )
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError(
            f"{op_name}: the triton backend ({source}) needs the triton package, which is not installed; "
            "pip install triton, or choose backend='reference'."
        )


def choose_backend(op_name: str, device: torch.device | str, requested: str | None = None) -> str:
    """Pick the backend for one call of ``op_name`` on ``device``.

    Args:
        op_name: the op's public name, used in logs and errors (``"awq_gemm"``).
        device: the device of the op's main input.
        requested: ``"reference"``, ``"cpu"``, ``"triton"``, or ``None``/``"auto"`` for the environment/device.

    Returns ``"reference"``, ``"cpu"`` or ``"triton"``; the choice is logged once per (op, device, backend). It is
    made once per (op, device, request, environment) and cached: quantized layers ask on every forward.
    """
    environment = (os.environ.get("HF_PLUGINS_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    return _choose_backend(op_name, device, requested, environment)


@functools.lru_cache(maxsize=256)
def _choose_backend(op_name: str, device: torch.device | str, requested: str | None, environment: tuple) -> str:
    """:func:`choose_backend` for one key; ``environment`` holds the variables it reads, so changing them re-decides.
    Errors are raised again on every call (``lru_cache`` keeps results only)."""
    device = torch.device(device)
    backend, source = _requested(requested)
    if backend is None:
        backend = _by_device(device)
    _check_runnable(op_name, device, backend, source)
    _log_choice(op_name, str(device), backend, source)
    return backend
