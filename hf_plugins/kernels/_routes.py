"""Route choice by measurement: the fastest of an op's correct routes, per shape class, dtype and machine.

Several routes of one op compute the same numbers (within the tolerance table), but which is fastest depends on
the shape, the dtype and the CPU: oneDNN's linear beats ``F.linear`` 1.2-1.5x on 576 -> 49152 and loses 2-3x on
576 -> 192 (AMD EPYC, 1 thread, AVX-512 and AVX2 alike). So the first call of a shape class times each route on
its own inputs and keeps the winner, in memory and in a small JSON table on disk keyed by this machine (CPU model,
ATen's CPU capability, torch version, threads), which later processes read instead of timing again. A different
machine key measures anew; an unreadable table is ignored with a warning and rewritten.
``HF_PLUGINS_ROUTE=<route>`` forces a route for every op that has it; each choice is logged once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from .. import _env

logger = logging.getLogger(__name__)

TIMED_RUNS = 5
"""Timed calls per route (after one warm-up); the minimum counts, as the least disturbed by other processes."""


def cpuinfo_field(*names: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line starting with one of ``names``; None where there is none."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(names):
                    return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` where there is none)."""
    return cpuinfo_field("model name") or platform.processor() or "cpu"


MAX_ROW_BUCKET = 512
"""Row counts above this share one shape class."""


def row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two, at most :data:`MAX_ROW_BUCKET`: decode, verification and prefill rows fall
    into different shape classes, close row counts into one."""
    return min(1 << max(rows - 1, 0).bit_length(), MAX_ROW_BUCKET)


def machine_key() -> str:
    """What a measured choice holds for: CPU model, ATen's CPU capability, torch version and thread count."""
    return (f"{cpu_model()} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")


def table_path() -> Path:
    """The on-disk route table (in the package cache)."""
    return _env.cache_dir() / "routes.json"


def _read_table(path: Path) -> dict:
    """The whole table, ``{machine: {op: {shape class: route}}}``; ``{}`` when missing or unreadable."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("hf_plugins: ignoring the unreadable route table %s (%s); routes are measured again", path,
                       error)
        return {}
    if not isinstance(table, dict):
        logger.warning("hf_plugins: ignoring the route table %s: not a JSON object; routes are measured again", path)
        return {}
    return table


def _write_table(path: Path, table: dict) -> None:
    """Replace the table atomically (a temporary file, then ``os.replace``); a failure only costs re-measuring."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as error:
        logger.warning("hf_plugins: could not save the route table %s (%s)", path, error)
        return
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("hf_plugins: could not save the route table %s (%s)", path, error)
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _fastest(run: Callable[[str], object], routes: tuple[str, ...]) -> tuple[str, dict[str, float]]:
    """The route with the least minimum time over :data:`TIMED_RUNS` calls, and every route's microseconds."""
    seconds = {}
    for route in routes:
        run(route)
        best = float("inf")
        for _ in range(TIMED_RUNS):
            start = time.perf_counter()
            run(route)
            best = min(best, time.perf_counter() - start)
        seconds[route] = best
    return min(seconds, key=seconds.get), {route: round(s * 1e6, 1) for route, s in seconds.items()}


class RouteChooser:
    """Chooses among ``routes`` of op ``op`` per shape class (any hashable whose ``str`` is stable)."""

    def __init__(self, op: str, routes: tuple[str, ...]) -> None:
        self.op = op
        self.routes = routes
        self._chosen: dict[Hashable, str] = {}

    def forget(self) -> None:
        """Drop the choices held in memory (the disk table stays)."""
        self._chosen.clear()

    def choose(self, shape_class: Hashable, run: Callable[[str], object],
               candidates: tuple[str, ...] | None = None) -> str:
        """The route for ``shape_class``; ``run(route)`` performs one call by that route (timed on a miss).

        ``candidates`` narrows the op's routes for this call (the ones this operand supports; the shape class must
        then determine them, since the choice is kept per class).
        """
        routes = self.routes if candidates is None else candidates
        forced = _env.forced_route()
        if forced in routes:
            return forced
        route = self._chosen.get(shape_class)
        if route is None:
            route = self._measured(shape_class, run, routes)
            self._chosen[shape_class] = route
        return route

    def _measured(self, shape_class: Hashable, run: Callable[[str], object], routes: tuple[str, ...]) -> str:
        path, key = table_path(), str(shape_class)
        table = _read_table(path)
        chosen = table.setdefault(machine_key(), {}).setdefault(self.op, {})
        if chosen.get(key) in routes:
            return chosen[key]
        if len(routes) == 1:
            return routes[0]
        route, micros = _fastest(run, routes)
        logger.info("hf_plugins: %s %s takes the %s route (measured us: %s)", self.op, key, route, micros)
        chosen[key] = route
        _write_table(path, table)
        return route
