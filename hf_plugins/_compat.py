"""Calls into transformers internals whose signatures differ between the transformers releases we support.

Every internal the package implements or calls is checked against the installed release by
``tests/test_transformers_internals.py``; this module holds the adapters where supported releases differ.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.lru_cache(maxsize=None)
def _accepts_keyword(function, name: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def shard_param(style, module: nn.Module, param_name: str, mesh, model: nn.Module) -> None:
    """``style.shard_param`` for one parameter of ``module``. transformers >= 5.25 also takes the text config and
    the model's mesh manager (its head-unit styles read them); 5.24 takes neither."""
    if not _accepts_keyword(type(style).shard_param, "config"):
        style.shard_param(module, param_name, mesh)
        return
    style.shard_param(module, param_name, mesh, config=model.config.get_text_config(),
                      mesh_manager=getattr(model, "_mesh_manager", None))
