"""Real text for calibration, perplexity and speculative decoding, from registry packages and the standard library.

- ``wiki``: the Wikipedia excerpt gensim ships as test data, cleaned to plain prose, one article per document.
- ``news``: the Lee news corpus from the same gensim wheel: 293 documents (its 300 lines hold 7 exact repeats).
- ``code``: the source of a fixed list of pure-Python standard-library modules, one module per document.
- ``docs``: the Python reference-manual topics of ``pydoc_data``, one topic per document.

wiki and news are cleaned once and cached as JSON; code and docs come from the running Python (so they follow its
version) and cost milliseconds, so they are not cached. Every corpus splits the same way: every 4th document
(index 3, 7, 11, ...) is evaluation, the rest calibration; repeated documents are dropped, so the two never share
a document.
"""

from __future__ import annotations

import bz2
import html
import importlib
import inspect
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable

from ._store import atomic_write_json, cache_dir, file_lock, logger, pip_download, read_member_verified

TEXTS = ("wiki", "news", "code", "docs")
SPLITS = ("all", "calibration", "evaluation")
_EVAL_EVERY = 4

_GENSIM = "gensim==4.4.0"
# Pin one wheel: the data files are identical in all of gensim's wheels, and a fixed target makes the download
# independent of the host's Python version and platform.
_GENSIM_TARGET = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                  "--abi", "cp311")
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
_NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
_NEWS_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
# Part of the cache file names: bump it when the clean-up changes so that caches of older code are rebuilt.
_TEXT_FORMAT = 1
_MIN_ARTICLE_CHARS = 2000

_CODE_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "colorsys", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "difflib", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext",
    "glob", "gzip", "heapq", "hmac", "html.parser", "ipaddress", "json.decoder", "json.encoder", "locale",
    "numbers", "operator", "optparse", "pprint", "queue", "random", "reprlib", "sched", "secrets", "shlex",
    "shutil", "statistics", "string", "tabnanny", "tempfile", "textwrap", "threading", "tokenize", "traceback",
    "uuid", "warnings", "weakref", "zipapp",
)  # fmt: skip


def load_text(name: str, split: str = "all") -> list[str]:
    """The documents of corpus ``name`` (one of ``TEXTS``) in ``split`` (one of ``SPLITS``).

    ``"evaluation"`` is every 4th document, ``"calibration"`` the others; ``"all"`` is both, in source order.
    """
    if name not in TEXTS:
        raise ValueError(f"Unknown text {name!r}; choose one of {TEXTS}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    documents = _LOADERS[name]()
    if split == "all":
        return documents
    evaluation = split == "evaluation"
    return [doc for i, doc in enumerate(documents) if (i % _EVAL_EVERY == _EVAL_EVERY - 1) == evaluation]


def _gensim_text(name: str) -> list[str]:
    """A cached gensim corpus (``wiki`` or ``news``), building both on first use."""
    path = cache_dir() / "texts" / f"{name}-v{_TEXT_FORMAT}.json"
    if not path.is_file():
        with file_lock("texts-gensim"):
            if not path.is_file():  # another process may have built it while we waited for the lock
                _build_gensim_texts()
    return json.loads(path.read_text(encoding="utf-8"))["documents"]


def _build_gensim_texts() -> None:
    """Download the gensim wheel, read and verify its two data files, clean them and cache them as JSON."""
    work = cache_dir() / "downloads" / "gensim"
    shutil.rmtree(work, ignore_errors=True)
    try:
        (wheel,) = pip_download([_GENSIM], work, extra_args=_GENSIM_TARGET)
        wiki = wiki_articles(read_member_verified(wheel, _WIKI_MEMBER, _WIKI_SHA256))
        lee = read_member_verified(wheel, _NEWS_MEMBER, _NEWS_SHA256).decode()
        news = _unique(line.strip() for line in lee.splitlines())
        for name, documents in (("wiki", wiki), ("news", news)):
            path = cache_dir() / "texts" / f"{name}-v{_TEXT_FORMAT}.json"
            atomic_write_json(path, {"source": _GENSIM, "documents": documents})
            logger.info("Cached %d %s documents (%d chars) in %s", len(documents), name, sum(map(len, documents)), path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wiki_articles(dump_bz2: bytes) -> list[str]:
    """Clean articles (``"title\\n\\ntext"``) of a bz2 MediaWiki XML dump: main namespace, no redirects, at least
    2 000 characters of clean text."""
    articles = []
    for _, element in ET.iterparse(io.BytesIO(bz2.decompress(dump_bz2))):
        if element.tag.rpartition("}")[2] != "page":
            continue
        wikitext = element.findtext("{*}revision/{*}text") or ""
        is_redirect = element.find("{*}redirect") is not None or wikitext.lstrip().upper().startswith("#REDIRECT")
        if element.findtext("{*}ns") == "0" and not is_redirect:
            body = clean_wikitext(wikitext)
            if len(body) >= _MIN_ARTICLE_CHARS:
                articles.append(f"{element.findtext('{*}title')}\n\n{body}")
        element.clear()  # the parsed tree would otherwise hold the whole dump
    return _unique(articles)


_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_NON_PROSE = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|hiero|graph)\b[^>]*>.*?</\1\s*>", re.S | re.I
)
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+(?P<label>[^\]]*))?\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"(?P<eq>={1,6})\s*(?P<title>[^=].*?)\s*(?P=eq)")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_HIDDEN_LINK_PREFIXES = {"file", "image", "media", "category"}
# Interlanguage links ([[de:Anarchismus]], [[zh-min-nan:...]]) list translations; they are not part of the prose.
_LANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*")
# Reference-only sections: lists of citations and links, not prose.
_DROPPED_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references",
}  # fmt: skip


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from MediaWiki markup.

    Drops comments, ``<ref>``s, math/gallery blocks, nested ``{{templates}}``, ``{| tables |}``, file, image,
    category and interlanguage links, and reference-only sections (See also, References, ...). Unwraps
    ``[[target|label]]`` to ``label``, ``[[target]]`` to ``target`` and ``[url label]`` to ``label``; removes bold
    and italic quotes, other HTML tags and list markers; keeps headings as their bare title on a line of their own.
    Paragraphs are separated by one blank line.
    """
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _NON_PROSE.sub("", text)
    text = _replace_balanced(text, "{{", "}}", lambda inner: "")
    text = _replace_balanced(text, "{|", "|}", lambda inner: "")
    text = _replace_balanced(text, "[[", "]]", _link_text)
    text = _EXTERNAL_LINK.sub(lambda m: m["label"] or "", text)
    text = _TAG.sub("", text)
    # Longest first, so that a bold word followed by an apostrophe ('''Foo''''s) keeps the apostrophe.
    text = text.replace("'''''", "").replace("'''", "").replace("''", "")
    # After the tags are gone: an escaped "&lt;ref&gt;" in the article is text, not markup.
    text = html.unescape(text).replace("\xa0", " ")
    return _tidy_lines(text)


def _replace_balanced(text: str, opener: str, closer: str, replace: Callable[[str], str]) -> str:
    """Replace each outermost ``opener ... closer`` span (nesting allowed) by ``replace(inner)``.

    An opener never closed (the dump cuts some pages short) drops the rest of the text: it is markup, not prose.
    """
    out, depth, start, pos = [], 0, 0, 0
    for match in re.finditer(f"{re.escape(opener)}|{re.escape(closer)}", text):
        if match.group() == opener:
            if depth == 0:
                out.append(text[pos : match.start()])
                start = match.end()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                out.append(replace(text[start : match.start()]))
                pos = match.end()
    if depth == 0:
        out.append(text[pos:])
    return "".join(out)


def _link_text(inner: str) -> str:
    """What a reader sees of the wiki link ``[[inner]]``: nothing for files, categories and interlanguage links."""
    target, pipe, label = inner.partition("|")
    prefix = target.split(":", 1)[0].strip() if ":" in target else ""
    if prefix.lower() in _HIDDEN_LINK_PREFIXES or _LANGUAGE_PREFIX.fullmatch(prefix):
        return ""
    target = target.strip().lstrip(":")
    if pipe and not label.strip():  # the "pipe trick": [[Paris (band)|]] shows "Paris"
        return re.sub(r"\s*\(.*\)$", "", target)
    return _replace_balanced(label, "[[", "]]", _link_text) if pipe else target


def _tidy_lines(text: str) -> str:
    """Turn headings into bare titles, drop reference-only sections, list markers and leftover punctuation,
    and collapse runs of blank lines."""
    lines: list[str] = []
    dropped_level = 0  # heading level of the reference-only section being dropped, 0 when none
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.fullmatch(line)
        if heading:
            level = len(heading["eq"])
            if dropped_level and level > dropped_level:
                continue
            title = heading["title"].strip()
            dropped_level = level if title.lower() in _DROPPED_SECTIONS else 0
            if not dropped_level:
                lines += ["", title, ""]
            continue
        # Horizontal rules, and "|" rows of tables that a template opened (so no "{|" was there to match).
        if dropped_level or re.fullmatch(r"-{4,}", line) or line.startswith("|"):
            continue
        line = _EMPTY_PARENS.sub("", _MAGIC_WORD.sub("", _LIST_MARKER.sub("", line)))
        lines.append(re.sub(r"[ \t]{2,}", " ", line).strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _stdlib_code() -> list[str]:
    """The source of each module in ``_CODE_MODULES``, in that order."""
    return _unique(inspect.getsource(importlib.import_module(name)) for name in _CODE_MODULES)


def _python_docs() -> list[str]:
    """The topics of the Python reference manual that ``pydoc`` shows, sorted by topic name."""
    from pydoc_data.topics import topics

    return _unique(topics[key].strip() for key in sorted(topics))


def _unique(documents) -> list[str]:
    """Non-empty documents in order, duplicates removed, so no text is in both calibration and evaluation."""
    return list(dict.fromkeys(doc for doc in documents if doc))


_LOADERS: dict[str, Callable[[], list[str]]] = {
    "wiki": lambda: _gensim_text("wiki"),
    "news": lambda: _gensim_text("news"),
    "code": _stdlib_code,
    "docs": _python_docs,
}
