"""Run a function on N gloo ranks forked from the test process (fork: ~3 s for 2 ranks; spawn costs ~15 s).

Each rank joins a process group over a FileStore, runs ``fn(rank, world_size, *args)`` with one thread, and
pickles its return value to a file the parent reads back; an exception in any rank fails the test with its
traceback.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn, world_size: int, workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(workdir, "store"), world_size)
    # A rank that fails leaves the other blocked in a collective: the timeout ends it instead of hanging CI.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world_size, *args)
        error = None
    except Exception:  # noqa: BLE001 - the traceback travels to the parent, which fails the test
        result, error = None, traceback.format_exc()
    finally:
        dist.destroy_process_group()
    Path(workdir, f"rank{rank}.pkl").write_bytes(pickle.dumps((result, error)))


def run_ranks(fn, *args, world_size: int = 2) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each run on its own gloo rank."""
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(_worker, args=(fn, world_size, workdir, args), nprocs=world_size, start_method="fork")
        outcomes = [pickle.loads(Path(workdir, f"rank{rank}.pkl").read_bytes()) for rank in range(world_size)]
    errors = [f"rank {rank}:\n{error}" for rank, (_, error) in enumerate(outcomes) if error]
    if errors:
        raise AssertionError("\n".join(errors))
    return [result for result, _ in outcomes]
